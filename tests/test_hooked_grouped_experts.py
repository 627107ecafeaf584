"""The hooked MoE experts without a Python loop: HF's fused expert layout and transformers' grouped path.

The experts' TransformerLens parameters are views of one gate/up and one down tensor (HF's
layout), kept through loading, ``fold_ln`` and ``.to()``. With no expert hook and no gradient the
routed experts run as two ``grouped_mm`` calls, bit for bit what HF's default
``experts_implementation="grouped_mm"`` computes; an expert hook, a gradient, fp64 or
``set_grouped_experts(model, False)`` take TransformerLens's per-expert loop, whose hooks fire
per expert as before.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer

from qscope_plugins.integrations import transformer_lens as tl_integration
from qscope_plugins.models._moe import RoutedMoE, set_grouped_experts
from qscope_plugins.testing.tiny_models import tiny_model, tiny_tokenizer

ARCHS = ("Qwen3MoeForCausalLM", "Qwen3_5MoeForCausalLM")
IDS = torch.tensor([[17, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33],
                    [5, 9, 31, 44, 2, 90, 11, 17, 72, 101, 3, 8, 61, 12]])


def load(hf_model, **kwargs) -> HookedTransformer:
    tl_integration.register()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer.from_pretrained_no_processing("tiny", hf_model=hf_model,
                                                               tokenizer=tiny_tokenizer(), **kwargs)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    hf_model = tiny_model(request.param, seed=3)
    model = load(hf_model)
    yield hf_model, model
    set_grouped_experts(model, "auto")
    hf_model.set_experts_implementation("grouped_mm")


@pytest.fixture
def grouped_calls(monkeypatch):
    calls = []
    original = RoutedMoE._grouped_experts

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RoutedMoE, "_grouped_experts", counting)
    return calls


def moe_layers(model) -> list[RoutedMoE]:
    layers = [m for m in model.modules() if isinstance(m, RoutedMoE)]
    assert layers
    return layers


def hf_moe(hf_model, n: int):
    return hf_model.model.layers[n].mlp


def moe_index(model) -> int:
    return next(n for n, block in enumerate(model.blocks) if isinstance(block.mlp, RoutedMoE))


def test_expert_parameters_are_views_of_hf_shaped_stacks(pair):
    _, model = pair
    for moe in moe_layers(model):
        gate_up, down = moe.stacked_experts()
        d_mlp = down.shape[-1]
        assert gate_up.shape == (moe.num_experts, 2 * d_mlp, model.cfg.d_model)
        for e, expert in enumerate(moe.experts):
            assert expert.W_gate.weight.data_ptr() == gate_up[e, :d_mlp].data_ptr()
            assert expert.W_in.weight.data_ptr() == gate_up[e, d_mlp:].data_ptr()
            assert torch.equal(expert.W_out.weight, down[e])


@torch.no_grad()
def test_grouped_experts_equal_hf_grouped_mm_bit_for_bit(pair, grouped_calls):
    hf_model, model = pair
    n = moe_index(model)
    hf_model.set_experts_implementation("grouped_mm")
    x = torch.randn(2, 9, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    ours = model.blocks[n].mlp(x)
    assert grouped_calls, "the grouped path did not run"
    reference = hf_moe(hf_model, n)(x)
    reference = reference[0] if isinstance(reference, tuple) else reference
    assert torch.equal(ours, reference)


@torch.no_grad()
def test_grouped_and_loop_agree_on_logits_and_hf(pair, grouped_calls):
    hf_model, model = pair
    hf_model.set_experts_implementation("grouped_mm")
    grouped = model(IDS)
    assert grouped_calls
    torch.testing.assert_close(grouped, hf_model(IDS, use_cache=False).logits, atol=1e-4, rtol=0)
    set_grouped_experts(model, False)
    try:
        calls = len(grouped_calls)
        loop = model(IDS)
        assert len(grouped_calls) == calls, "set_grouped_experts(model, False) still took the grouped path"
    finally:
        set_grouped_experts(model, "auto")
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=0)


def test_expert_hooks_take_the_loop_and_fire_per_expert(pair, grouped_calls):
    _, model = pair
    with torch.no_grad():
        _, grouped_cache = model.run_with_cache(IDS, names_filter=lambda name: name.endswith("hook_resid_post"))
        assert grouped_calls
        calls = len(grouped_calls)
        _, cache = model.run_with_cache(IDS, names_filter=lambda name: ".experts." in name or
                                        name.endswith("hook_resid_post"))
    assert len(grouped_calls) == calls, "an expert hook did not force the per-expert loop"
    n = moe_index(model)
    moe = model.blocks[n].mlp
    expert_keys = [key for key in cache if key.startswith(f"blocks.{n}.mlp.experts.")]
    assert expert_keys
    routed = sum(cache[f"blocks.{n}.mlp.experts.{e}.hook_post"].shape[0]
                 for e in range(moe.num_experts) if f"blocks.{n}.mlp.experts.{e}.hook_post" in cache)
    assert routed == IDS.numel() * moe.experts_per_token  # every (token, expert) pair, once
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_post"
        torch.testing.assert_close(cache[name], grouped_cache[name], atol=1e-5, rtol=0)


def test_expert_hook_edits_still_change_the_output(pair):
    _, model = pair
    n = moe_index(model)
    with torch.no_grad():
        clean = model(IDS)
        ablated = model.run_with_hooks(IDS, fwd_hooks=[(f"blocks.{n}.mlp.experts.0.hook_post",
                                                         lambda act, hook: act * 0)])
    assert not torch.allclose(clean, ablated)


def test_gradients_take_the_loop_and_reach_the_experts(pair, grouped_calls):
    _, model = pair
    model.zero_grad(set_to_none=True)
    model(IDS).float().pow(2).mean().backward()
    assert not grouped_calls, "the grouped path carries no gradient to the expert parameters"
    grads = [expert.W_in.weight.grad for moe in moe_layers(model) for expert in moe.experts]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_survives_fold_ln_and_dtype_moves(arch, grouped_calls):
    hf_model = tiny_model(arch, seed=5)
    tl_integration.register()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = HookedTransformer.from_pretrained("tiny", hf_model=hf_model, tokenizer=tiny_tokenizer(),
                                                   fold_ln=True, center_writing_weights=False,
                                                   center_unembed=False)
    assert all(moe.stacked_experts() is not None for moe in moe_layers(folded))
    with torch.no_grad():
        torch.testing.assert_close(folded(IDS), hf_model(IDS, use_cache=False).logits, atol=1e-4, rtol=0)
    assert grouped_calls
    calls = len(grouped_calls)
    with torch.no_grad():
        logits = folded.to(torch.float64)(IDS)  # .to() moves the model in place
    assert len(grouped_calls) == calls  # no fp64 grouped_mm kernel: the loop
    torch.testing.assert_close(logits.float(), hf_model(IDS, use_cache=False).logits, atol=1e-4, rtol=0)
    assert all(moe.stacked_experts() is not None for moe in moe_layers(folded.to(torch.bfloat16)))


def test_a_replaced_expert_weight_falls_back_to_the_loop(grouped_calls):
    hf_model = tiny_model("Qwen3MoeForCausalLM", seed=11)
    model = load(hf_model)
    moe = moe_layers(model)[0]
    expert = moe.experts[1]
    expert.W_in.weight = torch.nn.Parameter(expert.W_in.weight.detach().clone())
    assert moe.stacked_experts() is None
    with torch.no_grad():
        logits = model(IDS)
    assert moe not in grouped_calls and len(grouped_calls) == len(moe_layers(model)) - 1
    torch.testing.assert_close(logits, hf_model(IDS, use_cache=False).logits, atol=1e-4, rtol=0)


def test_set_grouped_experts_rejects_other_values(pair):
    _, model = pair
    with pytest.raises(ValueError, match=r"grouped must be 'auto', True or False, got 'yes'"):
        set_grouped_experts(model, "yes")
