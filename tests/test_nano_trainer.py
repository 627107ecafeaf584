"""The nano SAEs train through SAELens's ``SAETrainer``, bit for bit as the hand-written loop that
trained the shipped nano SAEs did (issue 18 item 4: one SAE trainer path)."""

import re

import pytest
import torch

from qscope_plugins.demo.sae_train import SAEConfig, train_nano_sae
from qscope_plugins.recipes import sae_train
from qscope_plugins.recipes.sae_train import train_sae_on_activations, warm_up_decay

CFG = SAEConfig(expansion=4, k=4, k_aux=16, batch_size=100, epochs=4, dead_after_tokens=300, lr=2e-3, seed=3)


def clustered(n=1600, d=16, clusters=6, seed=0):
    """Token-dominated toy residuals: a few tight clusters of very different sizes, so latents die."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=gen) * 3
    weights = torch.tensor([2.0**-i for i in range(clusters)])
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    return centres[labels] + 0.05 * torch.randn(n, d, generator=gen) + 0.5


def reference_loop(acts, cfg):
    """The nano trainer as it was before it went through SAELens (``demo/sae_train.py`` at 9d15ccb), plus
    statistics showing what the test exercises: steps with dead latents and the largest gradient norm."""

    def topk(pre, k):
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    d_model = acts.shape[1]
    d_sae = cfg.expansion * d_model
    mean = acts.mean(0)
    scale = float((acts - mean).pow(2).sum(1).mean().sqrt()) / d_model**0.5
    init = acts[torch.randperm(acts.shape[0], generator=generator)[:d_sae]] - mean
    W_dec = init.T.contiguous()
    W_dec = W_dec / W_dec.norm(dim=0, keepdim=True)
    W_dec, W_enc = torch.nn.Parameter(W_dec), torch.nn.Parameter(W_dec.T / cfg.k)
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(d_sae)), torch.nn.Parameter((mean / scale).clone())
    params = [W_dec, W_enc, b_enc, b_dec]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps_since_fired = torch.zeros(d_sae)
    n = acts.shape[0]
    total = cfg.epochs * (n // cfg.batch_size)
    step, dead_steps, max_norm = 0, 0, 0.0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            x = acts[order[start : start + cfg.batch_size]] / scale
            pre = (x - b_dec) @ W_enc.T + b_enc
            z = topk(pre, cfg.k)
            x_hat = z @ W_dec.T + b_dec
            err = x - x_hat
            loss = err.pow(2).sum(1).mean()
            fired = (z > 0).any(0)
            steps_since_fired = torch.where(fired, 0.0, steps_since_fired + cfg.batch_size)
            dead = steps_since_fired > cfg.dead_after_tokens
            if dead.any():
                dead_steps += 1
                aux_pre = pre.masked_fill(~dead, float("-inf"))
                z_aux = topk(aux_pre, min(cfg.k_aux, int(dead.sum()))).nan_to_num(0.0)
                aux = (err.detach() - z_aux @ W_dec.T).pow(2).sum(1).mean()
                loss = loss + cfg.aux_weight * aux
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, 10 * (step + 1) / total, 5 * (1 - step / total))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = max(max_norm, float(torch.cat([p.grad.flatten() for p in params]).norm()))
            opt.step()
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8)
            step += 1
    with torch.no_grad():
        state = {"W_enc": W_enc.clone(), "W_dec": W_dec.clone(),
                 "b_enc": (b_enc - W_enc @ b_dec) * scale, "b_dec": b_dec * scale}
    return state, {"steps": step, "dead_steps": dead_steps, "max_grad_norm": max_norm}


def test_saelens_trainer_reproduces_the_nano_loop_bit_for_bit():
    acts = clustered()
    expected, stats = reference_loop(acts, CFG)
    # what makes this a test: AuxK on dead latents on most steps, the warm-up and the decay, and gradients
    # SAELens's trainer would have clipped (norm above 1)
    assert stats["steps"] == 64 and 20 <= stats["dead_steps"] < 64, stats
    assert stats["max_grad_norm"] > 2, stats
    state = train_nano_sae(acts, CFG)
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key
        assert state[key].stride() == expected[key].stride(), key


def test_the_run_is_saelens_trainer_on_a_saelens_training_sae(monkeypatch):
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    calls = {"fit": 0, "step": 0}
    fit, step = SAETrainer.fit, SAETrainer.step

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(SAETrainer, "fit", counting("fit", fit))
    monkeypatch.setattr(SAETrainer, "step", counting("step", step))
    acts = clustered(n=600)
    run = train_sae_on_activations(acts, d_sae=32, k=4, epochs=2, batch_size=100, lr=2e-3, dead_after_tokens=200)
    assert calls == {"fit": 1, "step": 12}
    assert isinstance(run.sae, TrainingSAE) and run.sae.cfg.architecture() == "qwen_scope_topk"
    assert torch.allclose(run.sae.W_dec.norm(dim=1), torch.ones(32))  # renormalised after the last step
    # the released tensors compute SAELens's own encode / decode of the trained SAE on raw inputs
    state = run.released()
    x = acts[:50]
    codes = torch.relu(x @ state["W_enc"].T + state["b_enc"])
    codes = torch.zeros_like(codes).scatter_(-1, codes.topk(4).indices, codes.topk(4).values)
    with torch.no_grad():
        torch.testing.assert_close(codes, run.sae.encode(x / run.scale) * run.scale, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(codes @ state["W_dec"].T + state["b_dec"],
                                   run.sae.decode(run.sae.encode(x / run.scale)) * run.scale, atol=1e-5, rtol=1e-5)


def test_the_schedule_warms_up_over_a_tenth_and_decays_over_the_last_fifth():
    factors = [warm_up_decay(step, 20) for step in range(20)]
    assert factors == pytest.approx([0.5] + [1.0] * 16 + [0.75, 0.5, 0.25])


@pytest.mark.parametrize("init, scale_inputs", [("saelens", True), ("data", False), ("saelens", False)])
def test_the_other_options_train_and_export(init, scale_inputs):
    acts = clustered(n=600)
    run = train_sae_on_activations(acts, d_sae=32, k=4, epochs=2, batch_size=100, lr=2e-3, init=init,
                                   scale_inputs=scale_inputs)
    assert (run.scale == 1.0) != scale_inputs
    state = run.released()
    pre = acts @ state["W_enc"].T + state["b_enc"]
    assert torch.isfinite(pre).all() and state["W_dec"].shape == (16, 32)


@pytest.mark.parametrize("kwargs, message", [
    ({"init": "random"}, "init must be one of 'data', 'saelens', got 'random'"),
    ({"batch_size": 700}, "no training step: 2 epoch(s) of 600 activations in batches of 700"),
    ({"d_sae": 1024}, "init='data' starts each of the 1024 latents at a training point; only 600 given"),
    ({"k": 33}, "k=33 must be in [1, d_sae=32]"),
    ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"acts": torch.zeros(600)}, "acts must be a 2-D float tensor (tokens, d_in), got shape (600,) torch.float32"),
    ({"acts": torch.zeros(600, 16, dtype=torch.long)},
     "acts must be a 2-D float tensor (tokens, d_in), got shape (600, 16) torch.int64"),
    ({"acts": torch.full((600, 16), float("nan"))}, "acts contain NaN or Inf"),
])
def test_bad_options_are_refused(kwargs, message):
    options = {"d_sae": 32, "k": 4, "epochs": 2, "batch_size": 100, "lr": 2e-3} | kwargs
    acts = options.pop("acts", None)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sae_train.train_sae_on_activations(clustered(n=600) if acts is None else acts, **options)
