"""SAE quality metrics: hand computations on planted SAEs, a perfect SAE, every backend, SAELens parity, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.cli import main
from qscope_plugins.recipes.sae_eval import compare_checkpoints, evaluate_sae, jaccard
from qscope_plugins.sae import QwenScopeSAE
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model

from _helpers import BACKEND_KINDS, make_backend, model, tok  # noqa: F401 (model and tok are fixtures)

TEXTS = ["Hello world, this is a test", "ab", "The quick brown fox jumps", "SAE quality per layer!"]
DEAD, DENSE = range(0, 10), range(10, 12)


def planted_sae(layer: int) -> QwenScopeSAE:
    """A random SAE with features 0-9 that can never fire and features 10-11 that always do."""
    state = random_sae_state(64, 256, seed=layer)
    state["b_enc"][list(DEAD)] = -1e4
    state["b_enc"][list(DENSE)] = 1e4
    return QwenScopeSAE.from_weights(**state, k=8, layer=layer)


def perfect_sae(layer: int) -> QwenScopeSAE:
    """``[I; -I]`` encoder and decoder with k = d_model: every residual is reconstructed exactly."""
    eye = torch.eye(64)
    return QwenScopeSAE.from_weights(torch.cat([eye, -eye]), torch.cat([eye, -eye], 1), torch.zeros(128),
                                     torch.zeros(64), k=64, layer=layer)


def layer_outputs(model, ids, layer, edit=None):
    """HF logits and decoder layer ``layer``'s output, optionally replaced by ``edit(output)``."""
    seen = {}

    def hook(module, args, output):
        seen["x"] = output
        return edit(output) if edit else None

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids).logits, seen["x"]
    finally:
        handle.remove()


def hand_metrics(model, tok, sae, layer, skip_first):
    """Every metric computed directly: one unpadded HF forward per text, the dense SAELens path."""
    xs, losses = [], {"clean": [], "sae": [], "ablation": []}

    def splice(h):
        x_hat = sae(h)
        if skip_first:
            x_hat[:, 0] = h[:, 0]
        return x_hat

    for text in TEXTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        for name, edit in (("clean", None), ("sae", splice), ("ablation", torch.zeros_like)):
            logits, x = layer_outputs(model, ids, layer, edit)
            ce = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            losses[name].append(ce[1:] if skip_first else ce)
            if name == "clean":
                xs.append(x[0, 1:] if skip_first else x[0])
    x = torch.cat(xs)
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    fires = (z != 0).sum(0)
    ce = {name: torch.cat(v).mean().item() for name, v in losses.items()}
    return {
        "n_tokens": x.shape[0],
        "fvu": ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
        "mse": (x - x_hat).pow(2).sum(-1).mean().item(),
        "cosine": F.cosine_similarity(x, x_hat, dim=-1).mean().item(),
        "l0": (z != 0).sum(-1).float().mean().item(),
        "dead_fraction": (fires == 0).float().mean().item(),
        "dense_fraction": (fires > 0.1 * x.shape[0]).float().mean().item(),
        "ce_loss_clean": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_with_ablation": ce["ablation"],
        "ce_loss_recovered": (ce["ablation"] - ce["sae"]) / (ce["ablation"] - ce["clean"]),
    }


@pytest.mark.parametrize("skip_first", [False, True])
def test_metrics_equal_hand_computation_on_planted_sae(model, tok, skip_first):
    sae = planted_sae(1)
    got = evaluate_sae(HFBackend(model, tok), {1: sae}, TEXTS, skip_first_token=skip_first, batch_size=3)[1]
    want = hand_metrics(model, tok, sae, 1, skip_first)
    assert got.n_tokens == want.pop("n_tokens")
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert got.explained_variance == pytest.approx(1 - got.fvu)
    assert got.ce_loss_with_sae_and_error == pytest.approx(got.ce_loss_clean, abs=1e-5)
    assert got.dead_fraction >= len(DEAD) / 256 and got.dense_fraction >= len(DENSE) / 256  # planted ones found


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The module's model on disk, saved from a fresh copy (a bridge backend rewires the model it wraps)."""
    return save_checkpoint(tiny_model("Qwen3ForCausalLM", seed=3), tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="module")
def hf_reference(model, tok):
    return evaluate_sae(HFBackend(model, tok), {1: planted_sae(1), 2: perfect_sae(2)}, TEXTS, skip_first_token=True)


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_every_backend_agrees_and_a_perfect_sae_scores_one(model, tok, hf_reference, kind):
    got = evaluate_sae(make_backend(kind, model, tok), {1: planted_sae(1), 2: perfect_sae(2)}, TEXTS,
                       skip_first_token=True)
    perfect = got[2]
    assert perfect.explained_variance == pytest.approx(1.0, abs=1e-5) and perfect.fvu == pytest.approx(0, abs=1e-5)
    assert perfect.cosine == pytest.approx(1.0, abs=1e-5) and perfect.l0 == 64
    assert perfect.ce_loss_with_sae == pytest.approx(perfect.ce_loss_clean, abs=1e-5)
    assert perfect.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    for layer, reference in hf_reference.items():
        for key, value in reference.to_dict().items():
            assert getattr(got[layer], key) == pytest.approx(value, rel=1e-4, abs=1e-5), (layer, key)


def test_loss_matches_saelens_get_recons_loss(model, tok):
    """Same-length texts (no padding): our means equal SAELens's per-token losses averaged."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    backend = make_backend("hooked", model, tok)
    texts = ["abcdefgh", "12345678", "Qwen SAE"]
    sae = planted_sae(1)
    ours = evaluate_sae(backend, {1: sae}, texts)[1]
    tokens = torch.tensor(backend.encode(texts))
    theirs = get_recons_loss(sae, backend.model, ActivationScaler(), tokens, compute_kl=False, compute_ce_loss=True)
    assert ours.ce_loss_with_sae == pytest.approx(theirs["ce_loss_with_sae"].mean().item(), rel=1e-5)
    assert ours.ce_loss_clean == pytest.approx(theirs["ce_loss_without_sae"].mean().item(), rel=1e-5)
    assert ours.ce_loss_with_ablation == pytest.approx(theirs["ce_loss_with_ablation"].mean().item(), rel=1e-5)


def test_jaccard():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([], []) == 1.0 and jaccard([1], [2]) == 0.0


def top_sets(model, tok, sae, layer, n):
    sets = []
    for text in TEXTS:
        _, x = layer_outputs(model, torch.tensor([tok(text)["input_ids"]]), layer)
        with torch.no_grad():
            sums = sae.encode(x[0]).sum(0)
        best = sums.topk(n)
        sets.append(set(best.indices[best.values > 0].tolist()))
    return sets


def test_compare_checkpoints_side_by_side_with_top_feature_jaccard(model, tok):
    other = tiny_model("Qwen3ForCausalLM", seed=3)
    with torch.no_grad():  # a "post-trained" checkpoint: the same model, one layer nudged
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    sae = planted_sae(1)
    out = compare_checkpoints(HFBackend(model, tok), HFBackend(other, tok), {1: sae}, TEXTS, top_n=5,
                              compute_loss=False)[1]
    pairs = zip(top_sets(model, tok, sae, 1, 5), top_sets(other, tok, sae, 1, 5))
    want = sum(len(a & b) / len(a | b) for a, b in pairs) / len(TEXTS)
    assert out["top_feature_jaccard"] == pytest.approx(want)
    assert 0 < want < 1  # the planted dense features always overlap; the rest moved
    assert out["base"]["fvu"] == pytest.approx(hand_metrics(model, tok, sae, 1, False)["fvu"], rel=1e-4)
    assert out["other"]["fvu"] != pytest.approx(out["base"]["fvu"])
    same = compare_checkpoints(HFBackend(model, tok), HFBackend(model, tok), {1: sae}, TEXTS, top_n=5,
                               compute_loss=False)[1]
    assert same["top_feature_jaccard"] == 1.0 and same["base"] == same["other"]


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    sae = planted_sae(1)
    state = {"W_enc": sae.W_enc.T.detach(), "W_dec": sae.W_dec.T.detach(), "b_enc": sae.b_enc.detach(),
             "b_dec": sae.b_dec.detach()}
    write_released_layer(root / "tiny-sae", 1, state)
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return root, checkpoint


def test_cli_writes_json_and_plot(files, tok, model, tmp_path, capsys):
    root, checkpoint = files
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    rc = main(["eval-sae", "--model", str(checkpoint), "--sae", str(root / "tiny-sae"), "--k", "8",
               "--layers", "1", "--data", str(root / "texts.txt"), "--skip-first-token", "--output", str(out),
               "--plot", str(png), "--no-progress"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["skip_first_token"] is True and result["n_texts"] == len(TEXTS)
    (row,) = result["layers"]
    want = hand_metrics(model, tok, planted_sae(1), 1, True)
    assert row["layer"] == 1 and row["fvu"] == pytest.approx(want["fvu"], rel=1e-4)
    assert row["ce_loss_recovered"] == pytest.approx(want["ce_loss_recovered"], rel=1e-4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "EV" in capsys.readouterr().out


def test_cli_bad_input_leaves_no_output(files, tmp_path, capsys):
    root, checkpoint = files
    out = tmp_path / "eval.json"
    args = ["eval-sae", "--model", str(checkpoint), "--sae", str(root / "tiny-sae"), "--k", "8",
            "--output", str(out), "--no-progress"]
    assert main([*args, "--layers", "1", "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main([*args, "--layers", "9", "--data", str(root / "texts.txt")]) == 2
    assert "layer 9 is out of range: this model has layers 0..3" in capsys.readouterr().err
    assert not out.exists()


def test_cli_compare_checkpoints(files, tmp_path, capsys):
    root, checkpoint = files
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    rc = main(["eval-sae", "--model", str(checkpoint), "--compare-model", str(checkpoint), "--sae",
               str(root / "tiny-sae"), "--k", "8", "--layers", "1", "--data", str(root / "texts.txt"), "--no-loss",
               "--top", "5", "--output", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    (row,) = json.loads(out.read_text())["layers"]
    assert row["top_feature_jaccard"] == 1.0 and row["base"] == row["other"] and row["base"]["ce_loss_clean"] is None
    assert png.exists() and "top-feature Jaccard: layer 1: 1.000" in capsys.readouterr().out
