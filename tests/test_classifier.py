"""SAE-feature classifiers on planted data: recovery, baselines, layer selection, metrics, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from qscope_plugins.recipes import classifier as clf
from qscope_plugins.recipes import classifier_eval as ev
from qscope_plugins.recipes.pooling import pool_codes

D_SAE = 300
PLANTED = (17, 42, 123)


def planted(rng, n, positive, planted=PLANTED, rate=0.8, background=0.05, d_sae=D_SAE) -> sp.csr_array:
    """Example-level max activations: background features fire at random in both classes; the planted
    ones fire (each with probability ``rate``) only on positives."""
    fires = rng.random((n, d_sae)) < background
    if positive:
        fires[:, list(planted)] = rng.random((n, len(planted))) < rate
    else:
        fires[:, list(planted)] = False
    return sp.csr_array(np.where(fires, rng.uniform(1, 50, size=(n, d_sae)), 0.0).astype(np.float32))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {
        "pos": planted(rng, 400, True),
        "neg": planted(rng, 400, False),
        "test_pos": planted(rng, 300, True),
        "test_neg": planted(rng, 300, False),
    }


def test_planted_features_recovered_with_high_f1(data):
    model = clf.fit(data["pos"], data["neg"], top_k=3)
    assert sorted(model.features) == sorted(PLANTED)
    assert all(d > 0.6 for d in model.deltas)
    result = ev.evaluate(model, data["test_pos"], data["test_neg"], n_boot=200)
    assert result.f1 >= 0.95
    assert result.f1_low <= result.f1 <= result.f1_high
    assert result.precision == 1.0  # planted features never fire on negatives


def test_random_control_is_near_chance(data):
    control = clf.random_control(data["pos"], data["neg"], top_k=3, seed=1)
    assert not set(control.features) & set(PLANTED)
    result = ev.evaluate(control, data["test_pos"], data["test_neg"], n_boot=0)
    assert abs(result.accuracy - 0.5) < 0.07
    assert result.f1_low is None


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_all_input_formats_agree(data):
    dense = data["pos"].toarray()
    reference = clf.fit(data["pos"], data["neg"], top_k=5)
    tensor = torch.from_numpy(dense)
    for pos in (dense, tensor, tensor.to_sparse(), tensor.to_sparse_csr(), sp.coo_matrix(dense)):
        model = clf.fit(pos, data["neg"], top_k=5)
        assert model.features == reference.features
        np.testing.assert_array_equal(model.predict(pos), reference.predict(data["pos"]))


def test_eps_threshold_counts_strictly_greater():
    pos = np.array([[2.0, 0.5], [2.0, 0.0]])
    neg = np.array([[0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(clf.feature_deltas(pos, neg), [0.5, 0.0])
    np.testing.assert_allclose(clf.feature_deltas(pos, neg, eps=1.0), [1.0, 0.0])
    model = clf.fit(pos, neg, top_k=1, eps=1.0)
    assert model.predict(np.array([[1.0, 9.0], [1.5, 0.0]])).tolist() == [0, 1]


def test_bad_input_errors(data):
    with pytest.raises(ValueError, match="^pos_acts has no examples$"):
        clf.fit(np.zeros((0, 10)), np.ones((5, 10)))
    with pytest.raises(ValueError, match="^pos_acts has d_sae=10 but neg_acts has d_sae=12$"):
        clf.fit(np.ones((3, 10)), np.ones((3, 12)))
    with pytest.raises(ValueError, match=r"^eps must be >= 0 \(Top-k ReLU activations are never negative\), got -1.0$"):
        clf.fit(np.ones((3, 10)), np.ones((3, 10)), eps=-1.0)
    with pytest.raises(ValueError, match=r"^top_k must be between 1 and d_sae \(10\), got 11$"):
        clf.fit(np.ones((3, 10)), np.ones((3, 10)), top_k=11)
    with pytest.raises(ValueError, match=r"^pos_acts must be a 2-D examples x d_sae matrix, got shape \(10,\)$"):
        clf.fit(np.ones(10), np.ones((3, 10)))
    model = clf.fit(data["pos"], data["neg"], top_k=3)
    with pytest.raises(ValueError, match=f"^acts has d_sae=10 but the classifier was fit with d_sae={D_SAE}$"):
        model.predict(np.ones((2, 10)))
    with pytest.raises(ValueError, match="^evaluation needs both classes, got 0 positive and 300 negative examples$"):
        ev.evaluate(model, np.zeros((0, D_SAE)), data["test_neg"])


def test_json_round_trip_without_training_data(tmp_path, data):
    provenance = dict(model="Qwen/Qwen3-1.7B-Base", sae_source="Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", sae_revision="abc")
    model = clf.fit(data["pos"], data["neg"], top_k=3, layer=7, **provenance)
    path = model.save(tmp_path / "toxic.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "qscope-feature-classifier" and raw["rule"] == "or"
    assert raw["features"] == list(model.features) and raw["layers"] == [7, 7, 7] and raw["eps"] == 0.0
    loaded = clf.FeatureClassifier.load(path)
    assert loaded == model
    np.testing.assert_array_equal(loaded.predict({7: data["test_pos"]}), model.predict(data["test_pos"]))
    raw["format"] = "something-else"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="^not a feature classifier file: format is 'something-else'"):
        clf.FeatureClassifier.load(path)


def test_layer_selection_and_composition():
    rng = np.random.default_rng(2)
    strengths = {0: 0.3, 1: 0.9, 2: 0.6}
    pos = {n: planted(rng, 300, True, planted=(10 + n,), rate=r) for n, r in strengths.items()}
    neg = {n: planted(rng, 300, False, planted=(10 + n,)) for n in strengths}
    deltas = clf.layer_deltas(pos, neg)
    scores = clf.top1_diff(deltas)
    assert clf.select_layer(deltas) == 1
    assert scores[1] > scores[2] > scores[0]
    composed = clf.compose_layers(deltas, m=2)
    assert composed.layers == (1, 2) and composed.features == (11, 12)
    with pytest.raises(ValueError, match=r"^this classifier uses layers \[1, 2\]; pass a mapping \{layer: acts\}$"):
        composed.predict(pos[1])


def test_composition_covers_complementary_layers():
    """Layer 0's feature fires on one half of the positives, layer 1's on the other: only the OR across
    layers finds them all."""
    rng = np.random.default_rng(3)

    def layer_acts(n_pos, n_neg, feature, half):
        pos = planted(rng, n_pos, True, planted=(feature,), rate=1.0).toarray()
        rows = np.arange(n_pos) % 2 == half
        pos[~rows, feature] = 0.0
        return pos, planted(rng, n_neg, False, planted=(feature,))

    discovery = {n: layer_acts(400, 400, 5, n) for n in (0, 1)}
    held_out = {n: layer_acts(200, 200, 5, n) for n in (0, 1)}
    deltas = clf.layer_deltas({n: d[0] for n, d in discovery.items()}, {n: d[1] for n, d in discovery.items()})
    composed = clf.compose_layers(deltas, m=2)
    test_pos, test_neg = ({n: held_out[n][i] for n in (0, 1)} for i in (0, 1))
    single = ev.evaluate(clf.fit(*discovery[0], top_k=1, layer=0), held_out[0][0], held_out[0][1], n_boot=0)
    both = ev.evaluate(composed, test_pos, test_neg, n_boot=0)
    assert single.recall == pytest.approx(0.5)
    assert both.recall == 1.0 and both.f1 >= 0.95


def test_weighted_variant_uses_magnitudes():
    """Feature 5 fires on every example, strongly on positives and weakly on negatives: the OR rule
    cannot tell them apart, the logistic head on its max activation can."""
    rng = np.random.default_rng(4)

    def split(n):
        pos, neg = planted(rng, n, True, planted=(5,), rate=1.0).toarray(), planted(rng, n, False, planted=(5,)).toarray()
        pos[:, 5], neg[:, 5] = rng.uniform(20, 40, n), rng.uniform(1, 5, n)
        return pos, neg

    (pos, neg), (test_pos, test_neg) = split(300), split(200)
    assert clf.feature_deltas(pos, neg)[5] == 0.0  # fires on every example of both classes
    model = clf.FeatureClassifier(features=(5,), layers=(None,), d_sae=D_SAE)
    assert ev.evaluate(model, test_pos, test_neg, n_boot=0).f1 == pytest.approx(2 / 3)
    weighted = clf.reweight(model, pos, neg)
    assert weighted.rule == "logistic" and weighted.weights[0] > 0
    assert ev.evaluate(weighted, test_pos, test_neg, n_boot=0).f1 >= 0.95
    assert clf.FeatureClassifier.from_dict(json.loads(json.dumps(weighted.to_dict()))) == weighted


def test_linear_probe_recovers_planted_direction():
    rng = np.random.default_rng(4)
    direction = rng.normal(size=64)
    direction /= np.linalg.norm(direction)
    residual = lambda n, y: rng.normal(size=(n, 64)) + 3 * y * direction  # noqa: E731
    probe = clf.fit_linear_probe(torch.from_numpy(residual(300, 1)), residual(300, 0))
    cosine = probe.weights @ direction / np.linalg.norm(probe.weights)
    assert cosine > 0.9
    accuracy = ev.binary_metrics(np.r_[np.ones(200), np.zeros(200)], probe.predict(np.vstack([residual(200, 1), residual(200, 0)])))
    assert accuracy["accuracy"] > 0.9


def test_metrics_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [1, 1, 0, 1, 0, 0, 0]
    m = ev.binary_metrics(y, p)
    assert m == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "accuracy": 5 / 7}
    scores = [0.9, 0.8, 0.3, 0.8, 0.5, 0.1, 0.0]
    assert ev.tpr_at_fpr(y, scores, fpr=0.0) == pytest.approx(1 / 3)  # threshold 0.8 (tied): only 0.9 passes
    assert ev.tpr_at_fpr(y, scores, fpr=0.25) == pytest.approx(2 / 3)  # one false positive allowed: t = 0.5
    assert ev.tpr_at_fpr(y, scores, fpr=1.0) == 1.0
    with pytest.raises(ValueError, match="^labels and predictions must be 1-D arrays of 0/1$"):
        ev.binary_metrics([0, 2], [0, 1])


def test_bootstrap_interval_shrinks_with_more_examples():
    rng = np.random.default_rng(5)

    def width(n):
        y = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.8, y, 1 - y)
        estimate, low, high = ev.bootstrap_ci(y, pred, n_boot=500, seed=0)
        assert low <= estimate <= high
        return high - low

    assert width(2000) < width(100) / 2


def test_transfer_matrix_and_jaccard():
    rng = np.random.default_rng(6)
    shared, other = (1, 2, 3), (200, 201, 202)
    langs = {"en": shared, "fr": shared, "zh": other}
    split = lambda feats, n: (planted(rng, n, True, planted=feats), planted(rng, n, False, planted=feats))  # noqa: E731
    discovery = {lang: split(feats, 300) for lang, feats in langs.items()}
    held_out = {lang: split(feats, 200) for lang, feats in langs.items()}
    sources, targets, f1 = ev.transfer_matrix(discovery, held_out, top_k=3)
    assert sources == targets == ["en", "fr", "zh"]
    assert f1[0, 1] >= 0.95 and f1[1, 0] >= 0.95 and f1[2, 2] >= 0.95
    assert f1[0, 2] < 0.3 and f1[2, 0] < 0.3
    deltas = {lang: clf.feature_deltas(*d) for lang, d in discovery.items()}
    jac = ev.top_feature_jaccard(deltas, k=3)
    np.testing.assert_allclose(jac, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_data_efficiency_curve(data):
    discovery, held_out = (data["pos"], data["neg"]), (data["test_pos"], data["test_neg"])
    points = ev.data_efficiency(discovery, held_out, fractions=(0.05, 0.5, 1.0), top_k=3, n_repeats=3)
    assert [p.fraction for p in points] == [0.05, 0.5, 1.0]
    assert points[-1].jaccard_with_full == 1.0 and points[-1].f1_std == 0.0
    assert points[1].f1_mean >= 0.95
    assert points[0].jaccard_with_full <= points[1].jaccard_with_full


def test_pool_codes_matches_dense_reduction():
    rng = np.random.default_rng(7)
    b, t, k, d = 3, 5, 4, 20
    values = torch.from_numpy(rng.uniform(-1, 3, size=(b, t, k)).astype(np.float32))
    indices = torch.from_numpy(rng.integers(0, d, size=(b, t, k)))
    mask = torch.from_numpy(rng.random((b, t)) < 0.7)
    dense = torch.zeros(b, t, d).scatter_(2, indices, values)  # duplicate ids inside a row keep one value
    values = dense.gather(2, indices)  # make codes consistent with that dense tensor
    active = (dense > 0) & mask[..., None]
    expected_max = torch.where(active, dense, 0).amax(1).numpy()
    expected_count = active.sum(1).numpy()
    np.testing.assert_allclose(pool_codes(values, indices, d, mask).toarray(), expected_max)
    # Count distinct tokens, so dedupe ids within a token first (real Top-k codes never repeat an id).
    unique_idx = torch.arange(d).expand(b, t, d)
    counts = pool_codes(dense, unique_idx, d, mask, reduce="count").toarray()
    np.testing.assert_array_equal(counts, expected_count)
    last = pool_codes(values[:, -1], indices[:, -1], d).toarray()
    np.testing.assert_allclose(last, dense[:, -1].clamp(min=0).numpy())
