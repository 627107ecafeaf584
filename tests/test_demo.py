"""``qscope demo`` end to end on the shipped nano model (quick sizes), and its building blocks."""

from __future__ import annotations

import json

import pytest

from qscope_plugins.cli import main
from qscope_plugins.demo.assets import ASSETS, MODEL_DIR, corpus_generator
from qscope_plugins.demo.language import script_tokens, switched

KEYS = ("code_switch_rate_before", "code_switch_rate_after", "perplexity_ratio", "classifier_f1",
        "redundancy_spearman", "sae_explained_variance_min")


def test_script_tokens_mark_exactly_the_b_script():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / MODEL_DIR)
    flags = script_tokens(tok)
    doc = next(d for d in corpus_generator().documents(1, 50) if d.lang == "B")
    ids = tok(doc.text)["input_ids"]
    b_text = "".join(tok.decode([i]) for i in ids if flags[i])
    assert b_text and all(switched(c) or c in " \ufffd" for c in b_text)
    latin = [tok.decode([i]) for i in ids if not flags[i]]
    assert any(name in "".join(latin) for name in corpus_generator().lex.names)  # shared names stay unflagged
    assert not switched("Ana sees 3 red apples .") and switched("Ana 的")


@pytest.mark.slow
def test_demo_json_summary_and_files(tmp_path, capsys):
    """The quick demo prints one JSON object with the issue's keys, writes the same summary and plots,
    and the planted effects show: suppression cuts switching, the classifier and R_hat work."""
    assert main(["demo", "--json", "--quick", "--output-dir", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in KEYS:
        assert isinstance(summary[key], float), key
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for plot in ("code_switch.png", "classifier.png", "redundancy.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["backends_agree"] is True
    assert summary["sae_explained_variance_min"] >= 0.9
    cs = summary["code_switch"]
    high = [r for r, p in zip(cs["rate_by_topic_before"], cs["ground_truth_switch_prob"]) if p > 0.5]
    low = [r for r, p in zip(cs["rate_by_topic_before"], cs["ground_truth_switch_prob"]) if p < 0.5]
    assert min(high) > 0.8 and max(low) < 0.2  # greedy decoding follows the planted switch rule
    assert summary["code_switch_rate_after"] <= 0.5 * summary["code_switch_rate_before"]
    assert summary["perplexity_ratio"] <= 1.10
    assert summary["classifier_f1"] >= 0.9
    assert summary["redundancy_spearman"] >= 0.6
