"""All four Qwen text architectures in TransformerBridge / SAETransformerBridge against HF, offline.

Includes the published Qwen3.5 layout (``...ForConditionalGeneration``, text weights under
``model.language_model``) booted text-only with torchvision made unimportable.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import inspect
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from sae_lens import SAETransformerBridge
from transformer_lens.model_bridge import TransformerBridge

from qscope_plugins.integrations import _compat
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

from _helpers import ATOL, assert_matches_hf, assert_steered_generation_matches_hf
from _helpers import HELLO_IDS as IDS

pytestmark = pytest.mark.usefixtures("no_network")
STEER_LAYER = 2
MULTIMODAL = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
HUB_IDS = {  # a hub id of each family, never cached here: the hf_model= route must not fetch it
    "Qwen3ForCausalLM": "Qwen/Qwen3-1.7B-Base",
    "Qwen3MoeForCausalLM": "Qwen/Qwen3-30B-A3B-Base",
    "Qwen3_5ForCausalLM": "Qwen/Qwen3.5-2B-Base",
    "Qwen3_5MoeForCausalLM": "Qwen/Qwen3.5-35B-A3B-Base",
}


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


def test_register_is_idempotent():
    patched = TransformerBridge.boot_transformers
    first = bridge_integration.register()
    assert bridge_integration.register() == first
    assert TransformerBridge.boot_transformers is patched
    assert "TransformerBridge:Qwen3_5ForConditionalGeneration->Qwen3_5ForCausalLM" in first


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_local_directory_matches_hf(hf, arch):
    assert_matches_hf(booted(hf, arch), hf[arch][0], IDS)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_model_needs_no_hub(hf, arch, offline_hub):
    hf_model = tiny_model(arch, seed=5)  # the bridge rewires the model it wraps: keep the reference clean
    bridge = boot(HUB_IDS[arch], hf_model=hf_model, tokenizer=tiny_tokenizer())
    assert bridge.original_model is hf_model
    assert_matches_hf(bridge, hf[arch][0], IDS)


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
    assert_matches_hf(bridge, hf_model, IDS)


@pytest.mark.parametrize("arch", MULTIMODAL)
def test_explicit_architectures_override_is_left_alone(hf, arch, no_torchvision):
    """Naming the multimodal class yourself reaches TransformerLens's own (torchvision) adapter."""
    mm_arch = arch.replace("ForCausalLM", "ForConditionalGeneration")
    with pytest.raises(ImportError):
        boot(hf[arch][2], hf_config_overrides={"architectures": [mm_arch]})


@pytest.mark.parametrize("use_cache", (True, False), ids=("cache", "no_cache"))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_steered_generation_matches_hf(hf, arch, use_cache):
    vector = 4 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert_steered_generation_matches_hf(booted(hf, arch), hf[arch][0], IDS, STEER_LAYER, vector, max_new_tokens=8,
                                         use_cache=use_cache)


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


# --- upstream workarounds (qscope_plugins.integrations._compat; docs/models.md, "Upstream behaviour") ---

KERNELS, GDN_CACHE, ATTN_CACHE = (
    "bridge-gated-delta-net-kernels", "bridge-gated-delta-net-cache-kwarg", "bridge-attention-cache-kwarg")


@contextlib.contextmanager
def workarounds_reverted():
    names = _compat.active()
    _compat.revert()
    try:
        yield names
    finally:
        assert _compat.apply() == names


def require_active(name):
    if name not in _compat.active():
        pytest.skip(f"{name} does not apply to transformers {transformers.__version__}")


@pytest.mark.parametrize("arch", MULTIMODAL)
def test_linear_attention_prefill_path_matches_hf(hf, arch):
    """Without a cache the bridge runs its own Gated DeltaNet forward, which fires the interior hooks."""
    bridge, hf_model = booted(hf, arch), hf[arch][0]
    _, cache = bridge.run_with_cache(IDS, use_cache=False)
    linear = [n for n, kind in enumerate(hf_model.config.layer_types) if kind == "linear_attention"]
    assert linear and all(f"blocks.{n}.linear_attn.hook_recurrence_out" in cache for n in linear)
    assert_matches_hf(bridge, hf_model, IDS, use_cache=False)


@pytest.mark.parametrize("use_cache", (True, False), ids=("cache", "no_cache"))
def test_left_padded_hybrid_generation_matches_unpadded_hf(hf, use_cache):
    """Qwen3.5's linear-attention layers see the padding mask (test_backends covers dense Qwen3)."""
    arch = "Qwen3_5ForCausalLM"
    hf_model, rows = hf[arch][0], [IDS[0].tolist(), [40, 41, 42], [7, 8, 9, 10, 11, 12]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    expected = [hf_model.generate(torch.tensor([r]), max_new_tokens=6, do_sample=False)[0, len(r):] for r in rows]
    got = booted(hf, arch).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, stop_at_eos=False,
                                    use_past_kv_cache=use_cache, verbose=False)[:, width:]
    torch.testing.assert_close(got, torch.stack(expected), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("transformers_version", "tl_version", "expected"),
    [
        ("5.9.0", "3.9.0", set()),
        ("5.14.1", "3.9.0", set()),
        ("5.15.0", "3.9.0", {KERNELS}),
        ("5.23.0", "3.9.0", {KERNELS}),
        ("5.24.0", "3.9.0", {KERNELS, GDN_CACHE, ATTN_CACHE}),
        ("5.24.0", "4.3.0", set()),  # not read against TransformerLens 4: left alone
    ],
)
def test_workarounds_apply_only_where_the_upstream_behaviour_exists(monkeypatch, transformers_version, tl_version,
                                                                     expected):
    versions = {"transformers": transformers_version, "transformer-lens": tl_version}
    monkeypatch.setattr(_compat, "installed", versions.get)
    assert {w.name for w in _compat.WORKAROUNDS if w.applies()} == expected


def test_workarounds_are_idempotent_and_reversible():
    def attributes():
        return {w.name: inspect.getattr_static(w.target(), w.attribute) for w in _compat.WORKAROUNDS}

    names, wrapped = _compat.active(), attributes()
    assert _compat.apply() == names and attributes() == wrapped  # applying twice wraps nothing twice
    with workarounds_reverted():
        assert _compat.active() == []
        originals = attributes()
        for w in _compat.WORKAROUNDS:
            assert originals[w.name].__module__.startswith("transformer_lens.")
            assert (originals[w.name] is wrapped[w.name]) == (w.name not in names)
    rewrapped = attributes()  # apply() again: fresh wrappers around the same originals
    assert [n for n in rewrapped if rewrapped[n] is not originals[n]] == names
    assert [f"workaround:{n}" for n in names] == [r for r in bridge_integration.register() if r.startswith("workaround:")]


def test_cache_workarounds_leave_other_models_alone():
    """The `cache` -> `past_key_values` hand-over happens only for the Qwen modelling modules' layers."""
    qwen = type("Qwen3Attention", (), {"__module__": "transformers.models.qwen3.modeling_qwen3"})()
    llama = type("LlamaAttention", (), {"__module__": "transformers.models.llama.modeling_llama"})()
    seen = []
    update = _compat._attention_sees_cache(lambda self, k, v, **kw: seen.append(kw) or (k, v))
    forward = _compat._gated_delta_net_sees_cache(lambda self, *a, **kw: "bridge's own forward")
    cache = object()
    for module, handed_over in ((qwen, True), (llama, False)):
        seen.clear()
        component = SimpleNamespace(original_component=module, _native_forward=lambda *a, **kw: "HF forward")
        update(component, 1, 2, cache=cache)
        assert (seen[0].get("past_key_values") is cache) == handed_over
        assert forward(component, cache=cache) == ("HF forward" if handed_over else "bridge's own forward")
        assert forward(component, cache=None) == "bridge's own forward"


@pytest.mark.parametrize("arch", MULTIMODAL)
def test_kernel_attributes_exist_only_during_the_bridge_forward(hf, arch):
    """The HF module gets the two attributes the bridge reads for one call, unless HF has them itself."""
    names = ("causal_conv1d_fn", "chunk_gated_delta_rule")
    hf_gdn = next(layer.linear_attn for layer in hf[arch][0].model.layers if hasattr(layer, "linear_attn"))
    native = {name: name in vars(hf_gdn) for name in names}  # transformers < 5.15 sets both in __init__
    seen = {}

    def look(self):
        seen.clear()
        seen.update({name: getattr(self.original_component, name, "missing") for name in names})

    wrapped = _compat._gated_delta_net_kernels(look)
    wrapped(SimpleNamespace(original_component=hf_gdn))
    for name in names:
        assert seen[name] != "missing"
        assert native[name] or callable(seen[name])
        assert (name in vars(hf_gdn)) == native[name]  # nothing left behind
    wrapped(SimpleNamespace(original_component=torch.nn.Linear(2, 2)))  # not a Qwen module: untouched
    assert seen == {name: "missing" for name in names}


def test_without_the_kernel_workaround_the_prefill_path_fails(hf):
    """Canary: the upstream behaviour the workaround covers is still there on this version."""
    require_active(KERNELS)
    bridge = booted(hf, "Qwen3_5ForCausalLM")
    with workarounds_reverted(), pytest.raises(AttributeError, match="causal_conv1d_fn"):
        bridge(IDS, use_cache=False)


def test_without_the_cache_workaround_cached_generation_diverges(hf):
    """Canary: with transformers' `cache=` argument unread, every cached step attends to itself alone."""
    require_active(ATTN_CACHE)
    arch = "Qwen3ForCausalLM"
    expected = hf_generate_steered(hf[arch][0], IDS, STEER_LAYER, torch.zeros(64), max_new_tokens=8)
    bridge = booted(hf, arch)
    with workarounds_reverted():
        got = bridge.generate(IDS, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert not torch.equal(got, expected)
    got = bridge.generate(IDS, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("use_cache", (True, False), ids=("cache", "no_cache"))
def test_rewired_hf_model_still_generates_like_hf(use_cache):
    """`boot_transformers(hf_model=m)` puts bridge components inside `m`; HF's (and so nnsight's) own
    `m.generate` runs through them and must still equal an untouched model's."""
    arch = "Qwen3_5ForCausalLM"
    expected = tiny_model(arch, seed=5).generate(IDS, max_new_tokens=6, do_sample=False, use_cache=use_cache)
    model = tiny_model(arch, seed=5)
    boot("tiny-qwen3.5", hf_model=model, tokenizer=tiny_tokenizer())
    assert type(model.model.layers[0].linear_attn).__module__.startswith("transformer_lens.")
    got = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=use_cache)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
