"""qscope convert: safetensors + sidecar, resumable, atomic."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qscope_plugins import load_sae
from qscope_plugins.cli import main
from qscope_plugins.sae import convert as convert_module
from qscope_plugins.testing.sae_files import make_fake_hub_repo, random_sae_state

REPO = "Qwen/SAE-Res-Tiny-W1K-L0_8"


@pytest.fixture
def hub_repo(offline_hub):
    states = {n: random_sae_state(32, 1024, seed=n) for n in range(3)}
    snapshot = make_fake_hub_repo(offline_hub, REPO, states)
    return snapshot, states


def test_convert_cli_writes_verified_layers(hub_repo, tmp_path, capsys):
    snapshot, states = hub_repo
    dst = tmp_path / "out"
    assert main(["convert", REPO, str(dst), "--layers", "0-2", "--dtype", "bf16"]) == 0
    assert "converted 3 layer(s)" in capsys.readouterr().out
    sidecar = json.loads((dst / "layer1" / "cfg.json").read_text())
    info = sidecar["qscope"]
    assert info["k"] == 8 and info["d_model"] == 32 and info["d_sae"] == 1024 and info["layer"] == 1
    assert info["source_repo"] == REPO and info["revision"] == snapshot.name
    assert info["source_sha256"] == convert_module.sha256_file(snapshot / "layer1.sae.pt")
    assert info["hook_name"] == "blocks.1.hook_resid_post"
    weights = load_file(str(dst / "layer1" / "sae_weights.safetensors"))
    assert weights["W_enc"].dtype == torch.bfloat16 and weights["W_enc"].shape == (32, 1024)
    torch.testing.assert_close(weights["W_dec"], states[1]["W_dec"].T.to(torch.bfloat16))
    sae = load_sae(dst, 1)
    assert sae.cfg.k == 8 and sae.W_dec.dtype == torch.bfloat16
    assert sae.cfg.metadata.sae_source == REPO


def test_resume_skips_done_layers_and_redoes_broken_ones(hub_repo, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    assert convert_module.convert(REPO, dst, [0, 1]) == [0, 1]
    assert convert_module.convert(REPO, dst, [0, 1, 2]) == [2]
    (dst / "layer0" / "sae_weights.safetensors").write_bytes(b"garbage")
    assert convert_module.convert(REPO, dst, [0, 1, 2]) == [0]


def test_crash_leaves_no_layer_that_counts_as_done(hub_repo, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    save_file = convert_module.save_file

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(convert_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(REPO, dst, [0])
    assert list(dst.iterdir()) == []
    monkeypatch.setattr(convert_module, "save_file", save_file)
    assert convert_module.convert(REPO, dst, [0]) == [0]


def test_layer_spec_errors():
    assert convert_module.parse_layers("0,2,4-6") == [0, 2, 4, 5, 6]
    with pytest.raises(ValueError, match="bad layer range 'x'"):
        convert_module.parse_layers("x")
    with pytest.raises(ValueError, match="end before start"):
        convert_module.parse_layers("5-2")


def test_local_directory_layers_are_discovered(tmp_path, capsys):
    from qscope_plugins.testing.sae_files import write_released_layer

    src = tmp_path / "SAE-Res-Tiny-W1K-L0_8"
    src.mkdir()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "no layer{n}.sae.pt files in this directory" in capsys.readouterr().err
    for layer in (0, 2):
        write_released_layer(src, layer, random_sae_state(32, 1024, seed=layer))
    assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["layer0", "layer2"]
    assert main(["convert", str(src), str(tmp_path / "out2"), "--layers", "0-2"]) == 2
    assert "no layer1.sae.pt (layers present: 0,2)" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_unknown_hub_repo_needs_layers(offline_hub, tmp_path, capsys):
    assert main(["convert", "Qwen/SAE-Res-Unknown-W1K-L0_8", str(tmp_path / "out")]) == 2
    assert "--layers is required" in capsys.readouterr().err
