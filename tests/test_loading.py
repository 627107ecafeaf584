"""load_sae: sources, safety, validation and memory."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qscope_plugins import FeatureSubset, QwenScopeSAE, SAEFormatError, load_feature_subset, load_sae
from qscope_plugins.testing.sae_files import make_fake_hub_repo, random_sae_state, write_released_layer

TINY_REPO = "Qwen/SAE-Res-Tiny-W1K-L0_8"  # follows the naming pattern: d_sae 1024, k 8


@pytest.fixture(scope="module")
def tiny_state():
    return random_sae_state(32, 1024, seed=2)


def test_local_directory_and_single_file(tmp_path, tiny_state):
    write_released_layer(tmp_path, 2, tiny_state)
    sae = load_sae(tmp_path, 2, k=8)
    assert isinstance(sae, QwenScopeSAE) and sae.cfg.k == 8 and sae.layer == 2
    same = load_sae(tmp_path / "layer2.sae.pt", 2, k=8)
    torch.testing.assert_close(same.W_dec, sae.W_dec)
    torch.testing.assert_close(sae.W_enc, tiny_state["W_enc"].T)
    torch.testing.assert_close(sae.W_dec, tiny_state["W_dec"].T)


def test_k_required_without_a_name(tmp_path, tiny_state):
    write_released_layer(tmp_path, 0, tiny_state)
    with pytest.raises(ValueError, match=r"k \(the Top-k size\) is not in the file; pass k=\.\.\."):
        load_sae(tmp_path, 0)


def test_k_and_width_from_a_qwen_scope_style_directory_name(tmp_path, tiny_state):
    directory = tmp_path / "SAE-Res-Tiny-W1K-L0_8"
    write_released_layer(directory, 0, tiny_state)
    assert load_sae(directory, 0).cfg.k == 8


def test_k_in_name_larger_than_d_sae(tmp_path, tiny_state):
    directory = tmp_path / "SAE-Res-Tiny-W1K-L0_2000"
    write_released_layer(directory, 0, tiny_state)
    with pytest.raises(ValueError, match=r"k=2000 must be in \[1, d_sae=1024\]"):
        load_sae(directory, 0)


def test_hub_cache_offline(offline_hub, tiny_state):
    snapshot = make_fake_hub_repo(offline_hub, TINY_REPO, {1: tiny_state})
    sae = load_sae(TINY_REPO, 1)
    assert sae.cfg.k == 8 and sae.cfg.d_sae == 1024
    assert sae.cfg.metadata.sae_source == TINY_REPO
    assert sae.cfg.metadata.sae_revision == snapshot.name


def test_missing_repo_offline_names_repo_and_command(offline_hub, real_group):
    group = real_group
    with pytest.raises(FileNotFoundError) as err:
        load_sae(group.release, 4)
    assert str(err.value) == (
        f"{group.repo_id}: layer4.sae.pt is not in the local Hugging Face cache and cannot be downloaded "
        f"(offline or unreachable hub). Download it first with: hf download {group.repo_id} layer4.sae.pt"
    )


def test_unknown_source_and_layer_range(offline_hub, real_group):
    with pytest.raises(FileNotFoundError, match="neither a known Qwen-Scope repo id"):
        load_sae("no-such-thing", 0)
    with pytest.raises(ValueError, match=r"layer 28 out of range for Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50 \(layers 0-27\)"):
        load_sae(real_group.release, 28)


def test_catalog_shapes_are_enforced(offline_hub, tiny_state, real_group):
    group = real_group
    make_fake_hub_repo(offline_hub, group.repo_id, {0: tiny_state})
    with pytest.raises(SAEFormatError) as err:
        load_sae(group.repo_id, 0)
    assert "layer0.sae.pt: key 'W_enc' has shape (1024, 32), expected (d_sae, d_model) = (32768, 2048)" in str(err.value)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    torch.save({"W_enc": torch.zeros(2, 2), "evil": payload}, tmp_path / "layer0.sae.pt")
    with pytest.raises(SAEFormatError, match="refused to unpickle"):
        load_sae(tmp_path, 0, k=1)
    assert not marker.exists()


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s: s.pop("W_dec"), r"missing key 'W_dec'"),
        (lambda s: s.update(W_dec=s["W_dec"][:, :-1]),
         r"key 'W_dec' has shape \(32, 1023\), expected \(d_model, d_sae\) = \(32, 1024\)"),
        (lambda s: s.update(b_dec=torch.zeros(31)), r"key 'b_dec' has shape \(31,\), expected \(d_model,\) = \(32,\)"),
        (lambda s: s["W_dec"].__setitem__((3, 3), float("nan")), r"key 'W_dec' holds non-finite values"),
        (lambda s: s.update(extra=torch.zeros(1)), r"unexpected keys \['extra'\]"),
        (lambda s: s.update(b_enc=torch.zeros(1024, dtype=torch.int64)), r"key 'b_enc' must be a floating-point tensor"),
    ],
)
def test_malformed_files(tmp_path, tiny_state, mutate, message):
    state = {key: value.clone() for key, value in tiny_state.items()}
    mutate(state)
    torch.save(state, tmp_path / "layer0.sae.pt")
    with pytest.raises(SAEFormatError, match=message) as err:
        load_sae(tmp_path, 0, k=8)
    assert str(tmp_path / "layer0.sae.pt") in str(err.value)


def test_truncated_file(tmp_path, tiny_state):
    path = write_released_layer(tmp_path, 0, tiny_state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="not a readable PyTorch zip checkpoint"):
        load_sae(tmp_path, 0, k=8)


def test_dtype_and_feature_subset(tmp_path, tiny_state):
    write_released_layer(tmp_path, 0, tiny_state)
    bf16 = load_sae(tmp_path, 0, k=8, dtype="bf16")
    assert bf16.W_enc.dtype == bf16.W_dec.dtype == torch.bfloat16
    sub = load_feature_subset(tmp_path, 0, [5, 700], k=8)
    assert isinstance(sub, FeatureSubset)
    torch.testing.assert_close(sub.directions(), tiny_state["W_dec"][:, [5, 700]].T)
    torch.testing.assert_close(sub.direction(700), tiny_state["W_dec"][:, 700])
    x = torch.randn(3, 32)
    full = load_sae(tmp_path, 0, k=8)
    torch.testing.assert_close(sub.encode_pre(x), full.encode_pre(x)[:, [5, 700]].detach())
    with pytest.raises(RuntimeError, match="needs every encoder row"):
        sub.encode(x)
    with pytest.raises(ValueError, match=r"feature id 1024 out of range \[0, 1024\)"):
        load_feature_subset(tmp_path, 0, [1024], k=8)


MEASURE = textwrap.dedent(
    """
    import gc, sys
    from pathlib import Path
    from qscope_plugins import load_sae  # import everything before measuring

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    for dtype in sys.argv[2:]:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
        base = rss("VmRSS:")
        sae = load_sae(sys.argv[1], 0, dtype=dtype)
        print(dtype, rss("VmHWM:") - base)
        del sae
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_while_loading_a_real_size_layer(real_hub_offline, real_group):
    """Peak extra resident memory while loading is at most 1.25x the file (SAELens: about 2x)."""
    size = next(real_hub_offline.rglob("layer0.sae.pt")).stat().st_size
    out = subprocess.run([sys.executable, "-c", MEASURE, real_group.repo_id, "float32", "bfloat16"],
                         capture_output=True, text=True, check=True, env=os.environ.copy())
    peaks = dict(line.split() for line in out.stdout.strip().splitlines())
    for dtype, peak in peaks.items():
        assert int(peak) <= 1.25 * size, f"{dtype}: peak extra RSS {int(peak) / size:.2f}x the file size"
    assert set(peaks) == {"float32", "bfloat16"}




INDEPENDENCE = textwrap.dedent(
    """
    import sys
    import torch
    import qscope_plugins
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory
    from qscope_plugins.sae.format import save_layer_file
    from qscope_plugins.testing.sae_files import random_sae_state

    repo, snapshot = sys.argv[1:]
    qscope_plugins.register()
    get_pretrained_saes_directory()["tiny"] = PretrainedSAELookup(
        release="tiny", repo_id=repo, model="m", conversion_func="qscope", saes_map={"layer1": "layer1.sae.pt"},
        expected_var_explained={}, expected_l0={}, neuronpedia_id={}, norm_scaling_factor={}, config_overrides=None)
    saes = {"load_sae": (qscope_plugins.load_sae(snapshot, 0, k=8), "layer0"),
            "SAE.from_pretrained": (SAE.from_pretrained("tiny", "layer1"), "layer1")}
    x = torch.randn(4, 32)
    for how, (sae, stem) in saes.items():
        before = {name: p.detach().clone() for name, p in sae.named_parameters()}
        with torch.no_grad():
            codes = sae.encode(x)
        file = f"{snapshot}/{stem}.sae.pt"
        save_layer_file(file, random_sae_state(32, 1024, seed=99))  # torch.save: same path, same inode
        changed = [name for name, p in sae.named_parameters() if not torch.equal(p, before[name])]
        with open(file, "wb") as handle:  # now a much smaller file
            handle.write(b"PK")
        with torch.no_grad():
            same_codes = torch.equal(sae.encode(x), codes)
            sum(float(p.double().sum()) for p in sae.parameters())  # touches every weight page
        print(how, "changed", changed, "same_codes", same_codes)
    """
)


def test_loaded_sae_is_independent_of_its_file(offline_hub, tiny_state):
    """Rewriting the file in place (``torch.save`` to the same path), then truncating it, leaves a loaded SAE as it was.

    In a subprocess: weights still mapped from the file would kill the process with SIGBUS on truncation.
    """
    snapshot = make_fake_hub_repo(offline_hub, TINY_REPO, {0: tiny_state, 1: tiny_state})
    out = subprocess.run([sys.executable, "-c", INDEPENDENCE, TINY_REPO, str(snapshot)],
                         capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.strip().splitlines() == [
        "load_sae changed [] same_codes True", "SAE.from_pretrained changed [] same_codes True"]
