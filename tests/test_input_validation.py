"""``load_sae`` refuses wrong argument types and inconsistent files with one clear message.

k and layers: Python or NumPy integers (``argsort`` output) pass; bools, floats do not. Feature
lists: a non-empty flat list of distinct ints. Every tensor read is checked finite, feature
subsets included. A converted sidecar must be an object whose fields agree with each other and
with the weights, whose recorded sha256 they still have.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from qscope_plugins.sae import QwenScopeSAE, SAEFormatError, load_feature_subset, load_sae
from qscope_plugins.sae.convert import convert
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer

NAME = "SAE-Res-Tiny-W1K-L0_8"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation") / NAME
    write_released_layer(root, 1, random_sae_state(16, 1024, seed=1))
    return root


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    convert(str(released), out, [1])
    return out / "layer1"


@pytest.mark.parametrize("k, error, message", [
    (True, TypeError, "k must be an int, got bool True"),
    (2.5, TypeError, "k must be an int, got float 2.5"),
    ("8", TypeError, "k must be an int, got str '8'"),
    (0, ValueError, "k must be a positive int, got 0"),
    (-3, ValueError, "k must be a positive int, got -3"),
    (2000, ValueError, "k=2000 must be in [1, d_sae=1024]"),
])
def test_bad_k(released, k, error, message):
    with pytest.raises(error, match=_re(message)):
        load_sae(released, 1, k=k)


def test_numpy_integers_are_layers_and_k(released):
    order = np.argsort(np.array([5.0, 1.0, 3.0]))  # int64 array: [1, 2, 0]
    sae = load_sae(released, order[0], k=np.int32(4))
    assert sae.cfg.k == 4 and isinstance(sae.cfg.k, int) and sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert load_feature_subset(released, torch.tensor(1), [2]).ids.tolist() == [2]


@pytest.mark.parametrize("layer, error, message", [
    (True, TypeError, "layer must be an int, got bool True"),
    (1.0, TypeError, "layer must be an int, got float 1.0"),
    (-1, ValueError, "layer must be a non-negative int, got -1"),
])
def test_bad_layer(released, layer, error, message):
    with pytest.raises(error, match=_re(message)):
        load_sae(released, layer)


@pytest.mark.parametrize("features, error, message", [
    ([], ValueError, "features is empty"),
    ([1.7], TypeError, "feature id must be an int, got float 1.7"),
    ([True], TypeError, "feature id must be an int, got bool True"),
    ([[1, 2]], TypeError, "features must be a flat list of ids, got a nested list [1, 2]"),
    (5, TypeError, "features must be a list of int feature ids, got int"),
    ("12", TypeError, "features must be a list of int feature ids, got str"),
    (torch.tensor([1.0]), TypeError, "features must hold integer ids, got a torch.float32 tensor"),
    (torch.tensor([[1]]), ValueError, "features must be a flat list of ids, got a tensor of shape (1, 1)"),
    ([1024], ValueError, "feature id 1024 out of range [0, 1024)"),
    ([-1], ValueError, "feature id -1 out of range [0, 1024)"),
])
@pytest.mark.parametrize("kind", ["released", "converted"])
def test_bad_feature_lists(released, converted, kind, features, error, message):
    source = released if kind == "released" else converted
    with pytest.raises(error, match=_re(message)):
        load_feature_subset(source, 1, features)


def test_repeated_feature_ids_are_dropped_with_a_warning(released, converted):
    """Issue 17: ids are de-duplicated (first occurrence kept) and range-checked before any row is read."""
    for source in (released, converted):
        with pytest.warns(UserWarning, match=_re("features: 1 repeated ids dropped (2 distinct kept")):
            assert load_feature_subset(source, 1, [3, 7, 3]).ids.tolist() == [3, 7]


def test_good_feature_lists(released, converted):
    for source in (released, converted):
        for features in ([5, 2], np.array([5, 2]), torch.tensor([5, 2]), (np.int64(5), 2)):
            assert load_feature_subset(source, 1, features).ids.tolist() == [5, 2]


@pytest.mark.parametrize("key", ["b_enc", "b_dec"])
@pytest.mark.parametrize("kind", ["released", "converted"])
def test_non_finite_biases_are_refused_in_subsets_too(tmp_path, key, kind):
    state = random_sae_state(16, 1024, seed=2)
    state[key][7] = float("inf") if key == "b_dec" else float("nan")
    source = tmp_path / NAME
    write_released_layer(source, 1, state)
    if kind == "converted":
        source = tmp_path / "sidecar_checked"
        with pytest.raises(SAEFormatError):  # converting reads the full SAE, which refuses it too
            convert(str(tmp_path / NAME), source, [1])
        return
    with pytest.raises(SAEFormatError, match=f"key '{key}' holds non-finite values"):
        load_feature_subset(source, 1, [7])
    with pytest.raises(SAEFormatError, match=f"key '{key}' holds non-finite values"):
        load_sae(source, 1)


def _mutated(converted, tmp_path, cfg=None, weights=None):
    target = tmp_path / "layer1"
    shutil.copytree(converted, target)
    if cfg is not None:
        (target / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if weights is not None:
        (target / "sae_weights.safetensors").write_bytes(weights)
    return target


@pytest.mark.parametrize("change, message", [
    (lambda s: 3, "expected a JSON object, got int"),
    (lambda s: [s], "expected a JSON object, got list"),
    (lambda s: "d_sae", "expected a JSON object, got str"),
    (lambda s: {**s, "d_sae": "1024"}, "key 'd_sae' must be a positive integer, got '1024'"),
    (lambda s: {**s, "d_in": 16.0}, "key 'd_in' must be a positive integer, got 16.0"),
    (lambda s: {**s, "k": False}, "key 'k' must be a positive integer, got False"),
    (lambda s: {**s, "k": 0}, "key 'k' must be a positive integer, got 0"),
    (lambda s: {**s, "k": 2048}, "k=2048 is larger than d_sae=1024"),
    (lambda s: {k: v for k, v in s.items() if k != "d_in"}, "missing key 'd_in'"),
    (lambda s: {**s, "qscope": []}, "key 'qscope' must be an object, got list"),
    (lambda s: {**s, "qscope": {**s["qscope"], "k": 9}}, "qscope.k=9 disagrees with k=8"),
    (lambda s: {**s, "qscope": {**s["qscope"], "d_sae": 4}}, "qscope.d_sae=4 disagrees with d_sae=1024"),
    (lambda s: {**s, "qscope": {**s["qscope"], "weights_sha256": 7}}, "qscope.weights_sha256 must be a hex sha256"),
    (lambda s: {**s, "metadata": "x"}, "key 'metadata' must be an object"),
    (lambda s: {**s, "d_sae": 512, "qscope": {**s["qscope"], "d_sae": 512}},
     "key 'W_enc' has shape (16, 1024), expected (16, 512)"),
])
def test_inconsistent_sidecars(converted, tmp_path, change, message):
    sidecar = json.loads((converted / "cfg.json").read_text())
    target = _mutated(converted, tmp_path, cfg=json.dumps(change(sidecar)))
    with pytest.raises(SAEFormatError, match=_re(message)):
        load_sae(target, 1)


def test_sidecar_hash_must_match_the_weights(converted, tmp_path):
    sidecar = json.loads((converted / "cfg.json").read_text())
    target = _mutated(converted, tmp_path)
    assert isinstance(load_sae(target, 1), QwenScopeSAE)  # the recorded hash matches: loads
    sidecar["qscope"]["weights_sha256"] = "f" * 64
    (target / "cfg.json").write_text(json.dumps(sidecar))
    with pytest.raises(SAEFormatError, match="does not match the cfg.json record .* re-run qscope convert"):
        load_sae(target, 1)


def test_corrupt_safetensors_header(converted, tmp_path):
    sidecar = json.loads((converted / "cfg.json").read_text())
    del sidecar["qscope"]["weights_sha256"]
    raw = (converted / "sae_weights.safetensors").read_bytes()
    for weights in (b"\xff" * 8 + raw[8:], raw[:8] + b"{" * 64, b"short"):
        target = _mutated(converted, tmp_path / str(len(weights)), cfg=sidecar, weights=weights)
        with pytest.raises(SAEFormatError, match="not a readable safetensors file"):
            load_sae(target, 1)
        with pytest.raises(SAEFormatError, match="not a readable safetensors file"):
            load_feature_subset(target, 1, [1])


def test_from_weights_checks_k(released):
    state = random_sae_state(8, 32)
    for k, error in ((True, TypeError), (2.5, TypeError), (0, ValueError)):
        with pytest.raises(error, match="k must be"):
            QwenScopeSAE.from_weights(**state, k=k)
    assert QwenScopeSAE.from_weights(**state, k=np.int64(4), layer=np.int64(2)).cfg.metadata.hook_name == \
        "blocks.2.hook_resid_post"


def _re(text: str) -> str:
    import re

    return re.escape(text)
