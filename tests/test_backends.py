"""Every backend captures the same residuals and steers exactly like a hand-written HF forward hook."""

from __future__ import annotations

import warnings

import pytest
import torch

from qscope_plugins.backends import Intervention
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.sae import QwenScopeSAE
from qscope_plugins.testing.sae_files import random_sae_state
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model

from _helpers import BACKEND_KINDS as KINDS
from _helpers import make_backend, model, tok  # noqa: F401 (model and tok are fixtures)

PROMPTS = ["Hello world, this is", "a", "The quick brown fox"]
LAYER = 1
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=KINDS)
def backend(request, model, tok):
    return make_backend(request.param, model, tok)


def reference_generate(model, ids, vector=None, positions=None, generated=True, layer=LAYER):
    """HF greedy generation of one unpadded prompt with a plain forward hook adding ``vector``."""
    calls = []

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if vector is not None:
            if not calls:
                hidden = hidden.clone()
                if positions is None:
                    hidden += vector
                else:
                    for p in positions:
                        hidden[:, p] += vector
            elif generated:
                hidden = hidden + vector
        calls.append(hidden.shape[1])
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=0)
    finally:
        handle.remove()
    return out[0, len(ids):].tolist()


def reference_residual(model, ids, layer):
    captured = {}
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        handle.remove()
    return captured["h"][0]


def test_residuals_match_unpadded_forward(backend, model):
    rows = backend.encode(PROMPTS)
    [rb] = list(backend.residuals(PROMPTS, [LAYER, 3], batch_size=len(PROMPTS)))
    assert rb.hidden[LAYER].shape[:2] == (3, max(map(len, rows)))
    for n in (LAYER, 3):
        expected = torch.cat([reference_residual(model, ids, n) for ids in rows])
        # Padded positions are excluded: exactly the real tokens, in order.
        torch.testing.assert_close(rb.tokens(n), expected, atol=2e-5, rtol=1e-5)
    batches = list(backend.residuals(PROMPTS, [3], last_token=True, batch_size=2))
    assert [b.batch.start for b in batches] == [0, 2]
    last = torch.cat([b.hidden[3] for b in batches])
    expected_last = torch.stack([reference_residual(model, ids, 3)[-1] for ids in rows])
    torch.testing.assert_close(last, expected_last, atol=2e-5, rtol=1e-5)


STEERING_CASES = {
    "baseline": dict(alpha=0.0),
    "all_positions_and_generated": dict(alpha=6.0),
    "suppress": dict(alpha=-6.0),
    "selected_positions_prompt_only": dict(alpha=12.0, positions=(0, -1), generated=False),
    "generated_only": dict(alpha=8.0, positions=(), generated=True),
}


def steering_case(case):
    spec = STEERING_CASES[case]
    direction = torch.randn(64, generator=torch.Generator().manual_seed(7))
    vector = spec["alpha"] * direction / direction.norm()
    return vector, spec.get("positions"), spec.get("generated", True)


@pytest.fixture(scope="module")
def references(model, tok):
    """Reference generations per case, computed once and shared by every backend."""
    cache = {}

    def get(case):
        if case not in cache:
            vector, positions, generated = steering_case(case)
            cache[case] = []
            for ids in HFBackend(model, tok).encode(PROMPTS):
                # One unpadded prompt: negative positions resolve against its own length.
                where = None if positions is None else sorted({p % len(ids) for p in positions})
                steered = None if STEERING_CASES[case]["alpha"] == 0 else vector
                cache[case].append(reference_generate(model, ids, steered, where, generated))
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(STEERING_CASES))
def test_steering_matches_hand_written_hook(backend, references, case):
    vector, positions, generated = steering_case(case)
    ivs = [] if STEERING_CASES[case]["alpha"] == 0 else [Intervention(LAYER, vector=vector, positions=positions,
                                                                      generated=generated)]
    got = backend.generate(PROMPTS, max_new_tokens=NEW_TOKENS, interventions=ivs, batch_size=len(PROMPTS))
    assert [g.prompt_ids for g in got] == backend.encode(PROMPTS)
    assert [g.token_ids for g in got] == references(case)


def test_steering_changes_the_output(model, tok):
    backend = make_backend("hf", model, tok)
    plain = backend.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    steered = backend.generate(PROMPTS, max_new_tokens=NEW_TOKENS,
                               interventions=[Intervention(LAYER, vector=torch.full((64,), 3.0))])
    assert [g.token_ids for g in plain] != [g.token_ids for g in steered]


def test_capture_sees_the_edit_at_its_layer(model, tok):
    backend = make_backend("hf", model, tok)
    vector = torch.arange(64, dtype=torch.float32) / 64
    iv = Intervention(LAYER, vector=vector, positions=(-1,))
    [clean] = list(backend.residuals(PROMPTS, [LAYER], batch_size=3))
    [edited] = list(backend.residuals(PROMPTS, [LAYER], batch_size=3, interventions=[iv]))
    diff = edited.hidden[LAYER] - clean.hidden[LAYER]
    last = clean.batch.last_index
    for row in range(3):
        torch.testing.assert_close(diff[row, last[row]], vector)
        others = torch.ones(diff.shape[1], dtype=torch.bool)
        others[last[row]] = False
        assert diff[row, others].abs().max() == 0


def test_prompt_mask_counts_from_real_tokens():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    iv = Intervention(0, vector=torch.zeros(4), positions=(0, -1))
    assert iv.prompt_mask(left).tolist() == [[False, False, True, False, True], [True, False, False, False, True]]
    assert iv.prompt_mask(right).tolist() == [[True, False, True, False, False], [True, False, False, False, True]]
    every = Intervention(0, vector=torch.zeros(4))
    assert every.prompt_mask(torch.ones(2, 3)) is None
    assert every.prompt_mask(left).tolist() == left.bool().tolist()  # never the pads


def test_intervention_validation():
    with pytest.raises(ValueError, match="exactly one of `vector` and `fn`"):
        Intervention(0)
    with pytest.raises(ValueError, match="exactly one of `vector` and `fn`"):
        Intervention(0, vector=torch.zeros(3), fn=lambda h: h)
    with pytest.raises(ValueError, match=r"must be 1-D \(d_model,\)"):
        Intervention(0, vector=torch.zeros(2, 3))


def test_intervening_context_nests_and_restores(model, tok):
    backend = make_backend("hf", model, tok)
    a = Intervention(LAYER, vector=torch.full((64,), 2.0))
    b = Intervention(2, vector=torch.full((64,), -1.0))
    explicit = backend.generate(PROMPTS, max_new_tokens=4, interventions=[a, b])
    with backend.intervening([a]):
        with backend.intervening([b]):
            nested = backend.generate(PROMPTS, max_new_tokens=4)
        only_a = backend.generate(PROMPTS, max_new_tokens=4)
    assert [g.token_ids for g in nested] == [g.token_ids for g in explicit]
    assert [g.token_ids for g in only_a] == [g.token_ids for g in backend.generate(PROMPTS, max_new_tokens=4, interventions=[a])]
    assert backend._active_interventions() == []


def test_function_edits_need_a_local_backend(model, tok):
    backend = make_backend("hf", model, tok)
    backend.supports_functions = False
    with pytest.raises(ValueError, match="runs only additive \\(vector\\) interventions"):
        backend.generate(PROMPTS, max_new_tokens=2, interventions=[Intervention(0, fn=lambda h: h)])


def test_bad_inputs(model, tok):
    backend = make_backend("hf", model, tok)
    with pytest.raises(ValueError, match="no prompts given: the prompt list is empty"):
        backend.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        backend.residuals(["a", ""], [0])  # checked at the call, before any batch is requested
    with pytest.raises(ValueError, match=r"layer 4 is out of range: this model has layers 0\.\.3"):
        backend.residuals(["a"], [4])
    with pytest.raises(ValueError, match="intervention vector has size 32 but the model's d_model is 64"):
        backend.generate(["a"], max_new_tokens=2, interventions=[Intervention(0, vector=torch.zeros(32))])


def test_check_sae(model, tok):
    backend = make_backend("hf", model, tok)
    sae = QwenScopeSAE.from_weights(**random_sae_state(64, 128), k=4, layer=2)
    assert backend.check_sae(sae) == 2
    narrow = QwenScopeSAE.from_weights(**random_sae_state(32, 128), k=4, layer=2)
    with pytest.raises(ValueError, match="SAE d_model 32 does not match the model's d_model 64"):
        backend.check_sae(narrow)
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        backend.check_sae(sae, 9)
    with pytest.warns(UserWarning, match="SAE was trained on layer 2 but is used at layer 1"):
        backend.check_sae(sae, 1)
    backend.model_name = "/models/Qwen3-1.7B"  # post-trained checkpoint of the SAE's base model: fine
    base = QwenScopeSAE.from_weights(**random_sae_state(64, 128), k=4, layer=2, model_name="Qwen/Qwen3-1.7B-Base")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.check_sae(base)
    backend.model_name = "Qwen/Qwen3-8B-Base"
    with pytest.warns(UserWarning, match="SAE was trained on Qwen/Qwen3-1.7B-Base but the model is Qwen/Qwen3-8B-Base"):
        backend.check_sae(base)


def test_hf_layers_in_the_published_multimodal_layout(tmp_path, tok):
    from transformers import AutoModelForImageTextToText

    text = tiny_model("Qwen3_5ForCausalLM", seed=1)
    save_checkpoint(text, tmp_path, multimodal=True)
    published = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    backend = HFBackend(published, tok)
    assert backend.layers is published.model.language_model.layers
    assert (backend.n_layers, backend.d_model) == (4, 64)
    [rb] = list(backend.residuals(["Hello there"], [2]))
    torch.testing.assert_close(rb.tokens(2), reference_residual(text, backend.encode(["Hello there"])[0], 2),
                               atol=1e-5, rtol=1e-5)
