"""qscope_plugins.remote: torch-only, registered for remote traces, small requests, errors before sending."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest
import torch
from nnsight.modeling.transformers import TransformersModel
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

import qscope_plugins
from qscope_plugins import QwenScopeSAE, load_feature_subset, nnsight_api, remote
from qscope_plugins.integrations import nnsight as integration
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import tiny_config, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("sae_lens", "transformer_lens", "transformers")


class Recorder(Backend):
    """An nnsight backend that serializes the request exactly as a remote one would, and keeps it."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def __call__(self, tracer) -> None:
        self.blobs.append(RequestModel.serialize(tracer, compress=False))


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_remote_source_needs_only_torch():
    """What NDIF rebuilds is the module's own source: it must work with nothing but torch there."""
    result = _run_python(f"""
        import importlib.util, sys, types
        for name in {(*ABSENT, "nnsight", "qscope_plugins")!r}:
            sys.modules[name] = None
        spec = importlib.util.spec_from_file_location("shipped", {str(ROOT / "qscope_plugins" / "remote.py")!r})
        shipped = sys.modules["shipped"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shipped)
        import torch
        model = torch.nn.Module()
        model.config = types.SimpleNamespace(num_hidden_layers=3, hidden_size=8)
        model.model = torch.nn.Module()
        model.model.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
        print(shipped.layout(model), shipped.layer_module(model, 2) is model.model.layers[2])
        print(sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in {ABSENT + ("nnsight", "qscope_plugins")!r}))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Layout(path='model.layers', n_layers=3, d_model=8) True",
        "[]",
    ]


def test_package_module_imports_without_sae_lens_transformer_lens_transformers():
    result = _run_python(f"""
        import sys
        for name in {ABSENT!r}:
            sys.modules[name] = None
        import qscope_plugins.remote as remote
        print(remote.Layout("model.layers", 2, 8).check_layer(1))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_register_ships_remote_module_and_is_idempotent():
    qscope_plugins.register()
    assert integration.register() == []
    assert remote.__name__ in cloudpickle.list_registry_pickle_by_value()
    assert RequestModel.serialize.__func__._qscope_request_check is True


# ---------------------------------------------------------------- request size at d_model 5120
@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """Qwen3.5-27B's shape (d_model 5120, 64 layers, 3 linear-attention layers per full one) as an
    NDIF client holds it: built from its config alone, every weight on the meta device."""
    directory = tmp_path_factory.mktemp("qwen3_5_5120")
    layer_types = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 16
    config = tiny_config("Qwen3_5ForCausalLM", hidden_size=5120, num_hidden_layers=64, layer_types=layer_types)
    config.save_pretrained(directory)
    return TransformersModel(str(directory), tokenizer=tiny_tokenizer(), task="text-generation")


@pytest.fixture(scope="module")
def big_sae():
    """A full SAE at d_model 5120 (2048 of the 80K latents: already 80 MiB, far more than a request may carry)."""
    state = random_sae_state(5120, 2048, seed=1)
    return QwenScopeSAE.from_weights(**state, k=50, layer=20)


FEATURES = {3: 8.0, 17: -2.0, 100: 1.5, 256: 4.0, 511: 0.5, 777: 2.0, 1000: 3.0, 1500: -1.0, 1999: 6.0, 2047: 1.0}


def test_steering_request_with_10_features_at_d_model_5120_is_under_1_mb(big_model, big_sae):
    push = nnsight_api.steering(big_model, 20, sae=big_sae, features=FEATURES, positions=[-1])
    expected = sum(c * big_sae.W_dec[f] for f, c in FEATURES.items())
    torch.testing.assert_close(push.vector, expected, rtol=1e-5, atol=1e-5)
    recorder = Recorder()
    with big_model.trace("The capital of France is", backend=recorder):
        remote.apply(big_model, [push])
        logits = big_model.lm_head.output.save()
    (blob,) = recorder.blobs
    assert len(blob) < 1_000_000, len(blob)


def test_encoder_rows_request_for_10_features_is_under_1_mb(big_model, big_sae, tmp_path):
    write_released_layer(tmp_path, 20, {k: v.contiguous() for k, v in random_sae_state(5120, 2048, seed=1).items()})
    subset = load_feature_subset(tmp_path, 20, list(FEATURES), k=50)
    rows = nnsight_api.encoder_rows(big_model, 20, subset)
    torch.testing.assert_close(rows.weight, big_sae.W_enc.T[list(FEATURES)])
    recorder = Recorder()
    with big_model.trace("The capital of France is", backend=recorder):
        pre = remote.pre_activations(big_model, rows).save()
    (blob,) = recorder.blobs
    assert len(blob) < 1_000_000, len(blob)


def test_full_sae_in_a_remote_trace_fails_before_sending(big_model, big_sae):
    recorder = Recorder()
    with pytest.raises(integration.RemoteRequestError) as err:
        with big_model.trace("The capital of France is", backend=recorder):
            codes = remote.encode(big_model, 20, big_sae).save()
    assert str(err.value).startswith(
        "this remote trace captures `big_sae`, a full SAE (80.0 MiB), which would travel with every request "
        "and cannot be imported on NDIF. Build what the trace needs before it starts: "
        "qscope_plugins.nnsight_api.steering(model, layer, sae=sae, features={...}) ships one d_model vector"
    )
    assert recorder.blobs == []


# ---------------------------------------------------------------- errors before sending (tiny model)
@pytest.fixture(scope="module")
def small():
    return TransformersModel(tiny_model("Qwen3ForCausalLM"), tokenizer=tiny_tokenizer(), task="text-generation")


def test_layer_out_of_range_fails_when_the_request_is_built(small):
    with pytest.raises(remote.LayerRangeError) as err:
        nnsight_api.steering(small, 4, vector=torch.ones(64))
    assert str(err.value) == (
        "layer 4 is out of range: this model has decoder layers 0..3 (at model.layers); Qwen-Scope file "
        "layer{n}.sae.pt reads the output of layer n, so pick an SAE and a layer in that range"
    )
    with pytest.raises(remote.LayerRangeError):
        nnsight_api.check_layers(small, [0, -1])


def test_hand_built_spec_out_of_range_fails_before_sending(small):
    recorder = Recorder()
    bad = remote.Steering(7, torch.ones(64))
    with pytest.raises(remote.LayerRangeError, match="layer 7 is out of range: this model has decoder layers 0..3"):
        with small.trace("hello", backend=recorder):
            remote.apply(small, [bad])
    assert recorder.blobs == []


def test_wrong_width_fails_before_sending(small):
    with pytest.raises(remote.LayoutError) as err:
        nnsight_api.steering(small, 1, vector=torch.ones(65))
    assert str(err.value) == (
        "the steering vector has width 65 but this model's residual stream has d_model 64: the SAE was "
        "trained on another backbone; use one made for this model"
    )


def test_unresolvable_layout_says_what_to_do():
    hf = tiny_model("Qwen3ForCausalLM")
    del hf.model.layers[3]  # three layers left; the config still declares four
    broken = TransformersModel(hf, tokenizer=tiny_tokenizer(), task="text-generation")
    with pytest.raises(remote.LayoutError) as err:
        nnsight_api.steering(broken, 0, vector=torch.ones(64))
    assert str(err.value) == (
        "cannot find the decoder layers of Qwen3ForCausalLM: tried model.layers, model.language_model.layers, "
        "language_model.layers, layers; found model.layers (3 modules), but the config declares "
        "num_hidden_layers=4. Load the checkpoint as a causal LM (AutoModelForCausalLM, or "
        "TransformersModel/LanguageModel on the repo id) so its text layers sit at one of these paths"
    )
    recorder = Recorder()
    push = remote.Steering(0, torch.ones(64))
    with pytest.raises(remote.LayoutError, match="cannot find the decoder layers"):
        with broken.trace("hello", backend=recorder):
            remote.apply(broken, [push])
    assert recorder.blobs == []


def test_objects_ndif_cannot_import_fail_before_sending(small, tmp_path):
    write_released_layer(tmp_path, 1, random_sae_state(64, 128))
    subset = load_feature_subset(tmp_path, 1, [5, 9], k=8)
    clamp = remote.Steering(1, fn=lambda h: h * 0)
    recorder = Recorder()
    with pytest.raises(integration.RemoteRequestError, match=r"captures `subset` \(FeatureSubset from qscope_plugins"):
        with small.trace("hello", backend=recorder):
            pre = subset.encode_pre(remote.residual(small, 1)).save()
    with pytest.raises(integration.RemoteRequestError, match=r"captures `nnsight_api` \(module qscope_plugins.nnsight_api\)"):
        with small.trace("hello", backend=recorder):
            nnsight_api.check_layers(small, [1])
    with pytest.raises(integration.RemoteRequestError, match="captures `clamp`, a Steering with a Python function"):
        with small.trace("hello", backend=recorder):
            remote.apply(small, [clamp])
    assert recorder.blobs == []


def test_captured_tensors_over_the_limit_fail_before_sending(small, monkeypatch):
    monkeypatch.setattr(integration, "MAX_CAPTURED_BYTES", 1000)
    weights = torch.zeros(64, 8)  # 2 KiB
    recorder = Recorder()
    with pytest.raises(integration.RemoteRequestError, match=r"captures 2.0 KiB of tensors \(limit 1000 B\)"):
        with small.trace("hello", backend=recorder):
            out = (remote.residual(small, 0) @ weights).save()
    assert recorder.blobs == []
