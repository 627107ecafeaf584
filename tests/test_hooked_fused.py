"""The hooked Qwen models' fast forward: fused attention (SDPA) when nothing hooks the pattern,
and weights stored in HF's memory layout. Every hook keeps its value (fp32, 1e-5 against the
unfused path, relative to each tensor's largest value when that exceeds 1; logits 1e-4 against
HF, the hooked-model tolerance), and a hook on the pattern
or scores forces TransformerLens's own path."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer

from qscope_plugins.integrations import transformer_lens as tl_integration
from qscope_plugins.models._attention import FusedAttention, set_fused_attention
from qscope_plugins.testing.tiny_models import tiny_model, tiny_tokenizer

ARCHS = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
IDS = torch.tensor([[17, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33],
                    [5, 9, 31, 44, 2, 90, 11, 17, 72, 101, 3, 8, 61, 12]])
PATTERN_HOOKS = ("hook_pattern", "hook_attn_scores")


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    tl_integration.register()
    hf_model = tiny_model(request.param, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer.from_pretrained_no_processing("tiny", hf_model=hf_model, tokenizer=tiny_tokenizer())
    assert any(isinstance(m, FusedAttention) for m in model.modules())
    yield hf_model, model
    set_fused_attention(model, True)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = FusedAttention._attend

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FusedAttention, "_attend", counting)
    return calls


def not_pattern(name: str) -> bool:
    return not name.endswith(PATTERN_HOOKS)


@torch.no_grad()
def test_fused_logits_match_hf(pair, fused_calls):
    hf_model, model = pair
    logits = model(IDS)
    assert fused_calls, "the fused path did not run"
    torch.testing.assert_close(logits, hf_model(IDS, use_cache=False).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_every_hook_has_the_same_value_fused_or_not(pair, fused_calls):
    _, model = pair
    logits, fused = model.run_with_cache(IDS, names_filter=not_pattern)
    assert fused_calls, "the fused path did not run"
    set_fused_attention(model, False)
    fused_calls.clear()
    try:
        ref_logits, ref = model.run_with_cache(IDS, names_filter=not_pattern)
    finally:
        set_fused_attention(model, True)
    assert not fused_calls
    assert sorted(fused.keys()) == sorted(ref.keys())
    assert any(name.endswith("attn.hook_z") for name in ref.keys())
    for name in ref.keys():
        diff = (fused[name] - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        assert diff <= 1e-5 * max(1.0, scale), f"{name}: {diff} (max |value| {scale})"
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_padding_mask_fused_equals_unfused(pair, fused_calls):
    _, model = pair
    mask = torch.ones_like(IDS)
    mask[1, :4] = 0  # left padding: those queries see no key at all (TransformerLens gives them z = 0)
    fused = model(IDS, attention_mask=mask)
    assert fused_calls
    set_fused_attention(model, False)
    try:
        ref = model(IDS, attention_mask=mask)
    finally:
        set_fused_attention(model, True)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hook", PATTERN_HOOKS)
@torch.no_grad()
def test_a_pattern_hook_fires_and_forces_the_unfused_path(pair, fused_calls, hook):
    _, model = pair
    attn_layers = [n for n, m in model.named_modules() if isinstance(m, FusedAttention)]
    seen = {}

    def record(value, hook):
        seen[hook.name] = value.shape
        return value * 0 if hook.name.endswith("hook_pattern") else value

    names = [f"{layer}.{hook}" for layer in attn_layers]
    hooked = model.run_with_hooks(IDS, fwd_hooks=[(name, record) for name in names])
    assert sorted(seen) == sorted(names)
    assert not fused_calls, "a hook on the pattern/scores must make every attention layer unfused"
    heads, pos = model.cfg.n_heads, IDS.shape[1]
    assert set(seen.values()) == {torch.Size([IDS.shape[0], heads, pos, pos])}
    fused_calls.clear()
    plain = model(IDS)
    assert fused_calls
    if hook == "hook_pattern":  # the edited pattern reaches the output
        assert not torch.allclose(hooked, plain, atol=1e-3)
    else:
        torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)


def test_weights_are_stored_in_hf_layout(pair):
    hf_model, model = pair
    block = model.blocks[0]
    for weight in (block.mlp.W_in, block.mlp.W_out) if hasattr(block.mlp, "W_in") else ():
        assert weight.T.is_contiguous()
    attn = next(m for m in model.modules() if isinstance(m, FusedAttention))
    assert attn.W_Q.transpose(1, 2).is_contiguous() and attn.W_O.permute(2, 0, 1).is_contiguous()
    moved = attn.to(torch.float64)
    assert moved.W_O.permute(2, 0, 1).is_contiguous()  # .to() keeps the layout
    moved.to(torch.float32)
