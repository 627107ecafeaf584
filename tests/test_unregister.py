"""``unregister()``: every patched name is the framework's own object again, every registered class,
converter and module is gone, ``register()`` redoes it; and registration leaves models that are not
Qwen's exactly as the frameworks alone handle them.

Import state is per process, so each scenario runs in a fresh interpreter that prints JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qscope_plugins.integrations import _compat
from qscope_plugins.testing.tiny_models import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- register -> unregister -> register
ROUND_TRIP = """
import importlib, json, sys, types, warnings
warnings.simplefilter("ignore")
import cloudpickle, nnsight, sae_lens, transformer_lens
import nnsight.schema.request, transformer_lens.model_bridge, transformer_lens.loading_from_pretrained
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens import registry
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

WATCHED = ("sae_lens", "transformer_lens", "nnsight")
REGISTRIES = {
    "NAMED_PRETRAINED_SAE_LOADERS": loaders.NAMED_PRETRAINED_SAE_LOADERS,
    "NAMED_PRETRAINED_SAE_CONFIG_GETTERS": loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
    "SAE_CLASS_REGISTRY": registry.SAE_CLASS_REGISTRY,
    "SAE_TRAINING_CLASS_REGISTRY": registry.SAE_TRAINING_CLASS_REGISTRY,
    "ArchitectureAdapterFactory._adapters": ArchitectureAdapterFactory._adapters,
}

def namespaces():
    # Every module of the three frameworks loaded now, every class they define, and their registries.
    out = {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in WATCHED:
            continue
        out[name] = dict(vars(module))
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == name:
                out[f"{name}.{value.__qualname__}"] = dict(vars(value))
    out.update({f"[{k}]": dict(v) for k, v in REGISTRIES.items()})
    out["[pickle by value]"] = dict.fromkeys(cloudpickle.list_registry_pickle_by_value())
    return out

def changes(before, after):
    # (namespace.key) that differ; keys only added that are submodules are ignored (imports).
    found = []
    for space, old in before.items():
        new = after.get(space, {})
        for key in old.keys() | new.keys():
            if key not in new or key not in old:
                if not isinstance(new.get(key), types.ModuleType):
                    found.append(f"{space}:{key}")
            elif new[key] is not old[key]:
                found.append(f"{space}:{key}")
    return sorted(found)

original = namespaces()
import qscope_plugins  # registers with the three, already imported
status = qscope_plugins.registration_status()
registered = namespaces()
patched = sorted(p for s in status.values() for items in s.patched.values() for p in items)
undone = qscope_plugins.unregister()
restored = namespaces()
import qscope_plugins.sae  # a later import of a watched module does not register again
after_import = {k: v.state for k, v in qscope_plugins.registration_status().items()}
again = qscope_plugins.unregister()
redone = qscope_plugins.register()
reregistered = namespaces()
states = {k: v.state for k, v in qscope_plugins.registration_status().items()}
# the per-framework form: only nnsight undone, the rest left registered
nnsight_only = qscope_plugins.unregister("nnsight")
partial = {k: v.state for k, v in qscope_plugins.registration_status().items()}
print(json.dumps({
    "changed": changes(original, registered), "patched": patched, "undone": undone,
    "left": changes(original, restored), "after_import": after_import, "again": again,
    "redone": {k: bool(v) for k, v in redone.items()}, "rechanged": changes(original, reregistered),
    "states": states, "nnsight_only": nnsight_only, "partial": partial,
}))
"""


@pytest.fixture(scope="module")
def round_trip():
    return _run(ROUND_TRIP)


def test_registration_changes_exactly_what_it_lists(round_trip):
    loaders = "[NAMED_PRETRAINED_SAE_LOADERS]"
    getters = "[NAMED_PRETRAINED_SAE_CONFIG_GETTERS]"
    expected_patches = {
        "transformer_lens.loading_from_pretrained:get_official_model_name":
            "transformer_lens.loading_from_pretrained.get_official_model_name",
        "transformer_lens.loading_from_pretrained:get_pretrained_model_config":
            "transformer_lens.loading_from_pretrained.get_pretrained_model_config",
        "transformer_lens.loading_from_pretrained:get_pretrained_state_dict":
            "transformer_lens.loading_from_pretrained.get_pretrained_state_dict",
        "transformer_lens.HookedTransformer:TransformerBlock": "transformer_lens.HookedTransformer.TransformerBlock",
        "transformer_lens.HookedTransformer.HookedTransformer:from_pretrained":
            "transformer_lens.HookedTransformer.HookedTransformer.from_pretrained",
        "transformer_lens.HookedTransformer.HookedTransformer:load_and_process_state_dict":
            "transformer_lens.HookedTransformer.HookedTransformer.load_and_process_state_dict",
        "transformer_lens.model_bridge.bridge.TransformerBridge:boot_transformers":
            "transformer_lens.model_bridge.bridge.TransformerBridge.boot_transformers",
        "sae_lens.analysis.hooked_sae_transformer.HookedSAETransformer:add_sae":
            "sae_lens.analysis.hooked_sae_transformer.HookedSAETransformer.add_sae",
        "nnsight.schema.request.RequestModel:serialize": "nnsight.schema.request.RequestModel.serialize",
    }
    for w in _compat.WORKAROUNDS:  # the upstream workarounds that apply to the installed versions
        if w.applies():
            module, cls = w.owner.split(":")
            expected_patches[f"{module}.{cls}:{w.attribute}"] = f"{module}.{cls}.{w.attribute}"
    registered = {
        f"{loaders}:qscope", f"{loaders}:qwen_scope", f"{getters}:qscope", f"{getters}:qwen_scope",
        "[SAE_CLASS_REGISTRY]:qwen_scope_topk", "[SAE_TRAINING_CLASS_REGISTRY]:qwen_scope_topk",
        "[pickle by value]:qscope_plugins.remote",
    }
    assert set(round_trip["changed"]) == set(expected_patches) | registered
    assert round_trip["patched"] == sorted(expected_patches.values())  # what registration_status() lists


def test_unregister_restores_every_original_object(round_trip):
    assert round_trip["left"] == []  # identity: each name holds the object it held before registration
    undone = round_trip["undone"]
    assert list(undone) == ["nnsight", "bridge", "transformer_lens", "saelens"]  # last registered, first undone
    assert "sae_lens.analysis.hooked_sae_transformer.HookedSAETransformer.add_sae" in undone["saelens"]
    assert "nnsight.register(qscope_plugins.remote)" in undone["nnsight"]
    assert round_trip["after_import"] == dict.fromkeys(("sae_lens", "transformer_lens", "nnsight"), "unregistered")
    assert round_trip["again"] == dict.fromkeys(undone, [])  # idempotent


def test_register_after_unregister_changes_the_same_names(round_trip):
    assert round_trip["redone"] == dict.fromkeys(("saelens", "transformer_lens", "bridge", "nnsight"), True)
    assert round_trip["rechanged"] == round_trip["changed"]
    assert round_trip["states"] == dict.fromkeys(("sae_lens", "transformer_lens", "nnsight"), "registered")
    assert list(round_trip["nnsight_only"]) == ["nnsight"] and round_trip["nnsight_only"]["nnsight"]
    assert round_trip["partial"] == {"sae_lens": "registered", "transformer_lens": "registered",
                                     "nnsight": "unregistered"}


def test_unregister_names_an_unknown_framework():
    import qscope_plugins

    with pytest.raises(ValueError, match="unknown framework 'torchlens': expected one of nnsight, sae_lens, "):
        qscope_plugins.unregister("torchlens")


# ---------------------------------------------------------------- other models: as the frameworks alone do
PARITY = """
import hashlib, json, os, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
mode, root = sys.argv[1], Path(sys.argv[2])
os.environ["HF_HUB_CACHE"] = str(root / "hub")  # a hub cache holding only a tiny config named gpt2
if mode != "without":
    import qscope_plugins
import torch
torch.set_num_threads(1)
import nnsight
import transformers
from sae_lens import SAE, HookedSAETransformer, TopKSAE, TopKSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge
if mode == "unregistered":
    qscope_plugins.unregister()
out = {"qscope_imported": "qscope_plugins" in sys.modules}
if mode != "without":
    out["states"] = sorted({s.state for s in qscope_plugins.registration_status().values()})

def digest(t):
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]

tok = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
ids = torch.tensor([[5, 70, 101, 108, 108, 111, 44, 32, 119]])
torch.manual_seed(0)
llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64)).eval()
llama_dir = root / f"llama-{mode}"
llama.save_pretrained(llama_dir)
tok.save_pretrained(llama_dir)

# HookedTransformer: built from a config, processed, and from_pretrained of an official name / a local dir
cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=300, act_fn="gelu",
                              normalization_type="LN", seed=0)
ht = HookedTransformer(cfg)
processed = HookedTransformer(cfg)
processed.load_and_process_state_dict(ht.state_dict(), fold_ln=True, center_writing_weights=True)
torch.manual_seed(2)
gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=300, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4)).eval()
official = HookedTransformer.from_pretrained("gpt2", hf_model=gpt2, tokenizer=tok, device="cpu")
try:
    HookedTransformer.from_pretrained(str(llama_dir))
except ValueError as err:
    local_error = str(err).replace(str(llama_dir), "<dir>")[:120]
out["hooked"] = [digest(ht(ids)), digest(processed(ids)), sorted(processed.state_dict()), digest(official(ids)),
                 local_error]

# TransformerBridge: a local directory and hf_model=
bridge = TransformerBridge.boot_transformers(str(llama_dir), device="cpu")
logits, cache = bridge.run_with_cache(ids)
wrapped = TransformerBridge.boot_transformers("meta-llama/Llama-3.2-1B", hf_model=llama, tokenizer=tok, device="cpu")
out["bridge"] = [bridge.cfg.architecture, type(bridge.adapter).__name__, digest(logits),
                 digest(cache["blocks.1.hook_resid_post"]), wrapped.original_model is llama, digest(wrapped(ids))]

# SAELens: a TopK SAE saved and loaded back, on a HookedSAETransformer
torch.manual_seed(1)
sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4))
with torch.no_grad():
    for p in sae.parameters():
        p.normal_()
sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
sae.save_model(root / f"sae-{mode}")
loaded = SAE.load_from_disk(root / f"sae-{mode}")
hooked_sae = HookedSAETransformer(cfg)
hooked_sae.load_state_dict(ht.state_dict(), strict=False)
hooked_sae.add_sae(loaded)
_, sae_cache = hooked_sae.run_with_cache(ids)
out["saelens"] = [type(loaded).__name__, digest(loaded.encode(torch.ones(2, 32))), digest(hooked_sae(ids)),
                  digest(sae_cache["blocks.1.hook_resid_post.hook_sae_acts_post"])]

# nnsight: a local trace, and a simulated remote one (serialized through RequestModel.serialize)
lm = nnsight.LanguageModel(llama, tokenizer=tok)
with lm.trace(ids):
    local = lm.model.layers[1].output.save()
with lm.trace(ids, remote="local"):
    simulated = lm.model.layers[1].output.save()
out["nnsight"] = [digest(local), digest(simulated)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parity_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    import transformers

    snapshot = root / "hub" / "models--gpt2" / "snapshots" / ("0" * 40)
    transformers.GPT2Config(vocab_size=300, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4,
                            architectures=["GPT2LMHeadModel"]).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return root


@pytest.fixture(scope="module")
def without(parity_root):
    return _run(PARITY, "without", str(parity_root))


@pytest.mark.parametrize("mode", ["registered", "unregistered"])
def test_models_that_are_not_qwen_are_untouched(parity_root, without, mode):
    """A tiny Llama and GPT-2 (random weights, no hub) through HookedTransformer, TransformerBridge,
    SAELens and nnsight: bit-identical results with qscope-plugins registered, unregistered, or never imported."""
    got, without = _run(PARITY, mode, str(parity_root)), dict(without)
    assert without.pop("qscope_imported") is False and got.pop("qscope_imported") is True
    assert got.pop("states") == ["registered" if mode == "registered" else "unregistered"]
    assert got == without
    assert without["bridge"][:2] == ["LlamaForCausalLM", "LlamaArchitectureAdapter"]
    assert without["hooked"][4].startswith("<dir> not found. Valid official model names")
    assert without["nnsight"][0] == without["nnsight"][1] == without["bridge"][3]  # the same layer, three ways
