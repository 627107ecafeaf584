"""Crafted files cannot make the loader allocate more than the file holds, and lossy casts are refused."""

from __future__ import annotations

import time

import pytest
import torch

from qscope_plugins import SAEFormatError, load_feature_subset, load_sae
from qscope_plugins.cli import main
from qscope_plugins.sae import convert as convert_module
from qscope_plugins.sae._mmap import check_layout
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer

D_SAE, D_MODEL = 2**19, 4096  # 8 GiB per weight matrix if it were expanded


def stride_zero_state() -> dict[str, torch.Tensor]:
    one = torch.zeros(1)
    return {"W_enc": one.expand(D_SAE, D_MODEL), "W_dec": one.expand(D_MODEL, D_SAE),
            "b_enc": one.expand(D_SAE), "b_dec": one.expand(D_MODEL)}


@pytest.fixture
def crafted(tmp_path):
    directory = tmp_path / "SAE-Res-Crafted-W512K-L0_8"
    directory.mkdir()
    torch.save(stride_zero_state(), directory / "layer0.sae.pt")  # torch.save keeps the stride-0 views
    assert (directory / "layer0.sae.pt").stat().st_size < 8192
    return directory


def test_stride_zero_tensor_with_a_huge_shape_is_refused_before_anything_is_allocated(crafted):
    start = time.perf_counter()
    with pytest.raises(SAEFormatError, match=r"layer0.sae.pt: key 'W_enc' claims shape \(524288, 4096\) with strides "
                                             r"\(0, 0\): its elements overlap in storage"):
        load_sae(crafted, 0)
    with pytest.raises(SAEFormatError, match="overlap in storage"):
        load_feature_subset(crafted, 0, [1, 2])
    assert time.perf_counter() - start < 5


def test_convert_refuses_the_crafted_file_and_leaves_nothing(crafted, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["convert", str(crafted), str(dst), "--layers", "0"]) == 1  # a bad file is a runtime error
    err = capsys.readouterr().err
    assert "\nqscope convert: error: " in err and "overlap in storage" in err
    assert not dst.exists() or list(dst.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no lock, no temp dir


def test_overlapping_strides_and_storage_larger_than_the_file_are_refused(tmp_path):
    base = torch.zeros(64)
    with pytest.raises(SAEFormatError, match=r"key 'W' claims shape \(50, 8\) with strides \(1, 1\)"):
        check_layout({"W": base.as_strided((50, 8), (1, 1))}, tmp_path / "none")
    small = tmp_path / "small.pt"
    small.write_bytes(b"x" * 100)
    with pytest.raises(SAEFormatError, match=r"small.pt: its tensors claim 256 bytes but the file has only 100"):
        check_layout({"W": base}, small)
    check_layout({"W": torch.zeros(8, 8)[:, :4], "b": torch.zeros(8).T}, tmp_path / "none")  # gaps are fine


@pytest.fixture
def big_values(tmp_path):
    state = random_sae_state(16, 64, seed=3)
    state["W_enc"][5, 2] = 1e6  # finite in float32, inf in float16
    write_released_layer(tmp_path / "src", 0, state)
    return tmp_path / "src", state


def test_a_cast_that_overflows_is_refused_not_loaded(big_values, tmp_path):
    src, state = big_values
    message = r"key 'W_enc' does not fit in float16: values up to 1e\+06 overflow to inf \(largest finite 65504\)"
    with pytest.raises(SAEFormatError, match=message):
        load_sae(src, 0, k=4, dtype="fp16")
    with pytest.raises(SAEFormatError, match=message):
        load_feature_subset(src, 0, [5, 6], k=4, dtype="fp16")
    assert load_sae(src, 0, k=4, dtype="bf16").W_enc.isfinite().all()
    assert float(load_sae(src, 0, k=4).W_enc[2, 5]) == 1e6
    convert_module.convert(str(src), tmp_path / "conv", [0], k=4)  # float32: fine
    with pytest.raises(SAEFormatError, match=message):
        load_sae(tmp_path / "conv" / "layer0", 0, dtype="fp16")
    with pytest.raises(SAEFormatError, match=message):
        load_feature_subset(tmp_path / "conv" / "layer0", 0, [5], dtype="fp16")
    with pytest.raises(SAEFormatError, match=message):
        convert_module.convert(str(src), tmp_path / "conv16", [0], k=4, dtype=torch.float16)


def test_a_million_feature_ids_are_checked_and_deduplicated_before_reading(tmp_path):
    state = random_sae_state(16, 512, seed=1)
    write_released_layer(tmp_path / "src", 0, state)
    convert_module.convert(str(tmp_path / "src"), tmp_path / "conv", [0], k=4)
    ids = torch.arange(10**6) % 512
    for source in (tmp_path / "src", tmp_path / "conv" / "layer0"):
        start = time.perf_counter()
        with pytest.warns(UserWarning, match=r"features: 999488 repeated ids dropped \(512 distinct kept"):
            subset = load_feature_subset(source, 0, ids.flip(0).tolist(), k=4)
        assert time.perf_counter() - start < 10
        first_seen = list(dict.fromkeys(ids.flip(0).tolist()))
        assert subset.ids.tolist() == first_seen
        torch.testing.assert_close(subset.W_enc.T, state["W_enc"][first_seen])
        bad = [*ids.tolist(), 512]
        with pytest.raises(ValueError, match=r"feature id 512 out of range \[0, 512\)"):
            load_feature_subset(source, 0, bad, k=4)
