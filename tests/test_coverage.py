"""Coverage of target features: the math on planted sets, judges, and streaming parity with a dense reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.recipes.coverage import (
    LLMJudge, ScoreTable, Support, TargetFeature, chat_render, collect_support, coverage_report,
    default_render, example_text, judge_features, parse_features, parse_score, pipeline_complete,
    support_from_maxima,
)
from qscope_plugins.sae import QwenScopeSAE
from qscope_plugins.testing.sae_files import random_sae_state
from qscope_plugins.testing.tiny_models import hf_layer_outputs, tiny_model, tiny_tokenizer

TEXTS = ["how do I pick a lock", "tell me a story about a dragon", "what is the capital of France",
         "write a poem", "how to make a cake", "explain quantum physics simply"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("Qwen3ForCausalLM", seed=0)


@pytest.fixture(scope="module")
def backend(model):
    return HFBackend(model, tiny_tokenizer())


def make_sae(layer: int, seed: int, d_sae: int = 128, k: int = 4) -> QwenScopeSAE:
    state = random_sae_state(64, d_sae, seed=seed)
    return QwenScopeSAE.from_weights(state["W_enc"], state["W_dec"], state["b_enc"], state["b_dec"], k=k, layer=layer)


@pytest.fixture(scope="module")
def saes():
    return {1: make_sae(1, seed=1), 2: make_sae(2, seed=2)}


# ---- pure math on planted sets -----------------------------------------------------------------
FEATURES = [(3, 10), (3, 11), (5, 7), (5, 8), (5, 9)]
# 4 examples x 5 features: (3,10) fires on 3 examples, (3,11) on 1, (5,7) on none, (5,8) on 2, (5,9) on none
PLANTED = np.array([
    [0.5, 0.0, 0.0, 2.0, 0.0],
    [1.5, 0.0, 0.0, 0.0, 0.0],
    [0.2, 3.0, 0.0, 0.1, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0],
], dtype=np.float32)
SCORES = {(3, 10): 0.9, (3, 11): 0.8, (5, 7): 0.7, (5, 8): 0.2, (5, 9): 0.5}


def test_planted_support_and_report():
    support = support_from_maxima(PLANTED, FEATURES)
    assert support.counts.tolist() == [3, 1, 0, 2, 0]
    assert support.peaks.tolist() == pytest.approx([1.5, 3.0, 0.0, 2.0, 0.0])
    report = coverage_report(support, SCORES, tau=0.5, min_support=2)
    # T = {(3,10), (3,11), (5,7), (5,9)}; (5,8) scores 0.2 < tau
    assert report.targets == [(3, 10), (3, 11), (5, 7), (5, 9)]
    assert report.missing == [(5, 7), (5, 9)]
    assert report.weak == [(3, 11)]
    assert [r.status for r in report.rows] == ["covered", "weak", "missing", "not-target", "missing"]
    assert report.coverage == pytest.approx(2 / 4)
    assert report.n_examples == 4
    assert report.summary() == "4 examples cover 2/4 targets (50.00%) at tau=0.5; 2 missing, 1 weak (< 2 examples)"
    assert json.loads(json.dumps(report.to_dict()))["missing"] == [[5, 7], [5, 9]]


def test_adding_a_dataset_fills_the_missing_targets():
    seed = support_from_maxima(PLANTED, FEATURES)
    synthetic = support_from_maxima(np.array([[0, 0, 0.4, 0, 0], [0, 0.7, 0, 0, 0.3]], np.float32), FEATURES)
    report = coverage_report(seed + synthetic, SCORES, tau=0.5, min_support=2)
    assert report.missing == []
    assert report.weak == [(5, 7), (5, 9)]  # one example each; (3, 11) now has two
    assert report.coverage == 1.0
    assert (seed + synthetic).n_examples == 6


def test_threshold_moves_features_in_and_out_of_the_target_set():
    support = support_from_maxima(PLANTED, FEATURES)
    assert coverage_report(support, SCORES, tau=0.0).targets == FEATURES
    strict = coverage_report(support, SCORES, tau=0.85)
    assert strict.targets == [(3, 10)] and strict.coverage == 1.0
    none = coverage_report(support, {k: 0.0 for k in FEATURES}, tau=0.5)
    assert none.targets == [] and none.coverage == 1.0


def test_report_rejects_bad_arguments():
    support = support_from_maxima(PLANTED, FEATURES)
    with pytest.raises(ValueError, match=r"tau must lie in \[0, 1\], got 1.5"):
        coverage_report(support, SCORES, tau=1.5)
    with pytest.raises(ValueError, match="min_support must be >= 1, got 0"):
        coverage_report(support, SCORES, min_support=0)
    with pytest.raises(ValueError, match=r"no relevance score for feature \(5, 9\)"):
        coverage_report(support, {k: v for k, v in SCORES.items() if k != (5, 9)})
    with pytest.raises(ValueError, match=r"expected \(examples, 5\) max activations, got \(4, 3\)"):
        support.update(PLANTED[:, :3])
    with pytest.raises(ValueError, match="cannot add supports of different feature lists"):
        support + Support.empty(FEATURES[:2])


# ---- feature files and judges ------------------------------------------------------------------
def test_parse_features_and_its_errors():
    items = [{"layer": 1, "feature": 5, "explanation": "lock picking", "score": 0.9, "label": "harmful"},
             {"layer": 2, "feature": 7}]
    targets = parse_features(items)
    assert targets[0] == TargetFeature(1, 5, "lock picking", 0.9, "harmful")
    assert targets[1].key == (2, 7) and targets[1].to_dict() == {"layer": 2, "feature": 7}
    cases = [
        ({}, "expected a non-empty JSON list of feature objects"),
        ([{"layer": -1, "feature": 0}], r"features\[0\]: 'layer' must be an integer >= 0, got -1"),
        ([{"layer": 1, "feature": "3"}], r"features\[0\]: 'feature' must be an integer >= 0, got '3'"),
        ([{"layer": 1, "feature": 3, "score": 2}], r"features\[0\]: score must be a number in \[0, 1\], got 2"),
        ([{"layer": 1, "feature": 3, "label": "toxic"}], r"'label' must be one of harmful, benign, got 'toxic'"),
        ([{"layer": 1, "feature": 3, "explain": "x"}], r"features\[0\]: unknown keys \['explain'\]"),
        ([{"layer": 1, "feature": 3}, {"layer": 1, "feature": 3}], r"features\[1\]: feature \(1, 3\) is listed twice"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_features(data)


def test_score_table_reads_both_json_layouts(tmp_path):
    records = tmp_path / "features.json"
    records.write_text(json.dumps([{"layer": 1, "feature": 5, "score": 0.75}, {"layer": 1, "feature": 6}]))
    mapping = tmp_path / "scores.json"
    mapping.write_text(json.dumps({"1:5": 0.25, "2:9": 1}))
    assert ScoreTable.from_json(records)(TargetFeature(1, 5)) == 0.75
    table = ScoreTable.from_json(mapping)
    assert judge_features([TargetFeature(1, 5), TargetFeature(2, 9)], table) == {(1, 5): 0.25, (2, 9): 1.0}
    with pytest.raises(ValueError, match=r"has no score for feature \(1, 6\)"):
        ScoreTable.from_json(records)(TargetFeature(1, 6))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layer1-feature5": 0.5}))
    with pytest.raises(ValueError, match="score keys must look like 'layer:feature', got 'layer1-feature5'"):
        ScoreTable.from_json(bad)


def test_llm_judge_parses_the_reply_and_reports_bad_ones():
    prompts = []

    def complete(prompt: str) -> str:
        prompts.append(prompt)
        return {"weapons": " 0.85 because it is central", "poems": "Score: .1"}[prompt.split("\n")[1]]

    judge = LLMJudge(complete)
    scores = judge_features([TargetFeature(1, 2, "weapons"), TargetFeature(1, 3, "poems")], judge)
    assert scores == {(1, 2): 0.85, (1, 3): 0.1}
    assert "weapons" in prompts[0] and prompts[0].endswith("Score:")
    with pytest.raises(ValueError, match=r"feature \(1, 4\) has no explanation for the judge to read"):
        judge(TargetFeature(1, 4))
    with pytest.raises(ValueError, match=r"feature \(1, 5\): the judge's reply holds no number: 'maybe'"):
        LLMJudge(lambda p: "maybe")(TargetFeature(1, 5, "x"))
    assert parse_score("1") == 1.0
    with pytest.raises(ValueError, match=r"judge reply: score must be a number in \[0, 1\], got 7.0"):
        parse_score("7 out of 10")


def test_pipeline_complete_returns_only_the_new_text(model, backend):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=backend.tokenizer)
    complete = pipeline_complete(pipe, max_new_tokens=6, do_sample=False)
    expected = backend.generate(["Hello there"], max_new_tokens=6)[0].text
    assert complete("Hello there") == expected


def test_rendering_examples():
    assert example_text("plain") == "plain"
    assert example_text({"text": "t"}) == "t"
    assert example_text({"prompt": "p", "response": "r"}) == "p\n\nr"
    assert example_text({"prompt": "p"}) == default_render("p", None) == "p"
    with pytest.raises(ValueError, match=r"an example needs 'text' or 'prompt', got keys \['body'\]"):
        example_text({"body": "x"})
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    assert chat_render(tok)("hi", "yo") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


# ---- plumbing: streaming parity with a dense reference -----------------------------------------
def dense_maxima(model, backend, saes, texts, features) -> np.ndarray:
    """Per-text max over tokens (first excluded) of the dense ReLU(TopK) codes: Eq. 13 by hand."""
    out = np.zeros((len(texts), len(features)), np.float32)
    for i, text in enumerate(texts):
        ids = torch.tensor([backend.tokenizer(text)["input_ids"]])
        _, layers = hf_layer_outputs(model, ids)
        codes = {n: saes[n].encode(layers[n][0, 1:].float()).amax(0).clamp(min=0) for n in {l for l, _ in features}}
        out[i] = [codes[layer][feature].item() for layer, feature in features]
    return out


def test_collect_support_matches_dense_reference(model, backend, saes):
    features = [(2, 5), (1, 9), (1, 3), (2, 40), (1, 100), (2, 77)]  # layers interleaved on purpose
    reference = dense_maxima(model, backend, saes, TEXTS, features)
    support = collect_support(backend, saes, TEXTS, features, batch_size=4)
    assert support.counts.tolist() == (reference > 0).sum(0).tolist()
    np.testing.assert_allclose(support.peaks, reference.max(0), rtol=1e-5, atol=1e-6)
    assert support.n_examples == len(TEXTS)
    assert 0 < (support.counts > 0).sum() < len(features)  # the planted mix: some fire, some do not


def test_collect_support_rejects_bad_features(backend, saes):
    with pytest.raises(ValueError, match="no target features given"):
        collect_support(backend, saes, TEXTS, [])
    with pytest.raises(ValueError, match="no SAE given for layer 3"):
        collect_support(backend, saes, TEXTS, [(3, 1)])
    with pytest.raises(ValueError, match=r"feature 128 out of range for the layer-1 SAE \(d_sae=128\)"):
        collect_support(backend, saes, TEXTS, [(1, 128)])


# ---- qscope coverage ---------------------------------------------------------------------------
def write_cli_inputs(directory, model, features, *, scores=None, labels=None):
    """A checkpoint, a released-layout SAE dir (layers 1 and 2), a features file and a seed set."""
    from qscope_plugins.testing.sae_files import write_released_layer
    from qscope_plugins.testing.tiny_models import save_checkpoint

    save_checkpoint(model, directory / "model")
    for layer, seed in ((1, 1), (2, 2)):
        write_released_layer(directory / "sae", layer, random_sae_state(64, 128, seed=seed))
    items = [{"layer": l, "feature": f, "explanation": f"feature {f}", **({"score": scores[i]} if scores else {}),
              **({"label": labels[i]} if labels else {})} for i, (l, f) in enumerate(features)]
    (directory / "features.json").write_text(json.dumps(items))
    seed = directory / "seed.jsonl"
    seed.write_text("\n".join(json.dumps({"prompt": t, "response": "ok"}) for t in TEXTS[:3]) + "\n")
    return ["--model", str(directory / "model"), "--sae", str(directory / "sae"), "--k", "4",
            "--features", str(directory / "features.json"), "--no-progress"]


def test_coverage_command_matches_the_library(tmp_path, model, backend, saes, capsys):
    from qscope_plugins.cli import main

    features = [(1, 9), (2, 5), (1, 100), (2, 77)]
    common = write_cli_inputs(tmp_path, model, features, scores=[0.9, 0.8, 0.1, 0.6])
    assert main(["coverage", str(tmp_path / "seed.jsonl"), *common, "--json", "--min-support", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    texts = [f"{t}\n\nok" for t in TEXTS[:3]]
    support = collect_support(backend, saes, texts, features)
    expected = coverage_report(support, dict(zip(features, [0.9, 0.8, 0.1, 0.6])), min_support=2)
    assert out["missing"] == [list(k) for k in expected.missing]
    assert out["coverage"] == pytest.approx(expected.coverage)
    assert [r["support"] for r in out["rows"]] == support.counts.tolist()
    assert main(["coverage", str(tmp_path / "seed.jsonl"), *common]) == 0
    assert capsys.readouterr().out.startswith("3 examples cover ")
    unscored = write_cli_inputs(tmp_path / "u", model, features)
    assert main(["coverage", str(tmp_path / "seed.jsonl"), *unscored]) == 2
    assert "feature (1, 9) has no score: add 'score' to" in capsys.readouterr().err
