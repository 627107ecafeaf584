"""A table of bad inputs for every ``qscope`` subcommand: exit status, one clear line, nothing written.

Each row: an id, the command line (``{name}`` fields are paths from the fixtures, ``{out}`` and
``{outj}`` a directory and a file that must not exist afterwards), the expected exit status
(2: wrong command line, 1: failed while working) and a fragment of the one-line message. Every
case also checks that stdout is empty, that stderr ends with ``qscope <cmd>: error: ...`` and holds
no traceback, and that the per-test directory is still empty (no partial output, no temp file).
Most rows fail at validation before any model loads; rows marked ``# loads`` load the tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qscope_plugins.cli import main
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model

CONV = "SAE-Res-Tiny-W1K-L0_8"  # the name carries d_sae = 1024 and k = 8


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_inputs")
    paths: dict[str, Path] = {}

    def file(name: str, data: str | bytes) -> Path:
        path = root / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        paths[name.replace(".", "_")] = path
        return path

    paths["model"] = save_checkpoint(tiny_model("Qwen3ForCausalLM", seed=2), root / "model")
    paths["sae"] = root / CONV
    for layer in range(4):
        write_released_layer(paths["sae"], layer, random_sae_state(64, 1024, seed=layer))
    paths["narrow"] = root / "narrow" / CONV
    write_released_layer(paths["narrow"], 1, random_sae_state(32, 1024))
    paths["nok"] = root / "sae-without-k"
    write_released_layer(paths["nok"], 0, random_sae_state(64, 256))
    for key in ("b_enc", "b_dec"):
        state = random_sae_state(64, 1024, seed=9)
        state[key][5] = float("nan")  # feature 5 is the one steered
        paths[f"nan_{key}"] = root / f"nan_{key}" / CONV
        write_released_layer(paths[f"nan_{key}"], 1, state)
    paths["conv_corrupt"] = root / "conv_corrupt" / CONV  # layers 0, 1 fine, layer 2 corrupt
    for layer in (0, 1):
        write_released_layer(paths["conv_corrupt"], layer, random_sae_state(64, 1024, seed=layer))
    (paths["conv_corrupt"] / "layer2.sae.pt").write_bytes(b"PK\x03\x04 truncated")
    paths["conv_wide"] = root / "conv_wide" / CONV  # layer 1 has the width its name does not say
    write_released_layer(paths["conv_wide"], 0, random_sae_state(64, 1024))
    write_released_layer(paths["conv_wide"], 1, random_sae_state(64, 512))
    paths["corrupt"] = root / "corrupt" / CONV
    paths["corrupt"].mkdir(parents=True)
    (paths["corrupt"] / "layer1.sae.pt").write_bytes(b"not a zip checkpoint")

    from qscope_plugins.sae.convert import convert

    convert(str(paths["sae"]), root / "converted", [1])
    good = root / "converted" / "layer1"
    sidecar = json.loads((good / "cfg.json").read_text())

    def converted(name: str, cfg=None, weights: bytes | None = None) -> None:
        target = root / name
        shutil.copytree(good, target)
        if cfg is not None:
            (target / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        if weights is not None:
            (target / "sae_weights.safetensors").write_bytes(weights)
        paths[name] = target

    converted("sidecar_number", "3")
    converted("sidecar_list", "[1, 2]")
    converted("sidecar_string_d_sae", {**sidecar, "d_sae": "1024"})
    converted("sidecar_bool_k", {**sidecar, "k": True})
    converted("sidecar_k_too_big", {**sidecar, "k": 5000})
    converted("sidecar_disagrees", {**sidecar, "qscope": {**sidecar["qscope"], "d_model": 99}})
    converted("sidecar_bad_json", "{not json")
    converted("sidecar_hash", {**sidecar, "qscope": {**sidecar["qscope"], "weights_sha256": "0" * 64}})
    raw = (good / "sae_weights.safetensors").read_bytes()
    converted("corrupt_header", {**sidecar, "qscope": {k: v for k, v in sidecar["qscope"].items()
                                                        if k != "weights_sha256"}},
              weights=b"\xff" * 8 + raw[8:])

    paths["empty_dir"] = root / "empty_dir"
    paths["empty_dir"].mkdir()
    paths["bad_model"] = root / "bad_model"
    paths["bad_model"].mkdir()
    (paths["bad_model"] / "config.json").write_text("{not json")
    paths["no_weights"] = root / "no_weights"
    shutil.copytree(paths["model"], paths["no_weights"])
    (paths["no_weights"] / "model.safetensors").unlink()

    file("good.txt", "the cat sat\na dog ran\n")
    file("empty.txt", "\n   \n")
    file("lists.jsonl", '["a", "b"]\n')
    file("numbers.jsonl", "3\n")
    file("objects.jsonl", '{"x": 1}\n')
    file("bad.jsonl", '{"text": \n')
    file("nul.txt", "fine\nbad\x00line\n")
    file("latin1.txt", b"caf\xe9\n")
    file("long.txt", "a b c d " * 400 + "\n")  # ~1600 tokens, over the tiny model's 512
    file("records.jsonl", '{"id": "a", "question": "what"}\n{"id": "b", "question": "why"}\n')
    file("features.json", json.dumps([{"layer": 1, "feature": 3}]))
    file("scored.json", json.dumps([{"layer": 1, "feature": 3, "score": 0.9}]))
    file("seed.jsonl", '{"prompt": "hi", "response": "ok"}\n')
    file("classifier.json", json.dumps({"format": "nope"}))
    file("list.json", "[1, 2]")
    from qscope_plugins.recipes.classifier import FeatureClassifier

    file("clf_ok.json", json.dumps(FeatureClassifier(features=(3,), layers=(1,), d_sae=1024).to_dict()))
    file("synth_out.jsonl", '{"text": "done"}\n')
    out = {k: str(v) for k, v in paths.items()}
    out["root"] = str(root)
    return out


M = "--model {model} --sae {sae} --k 8 --no-progress"
STEER = f"steer {M} --layer 1 --feature 5 --alpha 9 --max-new-tokens 2 --output {{outj}}"
FEAT = f"features {M} --layers 1 --output {{outj}}"
FIT = f"classify fit {M} --pos {{good_txt}} --neg {{good_txt}} --output {{outj}}"
EVAL = f"classify eval {M}"
EVALSAE = f"eval-sae {M} --layers 1 --data {{good_txt}} --output {{outj}}"
COV = f"coverage {{seed_jsonl}} --features {{scored_json}} {M}"
SYN = f"synth {{seed_jsonl}} --features {{scored_json}} {M} --generator contexts --corpus {{good_txt}}"
FOOT = f"footprint {M} --layers 1 --store {{out}}"
CONVERT = "convert {sae} {out}"

# (id, command line, exit status, message fragment)
CASES = [
    # ---- qscope itself
    ("unknown-command", "nope", 2, "invalid choice: 'nope'"),
    ("unknown-option", "--bogus", 2, "unrecognized arguments: --bogus"),
    ("catalog-extra", "catalog --bogus", 2, "unrecognized arguments: --bogus"),
    ("doctor-extra", "doctor --bogus", 2, "unrecognized arguments: --bogus"),
    ("selfcheck-k-zero", "selfcheck --k 0", 2, "expected a positive integer, got '0'"),
    ("selfcheck-k-float", "selfcheck --k 2.5", 2, "expected an integer, got '2.5'"),
    ("selfcheck-k-over-width", "selfcheck --k 100 --d-sae 50", 2, "--k 100 must be at most --d-sae 50"),
    ("selfcheck-negative-width", "selfcheck --d-model -3", 2, "expected a positive integer"),
    # ---- convert
    ("convert-missing-src", "convert {root}/nowhere {out}", 2, "no such directory"),
    ("convert-src-is-file", "convert {good_txt} {out}", 2, "is a file"),
    ("convert-src-empty-dir", "convert {empty_dir} {out}", 2, "no layer{n}.sae.pt files in this directory"),
    ("convert-layer-range-too-far", f"{CONVERT} --layers 0-999", 2, "no layer4.sae.pt (layers present: 0-3)"),
    ("convert-corrupt-layer-before-any-write", "convert {conv_corrupt} {out}", 1,
     "layer2.sae.pt: not a readable PyTorch zip checkpoint"),
    ("convert-wrong-width-before-any-write", "convert {conv_wide} {out}", 1,
     "key 'W_enc' has shape (512, 64), expected (d_sae, d_model) = (1024, 64)"),
    ("convert-layers-reversed", f"{CONVERT} --layers 5-2", 2, "end before start"),
    ("convert-layers-word", f"{CONVERT} --layers x", 2, "bad layer spec 'x'"),
    ("convert-layers-twice", f"{CONVERT} --layers 1,1", 2, "layer 1 is given twice"),
    ("convert-layers-twice-tokens", f"{CONVERT} --layers 1 0-2", 2, "layer 1 is given twice"),
    ("convert-layers-all-plus", f"{CONVERT} --layers all,3", 2, "bad layer spec 'all'"),
    ("convert-layers-all-and-more", f"{CONVERT} --layers all 3", 2, "'all' cannot be combined"),
    ("convert-layers-negative", f"{CONVERT} --layers -1", 2, "bad layer spec '-1'"),
    ("convert-layers-empty", f"{CONVERT} --layers ,", 2, "bad layer spec ''"),
    ("convert-no-k", "convert {nok} {out}", 2, "does not carry the Top-k size (L0_{k}); pass --k"),
    ("convert-dst-is-file", "convert {sae} {good_txt}", 2, "exists and is not a directory"),
    ("convert-dst-under-file", "convert {sae} {good_txt}/sub", 2, "is not a directory"),
    ("convert-offline-repo", "convert Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50 {out} --layers 0", 2,
     "hf download Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"),
    ("convert-release-layer-range", "convert qwen-scope-3-1.7b-base-w32k-l50 {out} --layers 30", 2,
     "layer 30 out of range for Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50 (layers 0-27)"),
    ("convert-unknown-repo-needs-layers", "convert Qwen/SAE-Res-Unknown-W1K-L0_8 {out}", 2, "--layers is required"),
    ("convert-bad-dtype", f"{CONVERT} --dtype int8", 2, "invalid choice: 'int8'"),
    ("convert-k-zero", f"{CONVERT} --k 0", 2, "expected a positive integer"),
    ("convert-dst-is-src", "convert {sae} {sae}", 2, "DST must differ from SRC"),
    # ---- steer: options
    ("steer-no-alpha", STEER.replace(" --alpha 9", "") + " --prompt hi", 2, "give --alpha (additive steering) or --clamp"),
    ("steer-alpha-and-clamp", f"{STEER} --clamp 0 --prompt hi", 2, "give --alpha or --clamp, not both"),
    ("steer-alpha-nan", STEER.replace("--alpha 9", "--alpha nan") + " --prompt hi", 2, "expected a finite number"),
    ("steer-alpha-inf", STEER.replace("--alpha 9", "--alpha inf") + " --prompt hi", 2, "expected a finite number"),
    ("steer-alpha-word", STEER.replace("--alpha 9", "--alpha strong") + " --prompt hi", 2, "expected a number"),
    ("steer-alpha-count", f"{STEER} --feature 6 --alpha 1 --alpha 2 --prompt hi", 2,
     "give one --alpha, or one per --feature (2); got 3"),
    ("steer-feature-twice", f"{STEER} --feature 5 --prompt hi", 2, "a --feature is given twice"),
    ("steer-feature-negative", STEER.replace("--feature 5", "--feature -1") + " --prompt hi", 2,
     "expected a non-negative integer"),
    ("steer-feature-float", STEER.replace("--feature 5", "--feature 1.5") + " --prompt hi", 2, "expected an integer"),
    ("steer-layer-negative", STEER.replace("--layer 1", "--layer -1") + " --prompt hi", 2,
     "expected a non-negative integer"),
    ("steer-layer-word", STEER.replace("--layer 1", "--layer one") + " --prompt hi", 2, "expected an integer"),
    ("steer-top-k-without-sample", f"{STEER} --top-k 5 --prompt hi", 2, "add --sample"),
    ("steer-temperature-zero", f"{STEER} --sample --temperature 0 --prompt hi", 2, "--temperature must be > 0"),
    ("steer-top-p-over-one", f"{STEER} --sample --top-p 1.5 --prompt hi", 2, "--top-p must be in (0, 1]"),
    ("steer-bad-positions", f"{STEER} --positions 1-x --prompt hi", 2, "bad position '1-x'"),
    ("steer-no-prompt", STEER, 2, "one of the arguments --prompt --prompts-file is required"),
    ("steer-device-banana", f"{STEER} --device banana --prompt hi", 2, "'banana' is not a device"),
    ("steer-backend-unknown", f"{STEER} --backend jax --prompt hi", 2, "invalid choice: 'jax'"),
    ("steer-dtype-unknown", f"{STEER} --dtype int4 --prompt hi", 2, "invalid choice: 'int4'"),
    ("steer-batch-zero", f"{STEER} --batch-size 0 --prompt hi", 2, "expected a positive integer"),
    ("steer-new-tokens-zero", STEER.replace("--max-new-tokens 2", "--max-new-tokens 0") + " --prompt hi", 2,
     "expected a positive integer"),
    ("steer-k-zero", STEER.replace("--k 8", "--k 0") + " --prompt hi", 2, "expected a positive integer"),
    ("steer-k-float", STEER.replace("--k 8", "--k 2.5") + " --prompt hi", 2, "expected an integer, got '2.5'"),
    ("steer-k-bool", STEER.replace("--k 8", "--k true") + " --prompt hi", 2, "expected an integer, got 'true'"),
    # ---- steer: prompts
    ("steer-empty-prompt", [*STEER.split(), "--prompt", ""], 2, "prompt 0 is empty (no tokens)"),
    ("steer-blank-prompt", [*STEER.split(), "--prompt", "   "], 2, "prompt 0 is blank (only whitespace)"),
    ("steer-nul-prompt", [*STEER.split(), "--prompt", "a\x00b"], 2, "prompt 0 contains a NUL byte"),
    ("steer-second-prompt-empty", [*STEER.split(), "--prompt", "ok", "--prompt", ""], 2, "prompt 1 is empty"),
    ("steer-prompts-missing", f"{STEER} --prompts-file {{root}}/missing.txt", 2, "--prompts-file"),
    ("steer-prompts-dir", f"{STEER} --prompts-file {{empty_dir}}", 2, "is a directory, expected a file"),
    ("steer-prompts-empty", f"{STEER} --prompts-file {{empty_txt}}", 2, "holds no texts"),
    ("steer-prompts-lists", f"{STEER} --prompts-file {{lists_jsonl}}", 2,
     "lists.jsonl:1: expected a JSON string or an object with 'text' or 'prompt', got list"),
    ("steer-prompts-numbers", f"{STEER} --prompts-file {{numbers_jsonl}}", 2, "got int"),
    ("steer-prompts-objects", f"{STEER} --prompts-file {{objects_jsonl}}", 2, "got dict"),
    ("steer-prompts-bad-json", f"{STEER} --prompts-file {{bad_jsonl}}", 2, "bad.jsonl:1: not valid JSON"),
    ("steer-prompts-nul", f"{STEER} --prompts-file {{nul_txt}}", 2, "nul.txt:2 contains a NUL byte"),
    ("steer-prompts-latin1", f"{STEER} --prompts-file {{latin1_txt}}", 2, "not UTF-8 text"),
    # ---- steer: model, SAE, output paths (before loading)
    ("steer-model-missing", STEER.replace("--model {model}", "--model {root}/nowhere") + " --prompt hi", 2,
     "no such directory"),
    ("steer-model-is-text-file", STEER.replace("--model {model}", "--model {good_txt}") + " --prompt hi", 2,
     "is a file; give a hub id or a checkpoint directory"),
    ("steer-model-dir-without-config", STEER.replace("--model {model}", "--model {empty_dir}") + " --prompt hi", 2,
     "not a model checkpoint directory (no config.json in it)"),
    ("steer-model-offline-hub", STEER.replace("--model {model}", "--model Qwen/Qwen3-1.7B-Base") + " --prompt hi", 2,
     "download it first with: hf download Qwen/Qwen3-1.7B-Base"),
    ("steer-sae-missing", STEER.replace("--sae {sae}", "--sae {root}/nowhere") + " --prompt hi", 2,
     "no such file or directory"),
    ("steer-sae-offline-hub",
     STEER.replace("--sae {sae}", "--sae Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50") + " --prompt hi", 2,
     "hf download Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"),
    ("steer-release-layer-range",
     STEER.replace("--sae {sae}", "--sae qwen-scope-3-1.7b-base-w32k-l50").replace("--layer 1", "--layer 40")
     + " --prompt hi", 2, "layer 40 out of range for Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"),
    ("steer-output-is-dir", STEER.replace("--output {outj}", "--output {empty_dir}") + " --prompt hi", 2,
     "is a directory, expected a file path"),
    ("steer-output-parent-missing", STEER.replace("--output {outj}", "--output {out}/x.json") + " --prompt hi", 2,
     "does not exist"),
    ("steer-output-under-file", STEER.replace("--output {outj}", "--output {good_txt}/x.json") + " --prompt hi", 2,
     "is not a directory"),
    # ---- steer: after the model loads
    ("steer-layer-out-of-range", STEER.replace("--layer 1", "--layer 7") + " --prompt hi", 2,  # loads
     "layer 7 is out of range: this model has layers 0..3"),
    ("steer-feature-out-of-range", STEER.replace("--feature 5", "--feature 1024") + " --prompt hi", 2,  # loads
     "feature id 1024 out of range [0, 1024)"),
    ("steer-sae-width", STEER.replace("--sae {sae}", "--sae {narrow}") + " --prompt hi", 2,  # loads
     "SAE d_model 32 does not match the model's d_model 64"),
    ("steer-k-over-width", STEER.replace("--k 8", "--k 5000") + " --prompt hi", 2, "k=5000 must be in [1, d_sae=1024]"),
    ("steer-prompt-over-context", f"{STEER} --prompts-file {{long_txt}}", 2, "over the model's context of 512"),  # loads
    ("steer-nan-b-enc-subset", STEER.replace("--sae {sae}", "--sae {nan_b_enc}") + " --prompt hi", 1,  # loads
     "key 'b_enc' holds non-finite values"),
    ("steer-nan-b-dec-subset", STEER.replace("--sae {sae}", "--sae {nan_b_dec}") + " --prompt hi", 1,  # loads
     "key 'b_dec' holds non-finite values"),
    ("steer-corrupt-layer-file", STEER.replace("--sae {sae}", "--sae {corrupt}") + " --prompt hi", 1,  # loads
     "not a readable PyTorch zip checkpoint"),
    ("steer-model-bad-config", STEER.replace("--model {model}", "--model {bad_model}") + " --prompt hi", 1,  # loads
     "cannot load model"),
    ("steer-model-no-weights", STEER.replace("--model {model}", "--model {no_weights}") + " --prompt hi", 1,  # loads
     "cannot load model"),
    # ---- features (full SAE loads: the converted sidecar is checked, hash included)
    ("features-no-text", FEAT, 2, "one of the arguments --text --file is required"),
    ("features-empty-text", [*FEAT.split(), "--text", ""], 2, "--text is empty"),
    ("features-nul-text", [*FEAT.split(), "--text", "x\x00"], 2, "--text contains a NUL byte"),
    ("features-file-missing", f"{FEAT} --file {{root}}/missing.txt", 2, "no such file"),
    ("features-file-latin1", f"{FEAT} --file {{latin1_txt}}", 2, "not UTF-8 text"),
    ("features-layers-word", f"{FEAT} --layers x --text hi", 2, "bad layer spec 'x'"),
    ("features-top-zero", f"{FEAT} --top 0 --text hi", 2, "expected a positive integer"),
    ("features-old-layer-flag", FEAT.replace("--layers 1", "--layer 1 1") + " --text hi", 2,
     "layer 1 is given twice"),
    ("features-layer-out-of-range", FEAT.replace("--layers 1", "--layers 9") + " --text hi", 2,  # loads
     "layer 9 is out of range: this model has layers 0..3"),
    ("features-text-over-context", f"{FEAT} --file {{long_txt}}", 2, "over the model's context of 512"),  # loads
    ("features-sidecar-number", FEAT.replace("--sae {sae}", "--sae {sidecar_number}") + " --text hi", 1,  # loads
     "expected a JSON object, got int"),
    ("features-sidecar-list", FEAT.replace("--sae {sae}", "--sae {sidecar_list}") + " --text hi", 1,  # loads
     "expected a JSON object, got list"),
    ("features-sidecar-string-d-sae",
     FEAT.replace("--sae {sae}", "--sae {sidecar_string_d_sae}") + " --text hi", 1,  # loads
     "key 'd_sae' must be a positive integer, got '1024'"),
    ("features-sidecar-bool-k", FEAT.replace("--sae {sae}", "--sae {sidecar_bool_k}") + " --text hi", 1,  # loads
     "key 'k' must be a positive integer, got True"),
    ("features-sidecar-k-too-big",
     FEAT.replace("--sae {sae}", "--sae {sidecar_k_too_big}") + " --text hi", 1,  # loads
     "k=5000 is larger than d_sae=1024"),
    ("features-sidecar-disagrees",
     FEAT.replace("--sae {sae}", "--sae {sidecar_disagrees}") + " --text hi", 1,  # loads
     "qscope.d_model=99 disagrees with d_in=64"),
    ("features-sidecar-bad-json", FEAT.replace("--sae {sae}", "--sae {sidecar_bad_json}") + " --text hi", 1,  # loads
     "not valid JSON"),
    ("features-sidecar-hash", FEAT.replace("--sae {sae}", "--sae {sidecar_hash}") + " --text hi", 1,  # loads
     "does not match the cfg.json record"),
    ("features-corrupt-safetensors-header",
     FEAT.replace("--sae {sae}", "--sae {corrupt_header}") + " --text hi", 1,  # loads
     "not a readable safetensors file"),
    # ---- contrast
    ("contrast-pos-missing", f"contrast {{root}}/missing.txt {{good_txt}} {M} --layers 1", 2, "POS_FILE"),
    ("contrast-neg-empty", f"contrast {{good_txt}} {{empty_txt}} {M} --layers 1", 2, "holds no texts"),
    ("contrast-rank-by", f"contrast {{good_txt}} {{good_txt}} {M} --layers 1 --rank-by best", 2,
     "invalid choice: 'best'"),
    ("contrast-no-layers", f"contrast {{good_txt}} {{good_txt}} {M}", 2, "--layers is required"),
    # ---- footprint
    ("footprint-benchmark-no-equals", f"{FOOT} --benchmark alpha", 2, "expected NAME=FILE, got 'alpha'"),
    ("footprint-benchmark-missing", f"{FOOT} --benchmark a={{root}}/missing.jsonl", 2, "no such file"),
    ("footprint-benchmark-twice", f"{FOOT} --benchmark a={{good_txt}} --benchmark a={{good_txt}}", 2,
     "benchmark 'a' is given twice"),
    ("footprint-benchmark-lists", f"{FOOT} --benchmark a={{lists_jsonl}}", 2, "expected a JSON object"),
    ("footprint-template-field", [*FOOT.split(), "--benchmark", "a={good_txt}", "--template", "Q: {{question}}"], 2,
     "sample 0 has no field 'question' used by the template"),
    ("footprint-template-positional", [*FOOT.split(), "--benchmark", "a={good_txt}", "--template", "{{0}}"], 2,
     "out of range"),
    ("footprint-id-field", f"{FOOT} --benchmark a={{records_jsonl}} --template x --id-field key", 2,
     "sample 0 has no id field 'key'"),
    ("footprint-store-is-file", FOOT.replace("--store {out}", "--store {good_txt}") + " --benchmark a={good_txt}", 2,
     "exists and is not a directory"),
    ("footprint-layers-twice", FOOT.replace("--layers 1", "--layers 1 1") + " --benchmark a={good_txt}", 2,
     "layer 1 is given twice"),
    ("footprint-over-context", f"{FOOT} --benchmark a={{long_txt}}", 2, "over the model's context of 512"),  # loads
    ("footprint-position", f"{FOOT} --benchmark a={{good_txt}} --position first", 2, "invalid choice: 'first'"),
    # ---- classify
    ("fit-no-output", FIT.replace(" --output {outj}", ""), 2, "give --output PATH for the classifier JSON"),
    ("fit-eval-pos-alone", f"{FIT} --eval-pos {{good_txt}}", 2, "give both --eval-pos and --eval-neg, or neither"),
    ("fit-layer-and-compose", f"{FIT} --layer 1 --compose 2", 2, "give --layer or --compose, not both"),
    ("fit-k-grid-word", f"{FIT} --k-grid 1,x", 2, "--k-grid '1,x'"),
    ("fit-k-grid-zero", f"{FIT} --k-grid 0", 2, "--k-grid '0'"),
    ("fit-baselines-without-held-out", f"{FIT} --baselines", 2, "--baselines needs held-out texts"),
    ("fit-plot-without-held-out", f"{FIT} --plot {{out}}/f1.png", 2, "--plot needs held-out texts"),
    ("fit-pos-missing", FIT.replace("--pos {good_txt}", "--pos {root}/missing.txt"), 2, "--pos"),
    ("fit-output-is-dir", FIT.replace("--output {outj}", "--output {empty_dir}"), 2, "is a directory"),
    ("fit-top-zero", f"{FIT} --top 0", 2, "expected a positive integer"),
    ("fit-old-top-k-zero", f"{FIT} --top-k 0", 2, "expected a positive integer"),
    ("fit-eps-nan", f"{FIT} --eps nan", 2, "expected a finite number"),
    ("fit-text-over-context", FIT.replace("--neg {good_txt}", "--neg {long_txt}"), 2,  # loads
     "--neg: text 0 has"),
    ("fit-layer-not-scanned", f"{FIT} --layers 0 --layer 2", 2, "--layer 2 is not among the scanned layers [0]"),  # loads
    ("eval-neither-mode", EVAL, 2, "give either --classifier with --pos/--neg, or --lang"),
    ("eval-classifier-missing", f"{EVAL} --classifier {{root}}/missing.json --pos {{good_txt}} --neg {{good_txt}}", 2,
     "--classifier"),
    ("eval-classifier-not-json", f"{EVAL} --classifier {{good_txt}} --pos {{good_txt}} --neg {{good_txt}}", 2,
     "not a classifier saved by `qscope classify fit`"),
    ("eval-classifier-wrong-format", f"{EVAL} --classifier {{classifier_json}} --pos {{good_txt}} --neg {{good_txt}}",
     2, "not a feature classifier file"),
    ("eval-classifier-list", f"{EVAL} --classifier {{list_json}} --pos {{good_txt}} --neg {{good_txt}}", 2,
     "not a classifier saved by"),
    ("eval-classifier-needs-texts", f"{EVAL} --classifier {{classifier_json}}", 2, "--classifier needs --pos and --neg"),
    ("eval-transfer-needs-layers", f"{EVAL} --lang en {{good_txt}} {{good_txt}} {{good_txt}} {{good_txt}}", 2,
     "transfer mode needs --layers"),
    ("eval-transfer-duplicate-names",
     f"{EVAL} --layers 1" + " --lang en {good_txt} {good_txt} {good_txt} {good_txt}" * 2, 2, "--lang names must differ"),
    ("eval-transfer-missing-file", f"{EVAL} --layers 1 --lang en {{good_txt}} {{good_txt}} {{good_txt}} {{root}}/m.txt",
     2, "--lang en"),
    ("eval-fpr-over-one", f"{EVAL} --fpr 2 --classifier {{classifier_json}}", 2, "expected a number in [0, 1]"),
    ("eval-n-boot-negative", f"{EVAL} --n-boot -1 --classifier {{classifier_json}}", 2, "expected a non-negative integer"),
    ("apply-texts-missing", f"classify apply {M} --classifier {{clf_ok_json}} --texts {{root}}/missing.txt", 2,
     "--texts"),
    ("apply-bad-classifier", f"classify apply {M} --classifier {{classifier_json}} --texts {{good_txt}}", 2,
     "not a feature classifier file"),
    ("apply-texts-lists", f"classify apply {M} --classifier {{clf_ok_json}} --texts {{lists_jsonl}}", 2, "got list"),
    ("apply-classifier-missing", f"classify apply {M} --classifier {{root}}/none.json --texts {{good_txt}}", 2,
     "no such file"),
    ("apply-new-tokens-zero", f"classify apply {M} --classifier {{classifier_json}} --texts {{good_txt}} "
                              "--monitor --max-new-tokens 0", 2, "expected a positive integer"),
    # ---- eval-sae
    ("eval-sae-data-missing", EVALSAE.replace("--data {good_txt}", "--data {root}/missing.txt"), 2,
     "no such file or directory"),
    ("eval-sae-data-empty", EVALSAE.replace("--data {good_txt}", "--data {empty_txt}"), 2, "holds no texts"),
    ("eval-sae-dataset-offline", EVALSAE.replace("--data {good_txt}", "--data someone/some-dataset"), 2,
     "hf download --repo-type dataset someone/some-dataset"),
    ("eval-sae-max-length-one", f"{EVALSAE} --max-length 1", 2, "--max-length must be >= 2"),
    ("eval-sae-dense-threshold", f"{EVALSAE} --dense-threshold 2", 2, "expected a number in [0, 1]"),
    ("eval-sae-plot-is-dir", f"{EVALSAE} --plot {{empty_dir}}", 2, "--plot"),
    ("eval-sae-compare-missing", f"{EVALSAE} --compare-model {{root}}/nowhere", 2, "--compare-model"),
    ("eval-sae-old-top-n", f"{EVALSAE} --top-n 0", 2, "expected a positive integer"),
    ("eval-sae-layers-out-of-range", EVALSAE.replace("--layers 1", "--layers 0-9"), 2,  # loads
     "layer 4 is out of range: this model has layers 0..3"),
    # ---- coverage / synth
    ("coverage-features-missing", COV.replace("--features {scored_json}", "--features {root}/f.json"), 2,
     "--features"),
    ("coverage-seed-lists", COV.replace("{seed_jsonl}", "{lists_jsonl}"), 2, "expected a JSON string or object, got list"),
    ("coverage-seed-bad-json", COV.replace("{seed_jsonl}", "{bad_jsonl}"), 2, "not valid JSON"),
    ("coverage-unscored", COV.replace("{scored_json}", "{features_json}"), 2, "feature (1, 3) has no score"),
    ("coverage-features-not-json", COV.replace("{scored_json}", "{good_txt}"), 2, "good.txt"),
    ("coverage-over-context", COV.replace("{seed_jsonl}", "{long_txt}"), 2, "long.txt: text 0 has"),  # loads
    ("apply-over-context", f"classify apply {M} --classifier {{clf_ok_json}} --texts {{long_txt}}", 2,  # loads
     "--texts: text 0 has"),
    ("coverage-tau-nan", f"{COV} --tau nan", 2, "expected a finite number"),
    ("coverage-min-support-zero", f"{COV} --min-support 0", 2, "expected a positive integer"),
    ("synth-no-output", SYN, 2, "give --synthetic OUT.jsonl (or --dry-run)"),
    ("synth-contexts-need-corpus", SYN.replace(" --corpus {good_txt}", "") + " --synthetic {outj}", 2,
     "--generator contexts needs --corpus"),
    ("synth-unknown-style", f"{SYN} --dry-run --styles roleplay,poetry", 2, "unknown style 'poetry'"),
    ("synth-output-exists", f"{SYN} --synthetic {{synth_out_jsonl}}", 2, "exists; resume it"),
    ("synth-same-baseline", f"{SYN} --synthetic {{outj}} --baseline {{outj}}", 2, "must be different files"),
    ("synth-budget-zero", f"{SYN} --synthetic {{outj}} --budget 0", 2, "expected a positive integer"),
    ("synth-llm-needs-model", SYN.replace("--generator contexts", "--generator llm") + " --synthetic {outj}", 2,
     "--generator llm and --explain need --generator-model"),
    # ---- redundancy / subset / demo
    ("redundancy-store-missing", "redundancy --store {root}/nowhere", 2, "--store"),
    ("redundancy-store-empty", "redundancy --store {empty_dir}", 2, "no footprint stores under"),
    ("redundancy-output-dir-is-file", "redundancy --store {empty_dir} --output-dir {good_txt}", 2,
     "exists and is not a directory"),
    ("redundancy-scores-missing", "redundancy --store {empty_dir} --scores a={root}/s.json", 2, "no such file"),
    ("redundancy-scores-no-equals", "redundancy --store {empty_dir} --scores a", 2, "expected NAME=FILE"),
    ("redundancy-scores-twice", "redundancy --store {empty_dir} --scores a={good_txt} --scores a={good_txt}", 2,
     "--scores names a benchmark twice"),
    ("subset-n-zero", "subset --store {empty_dir} --benchmark a --n 0", 2, "expected a positive integer"),
    ("subset-store-missing", "subset --store {root}/nowhere --benchmark a --n 3", 2, "--store"),
    ("subset-benchmark-missing", "subset --store {empty_dir} --benchmark a --n 3", 2, "no footprint store at"),
    ("subset-output-is-dir", "subset --store {empty_dir} --benchmark a --n 3 --output {empty_dir}", 2,
     "is a directory"),
    ("demo-output-dir-is-file", "demo --output-dir {good_txt}", 2, "exists and is not a directory"),
    ("demo-old-out-is-file", "demo --out {good_txt}", 2, "exists and is not a directory"),
]


def _prefix(argv: list[str], fragment: str) -> str:
    """``qscope <cmd>`` (``qscope classify fit``), or ``qscope`` for errors of the top-level parser."""
    if fragment.startswith(("unrecognized arguments", "invalid choice: 'nope'")):
        return "qscope"
    words = [a for a in argv if a != "--verbose"]
    return "qscope " + " ".join(words[:2] if words[0] == "classify" else words[:1])


def _argv(command, paths: dict[str, str]) -> list[str]:
    parts = command.split() if isinstance(command, str) else command
    return [part.format_map(paths) for part in parts]


@pytest.fixture
def offline(tmp_path_factory, monkeypatch):
    """An empty hub cache with downloads disabled (so hub ids fail fast, never wait on the network)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path_factory.mktemp("empty_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))


def test_the_table_is_large_and_unique():
    assert len(CASES) >= 100
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, w, tmp_path, capsys, offline):
    name, command, code, fragment = case
    paths = {**w, "out": str(tmp_path / "out"), "outj": str(tmp_path / "out.json")}
    argv = _argv(command, paths)
    if "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    captured = capsys.readouterr()
    assert status == code, captured.err
    assert captured.out == ""
    *warnings, last = [line for line in captured.err.splitlines() if line.strip()]
    assert all(": warning: " in line and "is deprecated" in line for line in warnings), captured.err
    assert last.startswith(f"{_prefix(argv, fragment)}: error: "), captured.err
    assert fragment in last, captured.err
    assert "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_device_cuda_without_cuda(w, tmp_path, capsys, offline):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = _argv(f"{STEER} --device cuda --prompt hi", {**w, "outj": str(tmp_path / "o.json")})
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qscope steer: error: --device cuda: ") and "use --device cpu" in err


def test_verbose_shows_the_traceback(w, tmp_path, capsys, offline):
    argv = _argv(f"--verbose {STEER} --prompt hi", {**w, "outj": str(tmp_path / "o.json")})
    argv[argv.index("--sae") + 1] = w["corrupt"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "SAEFormatError" in err
    assert err.splitlines()[-1].startswith("qscope steer: error: ")
    argv.remove("--verbose")  # also accepted after the subcommand
    assert main([*argv, "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_deprecated_spellings_warn_and_still_work(capsys):
    from qscope_plugins.cli import build_parser

    args = build_parser(["features"]).parse_args(
        ["features", "--model", "m", "--sae", "s", "--layer", "1", "2", "--keep-first", "--text", "x"])
    assert args.layers == [1, 2] and args.skip_first_token is False
    err = capsys.readouterr().err
    assert "--layer is deprecated; use --layers" in err and "--keep-first is deprecated; use --keep-first-token" in err
    args = build_parser(["eval-sae"]).parse_args(
        ["eval-sae", "--model", "m", "--sae", "s", "--layers", "0-2", "--data", "d", "--json", "r.json", "--top-n", "3"])
    assert args.output == Path("r.json") and args.layers == [0, 1, 2] and args.top == 3
    err = capsys.readouterr().err
    assert "--json PATH is deprecated; use --output PATH" in err and "--top-n is deprecated; use --top" in err
    args = build_parser(["classify"]).parse_args(
        ["classify", "fit", "--model", "m", "--sae", "s", "--pos", "p", "--neg", "n", "--save", "c.json", "--top-k", "2"])
    assert args.output == Path("c.json") and args.top == 2 and args.layers == "all"
    assert "--save is deprecated; use --output" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code, fragment", [
    (["features", "--model", "{model}", "--sae", "{corrupt}", "--k", "8", "--layers", "1", "--text", "hi", "--no-progress",
      "--output", "{outj}"], 1, "qscope features: error: "),
])
def test_a_real_process_prints_one_line(argv, code, fragment, w, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    argv = _argv(argv, {**w, "outj": str(out / "o.json")})
    proc = subprocess.run([sys.executable, "-m", "qscope_plugins", *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == code and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(fragment), proc.stderr
    assert "Traceback" not in proc.stderr and list(out.iterdir()) == []
