"""Shared by the tests: a hooked model checked against HF (layer by layer, in generation) and one tiny model
behind every backend."""

from __future__ import annotations

import pytest
import torch

from qscope_plugins.backends import as_backend, backend_class
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.testing.tiny_models import hf_generate_steered, hf_layer_outputs, tiny_model, tiny_tokenizer

ATOL = 1e-4
HELLO_IDS = torch.tensor([[17, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33]])
"""A 14-token prompt (byte ids of the tiny tokenizer), none of them the pad id 0."""


def assert_matches_hf(model, hf_model, ids: torch.Tensor, *, atol: float = ATOL, centered_logits: bool = False,
                      **run_kwargs) -> None:
    """``model.run_with_cache(ids)``: every ``blocks.{n}.hook_resid_post`` equals HF decoder layer n's output and
    the logits equal HF's (``centered_logits``: minus each position's mean, as ``center_unembed`` makes them)."""
    with torch.no_grad():
        ref_logits, ref_layers = hf_layer_outputs(hf_model, ids)
        logits, cache = model.run_with_cache(ids, **run_kwargs)
    for n, ref in enumerate(ref_layers):
        torch.testing.assert_close(cache[f"blocks.{n}.hook_resid_post"], ref, atol=atol, rtol=0, msg=f"layer {n}")
    if centered_logits:
        ref_logits = ref_logits - ref_logits.mean(-1, keepdim=True)
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=0)


def assert_steered_generation_matches_hf(model, hf_model, ids: torch.Tensor, layer: int, vector: torch.Tensor, *,
                                         max_new_tokens: int, use_cache: bool) -> None:
    """Greedy generation with ``vector`` added at ``blocks.{layer}.hook_resid_post`` equals HF's, token for token;
    the vector must change HF's output, so the comparison can fail."""
    expected = hf_generate_steered(hf_model, ids, layer, vector, max_new_tokens=max_new_tokens, use_cache=use_cache)
    unsteered = hf_generate_steered(hf_model, ids, layer, 0 * vector, max_new_tokens=max_new_tokens, use_cache=use_cache)
    assert not torch.equal(expected, unsteered)
    with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", lambda resid, hook: resid + vector)]):
        got = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=False,
                             use_past_kv_cache=use_cache, verbose=False)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ---- one tiny Qwen3 behind every backend -------------------------------------------------------------------------
BACKEND_KINDS = ("hf", "bridge", "hooked", "nnsight")


@pytest.fixture(scope="module")
def model():
    """A tiny random Qwen3 (import this fixture into a test module to use it)."""
    return tiny_model("Qwen3ForCausalLM", seed=3)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_backend(kind: str, model, tok):
    """A backend of ``kind`` (one of :data:`BACKEND_KINDS`) over the same HF weights; skips when that backend is
    not available.

    The framework backends get their own tokenizer: booting a bridge sets ``bos_token`` on the tokenizer it is
    given, in place (token ids are unchanged; Qwen prompts get no BOS either way).
    """
    if kind == "hf":
        return HFBackend(model, tok)
    tok = tiny_tokenizer()
    if kind == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        return as_backend(TransformerBridge.boot_transformers("tiny-qwen3", hf_model=model, tokenizer=tok))
    if kind == "hooked":
        integration = pytest.importorskip("qscope_plugins.integrations.transformer_lens")
        from transformer_lens import HookedTransformer

        integration.register()
        return as_backend(HookedTransformer.from_pretrained_no_processing("tiny-qwen3", hf_model=model, tokenizer=tok))
    try:
        return backend_class(kind)(model, tokenizer=tok)
    except ValueError as err:
        pytest.skip(str(err))
