"""Backend.logits, token_losses / loss and watch agree with a hand-written HF forward on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_backends import (  # noqa: F401 (model, tok and backend are shared fixtures)
    LAYER, PROMPTS, backend, make_backend, model, reference_residual, tok,
)

from qscope_plugins.backends import Intervention


def hf_logits(model, ids, layer=None, edit=None):
    """Logits of one unpadded prompt: the model's own, or ``edit`` applied to layer ``layer``'s output."""
    def hook(module, args, output):
        return (edit(output[0]), *output[1:]) if isinstance(output, tuple) else edit(output)

    handle = model.model.layers[layer].register_forward_hook(hook) if edit else None
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0]
    finally:
        if handle:
            handle.remove()


def hand_loss(model, rows, skip_first, layer=None, edit=None):
    losses = [F.cross_entropy(hf_logits(model, ids, layer, edit)[:-1], torch.tensor(ids[1:], dtype=torch.long), reduction="none")
              for ids in rows]
    return torch.cat([ce[1:] if skip_first else ce for ce in losses]).mean().item()


@torch.no_grad()
def test_logits_are_the_model_logits_and_the_logit_lens(backend, model):
    rows = backend.encode(PROMPTS)
    [rb] = list(backend.residuals(PROMPTS, [LAYER, backend.n_layers - 1], batch_size=len(PROMPTS)))
    last = backend.logits(rb.hidden[backend.n_layers - 1])
    lens = backend.logits(rb.hidden[LAYER])
    for i, ids in enumerate(rows):
        n = len(ids)
        torch.testing.assert_close(last[i, :n], hf_logits(model, ids), atol=1e-4, rtol=1e-5)
        expected = model.lm_head(model.model.norm(reference_residual(model, ids, LAYER)))
        torch.testing.assert_close(lens[i, :n], expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("skip_first", [False, True])
def test_loss_equals_the_hand_computation_clean_and_spliced(backend, model, skip_first):
    rows = backend.encode(PROMPTS)
    assert backend.loss(PROMPTS, skip_first_token=skip_first, batch_size=2) == pytest.approx(
        hand_loss(model, rows, skip_first), rel=1e-5)
    ablate = Intervention(LAYER, fn=torch.zeros_like)
    assert backend.loss(PROMPTS, interventions=[ablate], skip_first_token=skip_first) == pytest.approx(
        hand_loss(model, rows, skip_first, LAYER, torch.zeros_like), rel=1e-5)


def test_token_losses_stream_per_batch_with_the_residuals(backend, model):
    rows = backend.encode(PROMPTS)
    batches = list(backend.token_losses(PROMPTS, layers=[LAYER], batch_size=2))
    assert [rb.batch.start for rb, _ in batches] == [0, 2]
    for rb, ce in batches:
        assert set(rb.hidden) == {LAYER, backend.n_layers - 1}
        assert ce.dtype == torch.float32 and ce.shape == (rb.batch.input_ids.shape[0], rb.batch.input_ids.shape[1] - 1)
        keep = backend.loss_mask(rb.batch)
        for i in range(ce.shape[0]):
            ids = rows[rb.batch.start + i]
            want = F.cross_entropy(hf_logits(model, ids)[:-1], torch.tensor(ids[1:], dtype=torch.long), reduction="none")
            torch.testing.assert_close(ce[i][keep[i]], want, atol=1e-5, rtol=1e-5)
    assert backend.loss(["a"]) != backend.loss(["a"])  # one token: no prediction to count (NaN)


def test_watch_sees_every_forward_until_removed(backend, model):
    seen = []
    remove = backend.watch(LAYER, lambda h: seen.append(h.detach().clone()))
    try:
        list(backend.residuals(PROMPTS[:1], [3]))
    finally:
        remove()
    list(backend.residuals(PROMPTS[:1], [3]))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], reference_residual(model, backend.encode(PROMPTS[:1])[0], LAYER),
                               atol=2e-5, rtol=1e-5)


def test_watch_keeps_gradients_and_leaves_the_output_alone(model, tok):
    backend = make_backend("hf", model, tok)
    ids = torch.tensor(backend.encode(PROMPTS[:1]))
    seen = []
    remove = backend.watch(LAYER, lambda h: seen.append(h) or torch.zeros_like(h))  # a returned value is ignored
    try:
        logits = model(ids).logits
    finally:
        remove()
    assert seen[0].requires_grad
    torch.testing.assert_close(logits[0].detach(), hf_logits(model, ids[0].tolist()))


def test_bad_arguments(model, tok):
    backend = make_backend("hf", model, tok)
    with pytest.raises(ValueError, match="residual has size 32 but the model's d_model is 64"):
        backend.logits(torch.zeros(2, 32))
    with pytest.raises(ValueError, match=r"layer 4 is out of range: this model has layers 0\.\.3"):
        backend.watch(4, print)
    with pytest.raises(ValueError, match=r"layer 7 is out of range"):
        next(backend.token_losses(PROMPTS, layers=[7]))
