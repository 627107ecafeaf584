"""NNsightBackend conforms to the Backend protocol: same residuals and steered tokens as HF hooks."""

from __future__ import annotations

import pytest
import torch
from nnsight.modeling.transformers import TransformersModel

from qscope_plugins.backends import Intervention, Sampling, as_backend
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.backends.nnsight import NNsightBackend
from qscope_plugins.testing.tiny_models import ARCHITECTURES, save_checkpoint, tiny_model, tiny_tokenizer

PROMPTS = ["hello world", "a much longer prompt, left padded in generation", "hi"]


def interventions() -> list[Intervention]:
    g = torch.Generator().manual_seed(3)
    return [
        Intervention(0, vector=3 * torch.randn(64, generator=g), positions=(0, -1), generated=False),
        Intervention(2, vector=3 * torch.randn(64, generator=g)),
        Intervention(2, fn=lambda h: 0.5 * h, positions=(1,)),
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_residuals_and_tokens_as_hf_hooks(arch):
    tokenizer = tiny_tokenizer()
    hf = HFBackend(tiny_model(arch), tokenizer)
    ours = NNsightBackend(tiny_model(arch), tokenizer)
    assert (ours.n_layers, ours.d_model) == (4, 64)
    edits = interventions()
    for expected, got in zip(
        hf.residuals(PROMPTS, [0, 1, 3], interventions=edits, batch_size=2),
        ours.residuals(PROMPTS, [0, 1, 3], interventions=edits, batch_size=2),
    ):
        for n in (0, 1, 3):
            torch.testing.assert_close(got.tokens(n), expected.tokens(n), rtol=0, atol=1e-6)
    expected_ids = [g.token_ids for g in hf.generate(PROMPTS, max_new_tokens=6, interventions=edits)]
    assert [g.token_ids for g in ours.generate(PROMPTS, max_new_tokens=6, interventions=edits)] == expected_ids
    assert expected_ids != [g.token_ids for g in hf.generate(PROMPTS, max_new_tokens=6)]


def test_local_simulation_of_the_remote_path():
    tokenizer = tiny_tokenizer()
    hf = HFBackend(tiny_model("Qwen3MoeForCausalLM"), tokenizer)
    simulated = NNsightBackend(tiny_model("Qwen3MoeForCausalLM"), tokenizer, remote="local")
    assert not simulated.supports_functions
    vectors = [iv for iv in interventions() if iv.fn is None]
    expected = [g.token_ids for g in hf.generate(PROMPTS, max_new_tokens=5, interventions=vectors)]
    assert [g.token_ids for g in simulated.generate(PROMPTS, max_new_tokens=5, interventions=vectors)] == expected
    with pytest.raises(ValueError) as err:
        simulated.generate(PROMPTS, max_new_tokens=2, interventions=interventions())
    assert str(err.value) == (
        "the nnsight backend runs only additive (vector) interventions; "
        "function edits such as SAE clamping need a local backend"
    )


def test_sampling_with_a_seed_matches_hf():
    tokenizer = tiny_tokenizer()
    sampling = Sampling(do_sample=True, temperature=0.8, top_k=20, seed=11)
    hf = HFBackend(tiny_model("Qwen3ForCausalLM"), tokenizer)
    ours = NNsightBackend(tiny_model("Qwen3ForCausalLM"), tokenizer)
    expected = [g.token_ids for g in hf.generate(PROMPTS, max_new_tokens=6, sampling=sampling)]
    assert [g.token_ids for g in ours.generate(PROMPTS, max_new_tokens=6, sampling=sampling)] == expected


def test_as_backend_and_from_pretrained(tmp_path):
    checkpoint = save_checkpoint(tiny_model("Qwen3ForCausalLM"), tmp_path)
    loaded = NNsightBackend.from_pretrained(str(checkpoint))
    assert isinstance(as_backend(loaded.model), NNsightBackend)
    assert loaded.model_name == str(checkpoint)
    for_ndif = NNsightBackend.from_pretrained(str(checkpoint), remote=True, tokenizer=tiny_tokenizer())
    assert next(for_ndif.model._module.parameters()).device.type == "meta"  # nothing loaded locally
    assert (for_ndif.n_layers, for_ndif.d_model, for_ndif.supports_functions) == (4, 64, False)
    with pytest.raises(ValueError, match="layer 4 is out of range: this model has layers 0..3"):
        next(loaded.residuals(["hi"], [4]))
    wrapped = TransformersModel(tiny_model("Qwen3ForCausalLM"), tokenizer=tiny_tokenizer(), task="text-generation")
    (a,) = as_backend(wrapped).residuals(["hi there"], [3])
    (b,) = loaded.residuals(["hi there"], [3])
    torch.testing.assert_close(a.tokens(3), b.tokens(3), rtol=0, atol=1e-6)
