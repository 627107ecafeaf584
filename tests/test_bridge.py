"""All four Qwen text architectures in TransformerBridge / SAETransformerBridge against HF, offline.

Includes the published Qwen3.5 layout (``...ForConditionalGeneration``, text weights under
``model.language_model``) booted text-only with torchvision made unimportable.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import socket
import sys
import warnings

import pytest
import torch
import transformers
from sae_lens import SAETransformerBridge
from transformer_lens.model_bridge import TransformerBridge

from qscope_plugins.integrations import bridge as bridge_integration
from qscope_plugins.testing.tiny_models import (
    ARCHITECTURES,
    hf_generate_steered,
    hf_layer_outputs,
    save_checkpoint,
    tiny_model,
    tiny_tokenizer,
    tiny_topk_sae,
)

ATOL = 1e-4
STEER_LAYER = 2
MULTIMODAL = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
HUB_IDS = {  # a hub id of each family, never cached here: the hf_model= route must not fetch it
    "Qwen3ForCausalLM": "Qwen/Qwen3-1.7B-Base",
    "Qwen3MoeForCausalLM": "Qwen/Qwen3-30B-A3B-Base",
    "Qwen3_5ForCausalLM": "Qwen/Qwen3.5-2B-Base",
    "Qwen3_5MoeForCausalLM": "Qwen/Qwen3.5-35B-A3B-Base",
}
IDS = torch.tensor([[17, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33]])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # any import of it now fails


@pytest.fixture(scope="module", autouse=True)
def registered():
    return bridge_integration.register()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """arch -> (HF text model, text-layout dir, published multimodal-layout dir or None)."""
    out = {}
    for arch in ARCHITECTURES:
        model = tiny_model(arch, seed=5)
        text_dir = save_checkpoint(model, tmp_path_factory.mktemp(arch))
        mm_dir = save_checkpoint(model, tmp_path_factory.mktemp(f"{arch}-mm"), multimodal=True) if arch in MULTIMODAL else None
        out[arch] = (model, str(text_dir), mm_dir and str(mm_dir))
    return out


_BOOTED: dict[str, TransformerBridge] = {}


def boot(source: str, cls=TransformerBridge, **kwargs) -> TransformerBridge:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.boot_transformers(source, device="cpu", dtype=torch.float32, **kwargs)


def booted(hf, arch: str) -> TransformerBridge:
    if arch not in _BOOTED:
        _BOOTED[arch] = boot(hf[arch][1])
    return _BOOTED[arch]


def assert_matches_hf(bridge: TransformerBridge, hf_model) -> None:
    ref_logits, ref_layers = hf_layer_outputs(hf_model, IDS)
    logits, cache = bridge.run_with_cache(IDS)
    for n, ref in enumerate(ref_layers):
        torch.testing.assert_close(cache[f"blocks.{n}.hook_resid_post"], ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_register_is_idempotent():
    patched = TransformerBridge.boot_transformers
    first = bridge_integration.register()
    assert bridge_integration.register() == first
    assert TransformerBridge.boot_transformers is patched
    assert "TransformerBridge:Qwen3_5ForConditionalGeneration->Qwen3_5ForCausalLM" in first


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_local_directory_matches_hf(hf, arch):
    assert_matches_hf(booted(hf, arch), hf[arch][0])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_model_needs_no_hub(hf, arch, offline_hub):
    hf_model = tiny_model(arch, seed=5)  # the bridge rewires the model it wraps: keep the reference clean
    bridge = boot(HUB_IDS[arch], hf_model=hf_model, tokenizer=tiny_tokenizer())
    assert bridge.original_model is hf_model
    assert_matches_hf(bridge, hf[arch][0])


@pytest.mark.parametrize("route", ("directory", "hf_model"))
@pytest.mark.parametrize("arch", MULTIMODAL)
def test_published_multimodal_layout_boots_text_only(hf, arch, route, no_torchvision):
    hf_model, _, mm_dir = hf[arch]
    if route == "hf_model":
        mm_class = getattr(transformers, arch.replace("ForCausalLM", "ForConditionalGeneration"))
        mm_model = mm_class.from_pretrained(mm_dir)
        bridge = boot(mm_dir, hf_model=mm_model)
        # the text-only model shares the multimodal model's modules: no copy
        assert bridge.original_model.model is mm_model.model.language_model
    else:
        bridge = boot(mm_dir)
    assert bridge.cfg.architecture == arch
    assert_matches_hf(bridge, hf_model)


@pytest.mark.parametrize("arch", MULTIMODAL)
def test_explicit_architectures_override_is_left_alone(hf, arch, no_torchvision):
    """Naming the multimodal class yourself reaches TransformerLens's own (torchvision) adapter."""
    mm_arch = arch.replace("ForCausalLM", "ForConditionalGeneration")
    with pytest.raises(ImportError):
        boot(hf[arch][2], hf_config_overrides={"architectures": [mm_arch]})


@pytest.mark.parametrize("use_cache", (True, False), ids=("cache", "no_cache"))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_steered_generation_matches_hf(hf, arch, use_cache):
    hf_model = hf[arch][0]
    vector = 4 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    expected = hf_generate_steered(hf_model, IDS, STEER_LAYER, vector, max_new_tokens=8, use_cache=use_cache)
    unsteered = hf_generate_steered(hf_model, IDS, STEER_LAYER, 0 * vector, max_new_tokens=8, use_cache=use_cache)
    assert not torch.equal(expected, unsteered)  # the vector matters, so the comparison can fail

    bridge = booted(hf, arch)
    with bridge.hooks(fwd_hooks=[(f"blocks.{STEER_LAYER}.hook_resid_post", lambda resid, hook: resid + vector)]):
        got = bridge.generate(IDS, max_new_tokens=8, do_sample=False, stop_at_eos=False, use_past_kv_cache=use_cache, verbose=False)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", MULTIMODAL)
def test_sae_bridge_reads_text_layer_output_of_published_checkpoint(hf, arch, no_torchvision):
    hf_model, _, mm_dir = hf[arch]
    bridge = boot(mm_dir, cls=SAETransformerBridge)
    assert isinstance(bridge, SAETransformerBridge)
    sae = tiny_topk_sae(64, f"blocks.{STEER_LAYER}.hook_resid_post")
    bridge.add_sae(sae, use_error_term=True)
    ref_logits, ref_layers = hf_layer_outputs(hf_model, IDS)
    logits, cache = bridge.run_with_cache(IDS)
    torch.testing.assert_close(cache[bridge.get_sae_hook_name(sae, "hook_sae_input")], ref_layers[STEER_LAYER], atol=ATOL, rtol=0)
    assert cache[bridge.get_sae_hook_name(sae)].count_nonzero(-1).max() == 8
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)  # error term: output unchanged
