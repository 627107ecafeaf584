"""One intervention type and apply function (qscope_plugins.remote) for every backend and trace; one layout resolver."""

from __future__ import annotations

import nnsight
import pytest
import torch
from nnsight.modeling.transformers import TransformersModel

from qscope_plugins import backends, remote
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.catalog import GROUPS
from qscope_plugins.remote import Intervention
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model, tiny_tokenizer

LEFT = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
RIGHT = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


def test_one_class_and_one_layer_error():
    assert remote.Steering is Intervention is backends.Intervention
    backend = HFBackend(tiny_model("Qwen3ForCausalLM"), tiny_tokenizer())
    with pytest.raises(remote.LayerRangeError, match=r"^layer 4 is out of range: this model has layers 0\.\.3$"):
        backend.check_layer(4)
    with pytest.raises(remote.LayerRangeError, match=r"^layer -1 is out of range"):
        next(backend.residuals(["hi"], [0], interventions=[Intervention(-1, vector=torch.zeros(64))]))
    with pytest.raises(remote.LayerRangeError, match=r"decoder layers 0\.\.3 \(at model\.layers\)"):
        remote.layout(backend.model).check_layer(4)


def test_prompt_mask_without_an_attention_mask_counts_columns():
    iv = Intervention(0, vector=torch.zeros(4), positions=(0, -2))
    assert iv.prompt_mask(width=4).tolist() == [[True, False, True, False]]
    assert iv.prompt_mask(torch.ones(1, 4)).tolist() == [[True, False, True, False]]  # unpadded: the same tokens
    with pytest.raises(IndexError, match=r"^steering position -5 is outside the prompt \(length 4\)$"):
        Intervention(0, vector=torch.zeros(4), positions=(-5,)).prompt_mask(width=4)
    given = torch.tensor([[True, False, True]])
    assert Intervention(0, vector=torch.zeros(4), positions=given).prompt_mask(width=3).tolist() == given.tolist()


@pytest.mark.parametrize(("padding", "last_of_short_row"), [(LEFT, 3), (RIGHT, 1)], ids=["left", "right"])
def test_prompt_mask_with_padding_counts_real_tokens(padding, last_of_short_row):
    last = Intervention(0, vector=torch.zeros(4), positions=(-1,)).prompt_mask(padding)
    assert last.tolist() == [[False, False, False, True], [i == last_of_short_row for i in range(4)]]
    third = Intervention(0, vector=torch.zeros(4), positions=(2,)).prompt_mask(padding)
    assert third[1].tolist() == [False] * 4  # a row too short for the position is left alone, no error


def test_edit_on_the_prompt_and_on_generated_tokens():
    prompt_only = Intervention(0, vector=torch.ones(4), positions=(-1,), generated=False)
    generated_only = Intervention(0, vector=2 * torch.ones(4), positions=())
    clamp_first = Intervention(0, fn=lambda h: h + 5, positions=(0,))
    edits = [prompt_only, generated_only, clamp_first]
    masks = remote.prompt_masks(edits, LEFT)
    assert masks[1] is None  # positions=(): never on the prompt
    prefill = remote.edit(torch.zeros(2, 4, 4), edits, masks, prompt=True)
    assert prefill[..., 0].tolist() == [[5, 0, 0, 1], [0, 0, 5, 1]]
    step = remote.edit(torch.zeros(2, 1, 4), edits, masks, prompt=False)
    assert step[..., 0].tolist() == [[7], [7]]  # generated_only + clamp_first; prompt_only is not generated


def test_the_same_intervention_in_a_hand_built_trace_and_in_a_backend():
    """A spec in an nnsight trace (no attention mask: positions are prompt columns) edits the
    tokens the HF backend's hooks edit, through the same apply function."""
    tok = tiny_tokenizer()
    hf = HFBackend(tiny_model("Qwen3ForCausalLM", seed=2), tok)
    traced = TransformersModel(tiny_model("Qwen3ForCausalLM", seed=2), tokenizer=tok, task="text-generation")
    g = torch.Generator().manual_seed(0)
    edits = [Intervention(1, vector=4 * torch.randn(64, generator=g), positions=(0, -1)),
             Intervention(2, fn=lambda h: 0.5 * h, positions=(-2,))]
    prompt = "an unpadded prompt of some length"
    (rb,) = hf.residuals([prompt], [1, 3], interventions=edits)
    with traced.trace(torch.tensor(hf.encode([prompt]))):
        got = nnsight.save(remote.apply(traced, edits, read=[1, 3]))
    (plain,) = hf.residuals([prompt], [3])
    for n in (1, 3):
        torch.testing.assert_close(got[n], rb.hidden[n], rtol=0, atol=1e-6)
    assert not torch.allclose(rb.hidden[3], plain.hidden[3])


def test_a_backend_refuses_a_mask_for_positions():
    hf = HFBackend(tiny_model("Qwen3ForCausalLM"), tiny_tokenizer())
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"give intervention positions as a tuple of ints, not a \(B, T\) mask"):
        hf.generate(["hi"], max_new_tokens=1, interventions=[Intervention(0, vector=torch.zeros(64), positions=mask)])


def test_layout_resolves_layers_final_norm_and_unembedding(tmp_path):
    import transformers

    text = tiny_model("Qwen3_5ForCausalLM")
    where = remote.layout(text)
    assert (where.path, where.stack, where.norm_path) == ("model.layers", "model", "model.norm")
    assert remote.decoder_layers(text) is text.model.layers and remote.decoder_stack(text) is text.model
    assert remote.final_norm(text) is text.model.norm and remote.unembedding(text) is text.lm_head

    save_checkpoint(text, tmp_path, multimodal=True)
    published = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    where = remote.layout(published)
    assert (where.path, where.norm_path) == ("model.language_model.layers", "model.language_model.norm")
    assert remote.final_norm(published) is published.model.language_model.norm
    assert remote.unembedding(published) is published.lm_head
    # The catalog states the published layout without importing torch; it names the resolver's paths.
    assert {g.hf_layers_path for g in GROUPS if g.family == "qwen3.5"} == {where.path}
    assert {g.hf_layers_path for g in GROUPS} <= set(remote.LAYER_PATHS)

    base = text.model  # a bare text model: layers at `layers`, no unembedding
    where = remote.layout(base)
    assert (where.path, where.stack, where.norm_path) == ("layers", "", "norm")
    assert remote.final_norm(base) is base.norm and remote.decoder_stack(base) is base
    with pytest.raises(remote.LayoutError, match=r"^Qwen3_5TextModel has no unembedding \(a base model, not a causal LM\?\) at `lm_head`$"):
        remote.unembedding(base)
