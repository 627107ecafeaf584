"""What the app's tabs compute (no browser): the Explorer over the nano model."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from _nano_explorer import LANGUAGE_FEATURE, a_text, b_text, nano, switch_prompt

from qscope_plugins.app.explorer import Explorer
from qscope_plugins.cli import main
from qscope_plugins.demo.assets import ASSETS, MODEL_DIR, SAE_DIR
from qscope_plugins.recipes.classifier import FeatureClassifier
from qscope_plugins.recipes.discovery import contrast


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    backend, saes, k = nano()
    return Explorer(backend, saes, model=str(ASSETS / MODEL_DIR), sae=str(ASSETS / SAE_DIR), k=k)


def test_text_tab_finds_the_language_feature_on_language_b_only(explorer):
    layer, feature = LANGUAGE_FEATURE
    on_b = explorer.text(b_text(), [layer], top_k=5)
    assert (layer, feature) in [(n, f) for n, f, _ in on_b.rows]
    assert f"L{layer} #{feature}" in on_b.html
    assert (layer, feature) not in [(n, f) for n, f, _ in explorer.text(a_text(), [layer], top_k=5).rows]
    ids = explorer.backend.encode([b_text()])[0]
    assert len(on_b.tokens) == len(ids) - 1  # first token excluded
    assert len(explorer.text(b_text(), [layer], exclude_first=False).tokens) == len(ids)


@torch.no_grad()
def test_text_tab_raw_mode_shows_pre_activations(explorer):
    layer = 2
    result = explorer.text(a_text(), [layer], top_k=3, raw=True)
    (rb,) = list(explorer.backend.residuals([a_text()], [layer]))
    pre = explorer.saes[layer].encode_pre(rb.hidden[layer][0, 1:].float())
    for _, f, acts in result.rows:
        assert acts == pytest.approx(pre[:, f].tolist(), abs=2e-3)
    assert [f for _, f, _ in result.rows] == pre.mean(0).topk(3).indices.tolist()


def test_compare_tab_is_the_discovery_contrast_with_the_official_options(explorer):
    texts_a, texts_b = [b_text()], [a_text()]
    rows, table = explorer.compare(texts_a, texts_b, [3], top_k=4, drop_shared=True)
    expected = contrast(explorer.backend, {3: explorer.saes[3]}, texts_a, texts_b, top=4, drop_shared_tokens=True)
    assert rows == expected and "qs-compare" in table
    assert explorer.comparison == {(r.layer, r.feature): abs(r.rate_diff) for r in rows}
    raw_rows, _ = explorer.compare(texts_a, texts_b, [3], top_k=4, raw=True)
    pre = {}
    for side, texts in (("a", texts_a), ("b", texts_b)):
        (rb,) = list(explorer.backend.residuals(texts, [3]))
        pre[side] = explorer.saes[3].encode_pre(rb.hidden[3][0, 1:].float())  # first token excluded
    diff = (pre["a"] > 0).double().mean(0) - (pre["b"] > 0).double().mean(0)
    assert [r.feature for r in raw_rows] == diff.abs().topk(4).indices.tolist()
    assert [r.rate_diff for r in raw_rows] == pytest.approx(diff[[r.feature for r in raw_rows]].tolist())
    with pytest.raises(ValueError, match="both sides"):
        explorer.compare(["x"], [" "])


def test_strength_presets_follow_the_official_app(explorer):
    explorer.comparison = {}
    assert [explorer.strength(p, 3, [1]) for p in ("Light", "Medium", "Strong")] == [5.0, 20.0, 100.0]
    assert explorer.strength("Custom", 3, [1], custom=-7.5) == -7.5
    explorer.comparison = {(3, 1): 0.2, (3, 2): 0.4}
    assert [explorer.strength(p, 3, [1]) for p in ("Light", "Medium", "Strong")] == pytest.approx([0.1, 0.4, 2.0])
    assert explorer.strength("Strong", 3, [99]) == pytest.approx(4.0)  # not compared: the global max diff
    explorer.comparison = {}


def test_steer_tab_differs_from_baseline_and_its_command_reproduces_it(explorer, capsys):
    layer, feature = LANGUAGE_FEATURE
    result = explorer.steer(switch_prompt(), layer, [feature], preset="Custom", custom=0.0, mode="clamp",
                            max_new_tokens=12)
    assert result["steered"] != result["baseline"]
    argv = shlex.split(result["command"])
    assert argv[:2] == ["qscope", "steer"] and "--clamp" in argv
    assert main(argv[1:] + ["--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steered"][0]["text"] == result["steered"] and out["baseline"][0]["text"] == result["baseline"]

    added = explorer.steer(switch_prompt(), layer, [feature], preset="Strong", positions="0,2,5-8",
                           generated=False, max_new_tokens=6)
    assert "--prompt-only" in added["command"] and "--alpha 100" in added["command"]
    with pytest.raises(ValueError, match="bad position"):
        explorer.steer("x", layer, [feature], positions="1-x")


def test_monitor_tab_flags_tokens_where_the_feature_fires(explorer):
    layer, feature = LANGUAGE_FEATURE
    classifier = FeatureClassifier((feature,), (layer,), 512)
    flagged, flags, html = explorer.monitor(classifier, b_text())
    assert flagged and any(flags) and not flags[0]
    ids = explorer.backend.encode([b_text()])[0]
    (rb,) = list(explorer.backend.residuals([ids], [layer]))
    codes = explorer.saes[layer].encode_sparse(rb.hidden[layer][0].float())
    fires = ((codes.indices == feature) & (codes.values > 0)).any(-1).tolist()
    assert flags[1:] == fires[1:]
    assert sum(explorer.monitor(classifier, a_text())[1]) < sum(flags) / 2  # it rarely fires on A text
    assert "no feature index" in explorer.feature(3, 1).lower()
