"""The HF backend's residual capture stops after the deepest captured layer, with unchanged values."""

from __future__ import annotations

import pytest
import torch

from qscope_plugins.backends import Intervention
from qscope_plugins.backends.editing import StopForward, layer_functions
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.testing.tiny_models import hf_layer_outputs, tiny_model, tiny_tokenizer

PROMPTS = ["Hello world, this is", "a", "The quick brown fox"]


@pytest.fixture(scope="module", params=["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def backend(request):
    return HFBackend(tiny_model(request.param, seed=5), tiny_tokenizer())


def count_calls(modules):
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in modules]
    return calls, handles


def test_capture_skips_every_layer_after_the_deepest_and_the_head(backend):
    deeper, handles = count_calls([*backend.layers[2:], backend.model.get_output_embeddings()])
    try:
        batches = list(backend.residuals(PROMPTS, [0, 1], batch_size=8))
    finally:
        for h in handles:
            h.remove()
    assert deeper[0] == 0, "layers after the deepest captured one (or the LM head) ran"
    (rb,) = batches
    _, outputs = hf_layer_outputs(backend.model, rb.batch.input_ids)
    for n in (0, 1):
        real = rb.mask
        torch.testing.assert_close(rb.hidden[n][real], outputs[n][real], rtol=0, atol=0)


def test_edits_before_the_stop_still_apply_and_deeper_ones_are_irrelevant(backend):
    vector = torch.full((backend.d_model,), 0.5)
    plain = next(iter(backend.residuals(PROMPTS, [2], batch_size=8))).hidden[2]
    edited = next(iter(backend.residuals(PROMPTS, [2], batch_size=8,
                                         interventions=[Intervention(1, vector=vector)]))).hidden[2]
    deeper = next(iter(backend.residuals(PROMPTS, [2], batch_size=8,
                                         interventions=[Intervention(3, vector=vector)]))).hidden[2]
    assert not torch.allclose(plain, edited)
    assert torch.equal(plain, deeper)


def test_layer_functions_stop_signal():
    captured = {}
    fns = layer_functions({}, [1, 3], captured, stop=True)
    assert sorted(fns) == [1, 3]
    assert torch.equal(fns[1](torch.ones(2)), torch.ones(2))
    with pytest.raises(StopForward):
        fns[3](torch.zeros(2))
    assert torch.equal(captured[3], torch.zeros(2))
    assert sorted(layer_functions({}, [1], {}, stop=False)) == [1]


@pytest.fixture(scope="module", params=["bridge", "hooked", "nnsight"])
def framework_backend(request):
    from test_backends import make_backend

    return make_backend(request.param, tiny_model("Qwen3ForCausalLM", seed=5), tiny_tokenizer())


def test_framework_capture_stops_after_the_deepest_layer(framework_backend):
    """TransformerLens (HookedTransformer and bridge) and nnsight also skip the deeper layers and
    the head; the captured values equal the HF model's own layer outputs."""
    hf_model = tiny_model("Qwen3ForCausalLM", seed=5)
    ran = []
    torch_model = getattr(framework_backend.model, "_model", framework_backend.model)
    deeper = [m for name, m in torch_model.named_modules() if name.endswith(("layers.2", "layers.3", "blocks.2",
                                                                                "blocks.3", "lm_head", "unembed"))]
    assert len(deeper) == 3
    handles = [m.register_forward_hook(lambda *_: ran.append(1)) for m in deeper]
    try:
        (rb,) = list(framework_backend.residuals(PROMPTS, [0, 1], batch_size=8))
    finally:
        for h in handles:
            h.remove()
    assert not ran, "layers after the deepest captured one (or the LM head) ran"
    _, outputs = hf_layer_outputs(hf_model, rb.batch.input_ids.cpu())
    for n in (0, 1):
        torch.testing.assert_close(rb.hidden[n][rb.mask].cpu(), outputs[n][rb.mask.cpu()], rtol=1e-5, atol=1e-5)
