"""``qscope steer`` / ``features`` / ``contrast``: output shape, agreement with the API, clean failures."""

from __future__ import annotations

import json

import pytest

from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.cli import main
from qscope_plugins.recipes.steering import additive, steer
from qscope_plugins.sae import QwenScopeSAE, load_feature_subset
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model

LAYER, FEATURE, ALPHA, NEW = 1, 5, 9.0, 5
PROMPTS = ["Hello there", "abc"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_checkpoint(tiny_model("Qwen3ForCausalLM", seed=2), root / "Qwen3-1.7B-Base")
    for layer in range(4):
        write_released_layer(root / "sae", layer, random_sae_state(64, 256, seed=layer))
    write_released_layer(root / "narrow", LAYER, random_sae_state(32, 256))
    return root, model_dir


def steer_args(files, *extra, model=None, sae="sae"):
    root, model_dir = files
    return ["steer", "--model", str(model or model_dir), "--sae", str(root / sae), "--k", "8", "--layer", str(LAYER),
            "--feature", str(FEATURE), "--alpha", str(ALPHA), "--max-new-tokens", str(NEW), "--no-progress",
            *extra]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_steer_json_shape_and_agreement_with_the_api(files, capsys):
    root, model_dir = files
    out = run_json(capsys, steer_args(files, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--json"))
    assert set(out) >= {"baseline", "steered"}
    for arm in ("baseline", "steered"):
        assert len(out[arm]) == len(PROMPTS)
        for item in out[arm]:
            assert 1 <= len(item["token_ids"]) <= NEW and all(isinstance(t, int) for t in item["token_ids"])
            assert isinstance(item["text"], str)
    backend = HFBackend.from_pretrained(str(model_dir))
    sae = load_feature_subset(root / "sae", LAYER, [FEATURE], k=8)
    baseline = steer(backend, PROMPTS, [], max_new_tokens=NEW)
    steered = steer(backend, PROMPTS, additive(sae, FEATURE, ALPHA, layer=LAYER), max_new_tokens=NEW)
    assert [o["token_ids"] for o in out["baseline"]] == [g.token_ids for g in baseline]
    assert [o["token_ids"] for o in out["steered"]] == [g.token_ids for g in steered]
    assert [o["text"] for o in out["steered"]] == [g.text for g in steered]
    assert out["baseline"] != out["steered"]


@pytest.mark.parametrize("backend", ["transformer-lens", "nnsight"])
def test_steer_backends_agree(files, capsys, backend):
    pytest.importorskip(f"qscope_plugins.backends.{backend.replace('-', '_')}")
    argv = steer_args(files, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--json")
    hf = run_json(capsys, argv)
    other = run_json(capsys, [*argv, "--backend", backend])
    for arm in ("baseline", "steered"):
        assert [o["token_ids"] for o in other[arm]] == [o["token_ids"] for o in hf[arm]]


def test_prompts_file_and_output_file(files, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"Hello there"\n\n{"prompt": "abc"}\n', encoding="utf-8")
    target = tmp_path / "out.json"
    assert main(steer_args(files, "--prompts-file", str(prompts), "--json", "--output", str(target))) == 0
    written = json.loads(target.read_text())
    assert json.loads(capsys.readouterr().out) == written  # --json prints, --output writes the same result
    assert [o["prompt_ids"] for o in written["baseline"]] == [o["prompt_ids"] for o in written["steered"]]
    assert len(written["steered"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "prompts.jsonl"]  # no temp file left


def test_clamp_mode(files, capsys):
    argv = steer_args(files, "--prompt", PROMPTS[0], "--json")
    argv[argv.index("--alpha"): argv.index("--alpha") + 2] = ["--clamp", "30"]
    out = run_json(capsys, argv)
    assert out["clamp"] == 30.0 and out["baseline"] != out["steered"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("feature", "feature id 256 out of range [0, 256)"),
        ("layer", "layer 7 is out of range: this model has layers 0..3"),
        ("width", "SAE d_model 32 does not match the model's d_model 64"),
        ("empty_file", "holds no texts"),
        ("empty_prompt", "prompt 0 is empty (no tokens)"),
    ],
)
def test_bad_input_fails_cleanly_without_output(files, capsys, tmp_path, case, message):
    target = tmp_path / "out.json"
    argv = steer_args(files, "--json", "--output", str(target), sae="narrow" if case == "width" else "sae")
    if case == "empty_file":
        (tmp_path / "empty.txt").write_text("\n  \n")
        argv += ["--prompts-file", str(tmp_path / "empty.txt")]
    else:
        argv += ["--prompt", "" if case == "empty_prompt" else PROMPTS[0]]
    if case == "feature":
        argv[argv.index("--feature") + 1] = "256"
    if case == "layer":
        argv[argv.index("--layer") + 1] = "7"
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("qscope steer: error: ") and message in captured.err
    assert not target.exists() and not any(p.name.startswith(".out.json") for p in tmp_path.iterdir())


def test_sae_for_another_backbone_warns(files, capsys, monkeypatch):
    import qscope_plugins.sae as sae_module

    other = QwenScopeSAE.from_weights(**random_sae_state(64, 256), k=8, layer=LAYER, model_name="Qwen/Qwen3-8B-Base")
    for loader in ("load_sae", "load_feature_subset"):
        monkeypatch.setattr(sae_module, loader, lambda *a, **kw: other)
    with pytest.warns(UserWarning, match="SAE was trained on Qwen/Qwen3-8B-Base but the model is .*Qwen3-1.7B-Base"):
        out = run_json(capsys, steer_args(files, "--prompt", PROMPTS[0], "--json"))
    assert len(out["steered"]) == 1


def test_features_and_contrast_commands(files, capsys, tmp_path):
    root, model_dir = files
    common = ["--model", str(model_dir), "--sae", str(root / "sae"), "--k", "8", "--layers", "1,2", "--no-progress"]
    out = run_json(capsys, ["features", *common, "--text", "Hello there", "--top", "3", "--json"])
    assert {r["layer"] for r in out["rows"]} == {1, 2} and all(r["mean"] > 0 for r in out["rows"])
    assert sum(r["layer"] == 1 for r in out["rows"]) == 3
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("the cat sat\na cat ran\n")
    neg.write_text("el perro\nder hund\n")
    out = run_json(capsys, ["contrast", str(pos), str(neg), *common, "--top", "4", "--rank-by", "mean", "--json"])
    rows = [r for r in out["rows"] if r["layer"] == 2]
    assert len(rows) == 4 and rows[0]["mean_diff"] == pytest.approx(rows[0]["mean_pos"] - rows[0]["mean_neg"])
    assert main(["contrast", str(pos), str(neg), *common]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "layer", "feature", "rate_pos", "rate_neg", "rate_diff", "mean_pos", "mean_neg", "mean_diff"]
