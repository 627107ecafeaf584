"""Redundancy and overlap metrics against brute force and planted ground truth."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from qscope_plugins.recipes import redundancy as rd


def random_sets(rng: np.random.Generator, n_samples: int, pool: int, size: int) -> list[set[int]]:
    return [set(rng.choice(pool, size=size, replace=False).tolist()) for _ in range(n_samples)]


def brute_force_coverage(sets: list[set[int]]) -> list[Fraction]:
    universe = set().union(*sets)
    out = []
    for n in range(1, len(sets) + 1):
        sizes = [len(set().union(*combo)) for combo in itertools.combinations(sets, n)]
        out.append(Fraction(sum(sizes), len(sizes) * len(universe)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_closed_form_equals_enumeration(seed):
    rng = np.random.default_rng(seed)
    sets = random_sets(rng, n_samples=7 + seed, pool=15, size=4)
    sets[0] = set()  # an empty sample still counts towards N
    exact = brute_force_coverage(sets)
    np.testing.assert_allclose(rd.coverage_curve(sets), [float(c) for c in exact], rtol=0, atol=1e-12)


def test_coverage_large_n_matches_exact_rationals():
    rng = np.random.default_rng(3)
    n_samples, pool = 3000, 500
    sets = random_sets(rng, n_samples, pool, size=5)
    curve = rd.coverage_curve(sets)
    counts = np.unique(np.concatenate([list(s) for s in sets]), return_counts=True)[1]
    for n in (1, 17, 400, 2999):
        expected = sum(1 - Fraction(math.comb(n_samples - m, n), math.comb(n_samples, n)) for m in counts)
        assert abs(curve[n - 1] - float(expected / counts.size)) < 1e-9
    assert curve[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(curve) >= -1e-12)


def test_feature_redundancy_is_sum_over_footprint():
    sets = [{0, 1}, {1, 2}, {2, 3}, {0}]
    curve = rd.coverage_curve(sets)
    assert rd.feature_redundancy(sets) == pytest.approx(curve.sum() / 4)


def test_redundancy_orders_planted_levels():
    """Samples drawn from a smaller feature pool repeat each other more, so R_hat must be larger."""
    rng = np.random.default_rng(0)
    values = [rd.feature_redundancy(random_sets(rng, 200, pool, 20)) for pool in (30, 100, 400, 4000)]
    assert values == sorted(values, reverse=True)
    assert len(set(values)) == 4
    duplicated = [{1, 2, 3}] * 50  # every sample identical: c_n = 1 for all n, R_hat = N / |F(D)|
    assert rd.feature_redundancy(duplicated) == pytest.approx(50 / 3)


def test_planted_overlaps_come_out_as_planted():
    rng = np.random.default_rng(1)

    def bench(features: np.ndarray) -> list[np.ndarray]:
        shuffled = rng.permutation(features)
        return np.array_split(shuffled, 25)  # every planted feature in exactly one sample

    a, b, c = bench(np.arange(0, 100)), bench(np.arange(50, 250)), bench(np.arange(1000, 1040))
    assert rd.overlap(a, b) == pytest.approx(0.5)
    assert rd.overlap(b, a) == pytest.approx(0.25)
    assert rd.overlap(a, b, mode="min") == pytest.approx(0.5)
    assert rd.overlap(a, c) == 0.0
    matrix = rd.overlap_matrix({"a": a, "b": b, "c": c})
    np.testing.assert_allclose(matrix, [[1, 0.5, 0], [0.25, 1, 0], [0, 0, 1]])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="^need at least one sample$"):
        rd.coverage_curve([])
    with pytest.raises(ValueError, match=r"^every sample has an empty feature set, so the footprint F\(D\) is empty$"):
        rd.feature_redundancy([set(), set()])
    with pytest.raises(ValueError, match="^sample 1 has a negative feature id -3$"):
        rd.coverage_curve([{1}, {-3, 2}])
    with pytest.raises(ValueError, match="^mode must be 'asymmetric' or 'min', got 'max'$"):
        rd.overlap([{1}], [{1}], mode="max")
    with pytest.raises(ValueError, match="^cannot compute overlap with an empty footprint$"):
        rd.overlap([set()], [{1}])
    with pytest.raises(ValueError, match=r"^scores must be a models x samples matrix with at least 2 models"):
        rd.performance_redundancy(np.ones((1, 5)))
    with pytest.raises(ValueError, match="^every model has the same full-benchmark score, so the ranking is undefined$"):
        rd.performance_redundancy(np.ones((3, 5)))


def test_batched_tau_matches_scipy_including_ties():
    rng = np.random.default_rng(0)
    full = rng.integers(0, 4, size=9).astype(float)
    rows = rng.integers(0, 3, size=(50, 9)).astype(float)
    ours = rd._tau_b_against(rd._pair_signs(full), rows)
    for row, tau in zip(rows, ours):
        expected = stats.kendalltau(full, row).statistic
        assert tau == pytest.approx(0.0 if np.isnan(expected) else expected, abs=1e-12)


def exact_performance_redundancy(scores: np.ndarray) -> float:
    n_samples = scores.shape[1]
    taus = [
        np.mean([rd.subset_tau(scores, combo) for combo in itertools.combinations(range(n_samples), n)])
        for n in range(1, n_samples + 1)
    ]
    return float(np.mean(taus))


def test_performance_redundancy_estimate_agrees_with_enumeration():
    rng = np.random.default_rng(4)
    scores = (rng.random((6, 8)) < np.linspace(0.2, 0.8, 6)[:, None]).astype(float)
    exact = exact_performance_redundancy(scores)
    estimate = rd.performance_redundancy(scores, n_subsets=400, seed=0)
    assert estimate.se > 0
    assert abs(estimate.R - exact) < 4 * estimate.se
    assert estimate.tau_n[-1] == pytest.approx(1.0)
    assert rd.performance_redundancy(scores, n_subsets=400, seed=0).R == estimate.R


def test_performance_redundancy_orders_planted_benchmarks():
    """Samples that all separate models the same way (redundant) keep the ranking with few samples."""
    rng = np.random.default_rng(5)
    ability = np.linspace(-1.5, 1.5, 10)[:, None]
    consistent = (rng.random((10, 300)) < 1 / (1 + np.exp(-3 * ability))).astype(float)
    noisy = (rng.random((10, 300)) < 1 / (1 + np.exp(-0.3 * ability))).astype(float)
    high = rd.performance_redundancy(consistent, n_subsets=20, seed=1)
    low = rd.performance_redundancy(noisy, n_subsets=20, seed=1)
    assert high.R - low.R > 4 * np.hypot(high.se, low.se)


def test_partial_correlation_equals_residual_correlation():
    rng = np.random.default_rng(6)
    m = rng.normal(size=40)
    a, b = m + rng.normal(size=40), 0.5 * m + rng.normal(size=40)
    residual = lambda x: x - np.polyval(np.polyfit(m, x, 1), m)  # noqa: E731
    expected = stats.pearsonr(residual(a), residual(b)).statistic
    assert rd.partial_correlation(a, b, m) == pytest.approx(expected, abs=1e-10)
    assert rd.performance_similarity(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    with pytest.raises(ValueError, match="perfectly correlated with the reference"):
        rd.partial_correlation(m, b, 2 * m + 1)


def test_overlap_similarity_correlation_recovers_planted_link():
    """Each benchmark measures 3 of 6 independent skills, one feature block per skill; with equal-sized
    benchmarks the expected score correlation equals the shared fraction, which is overlap_min."""
    rng = np.random.default_rng(7)
    skills = rng.normal(size=(400, 6))
    blocks = {"a": [0, 1, 2], "b": [0, 1, 3], "c": [0, 4, 5], "d": [3, 4, 5], "e": [1, 2, 3], "f": [2, 4, 5]}
    benchmarks, scores = {}, {}
    for name, skill_ids in blocks.items():
        features = np.concatenate([np.arange(s * 50, s * 50 + 50) for s in skill_ids])
        benchmarks[name] = np.array_split(rng.permutation(features), 10)
        scores[name] = skills[:, skill_ids].sum(1)
    result = rd.overlap_similarity_correlation(benchmarks, scores)
    assert len(result.pairs) == 15
    np.testing.assert_allclose(result.similarities, result.overlaps, atol=0.15)
    assert result.pearson > 0.95 and result.spearman > 0.9
    controlled = rd.overlap_similarity_correlation(benchmarks, scores, control="f")
    assert len(controlled.pairs) == 10 and all("f" not in p for p in controlled.pairs)
    with pytest.raises(ValueError, match="^no scores for benchmarks: b, c$"):
        rd.overlap_similarity_correlation(benchmarks, {k: scores[k] for k in "adef"})


def test_greedy_max_coverage_planted_and_bound():
    # Planted: three disjoint blocks hidden among their sub-parts; the greedy must take the blocks first.
    sets = [{0, 1}, set(range(10)), {5}, set(range(10, 16)), {10, 11, 12}, set(range(16, 19))]
    selection = rd.greedy_max_coverage(sets, 3)
    assert selection.indices.tolist() == [1, 3, 5]
    assert selection.coverage.tolist() == [10 / 19, 16 / 19, 1.0]
    rng = np.random.default_rng(8)
    for _ in range(5):
        sets = [set(rng.choice(12, size=rng.integers(1, 5), replace=False).tolist()) for _ in range(9)]
        for n in (2, 3):
            best = max(len(set().union(*c)) for c in itertools.combinations(sets, n))
            got = rd.greedy_max_coverage(sets, n).coverage[-1] * len(set().union(*sets))
            assert got >= (1 - 1 / math.e) * best
    with pytest.raises(ValueError, match=r"^n must be between 1 and the number of samples \(9\), got 10$"):
        rd.greedy_max_coverage(sets, 10)


def test_compare_ranking_full_subset_is_perfect():
    rng = np.random.default_rng(9)
    scores = (rng.random((8, 40)) < np.linspace(0.1, 0.9, 8)[:, None]).astype(float)
    everything = rd.compare_ranking(scores, range(40), n_random=20)
    assert everything.tau == 1.0 and everything.random_mean == 1.0 and everything.percentile == 1.0
    small = rd.compare_ranking(scores, [0, 1, 2], n_random=100, seed=1)
    assert -1 <= small.random_mean < 1 and small.random_std > 0
    with pytest.raises(ValueError, match=r"^subset must be distinct sample indices in \[0, 40\)$"):
        rd.compare_ranking(scores, [0, 0])
