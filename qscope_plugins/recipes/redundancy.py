"""Benchmark redundancy and overlap from SAE feature footprints (Qwen-Scope report, section 4).

Everything here works on plain data, so it runs without a model:

* a benchmark is a sequence of *footprints*, one per sample, each an iterable of the SAE feature ids
  active for that sample (``F(x_i)``, Eq. 2); the benchmark footprint ``F(D)`` is their union (Eq. 3);
* model scores are a ``models x samples`` matrix (per-sample accuracy or any per-sample score).

The SAE-based redundancy ``R_hat`` (Eq. 7-9) is computed from an exact closed form rather than by
sampling subsets, and the performance-based ground truth ``R`` (Eq. 4-6) batches Kendall's tau over
many random subsets so that benchmarks with tens of thousands of samples stay cheap.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import gammaln

FeatureSets = Sequence[Iterable[int]]

_CHUNK_ELEMENTS = 1 << 22  # bounds the temporary arrays of the vectorised formulas (~32 MB of float64)


def as_id_arrays(sets: FeatureSets) -> list[np.ndarray]:
    """Each footprint as a sorted array of unique non-negative int64 feature ids."""
    out = []
    for i, s in enumerate(sets):
        ids = np.unique(s.astype(np.int64) if isinstance(s, np.ndarray) else np.fromiter(s, dtype=np.int64))
        if ids.size and ids[0] < 0:
            raise ValueError(f"sample {i} has a negative feature id {int(ids[0])}")
        out.append(ids)
    return out


def footprint(sets: FeatureSets) -> np.ndarray:
    """``F(D)``: the sorted union of all samples' feature ids (Eq. 3)."""
    arrays = as_id_arrays(sets)
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.int64)


def _feature_counts(sets: FeatureSets) -> tuple[np.ndarray, int]:
    """``m_f`` (samples containing f) for every f in F(D), and N; rejects empty inputs."""
    arrays = as_id_arrays(sets)
    if not arrays:
        raise ValueError("need at least one sample")
    _, counts = np.unique(np.concatenate(arrays), return_counts=True)
    if counts.size == 0:
        raise ValueError("every sample has an empty feature set, so the footprint F(D) is empty")
    return counts, len(arrays)


def coverage_curve(sets: FeatureSets) -> np.ndarray:
    """``c_n = E_{|S|=n} |F(S)| / |F(D)|`` for n = 1..N, exactly (Eq. 7), as an array of length N.

    A feature f carried by m_f of the N samples is missed by a uniform n-subset with probability
    C(N - m_f, n) / C(N, n) (hypergeometric, zero successes), so
    ``E|F(S)| = sum_f 1 - C(N - m_f, n) / C(N, n)``: no Monte Carlo. The ratio is evaluated through
    log-gamma (absolute error ~1e-11 at N ~ 3e4) and features sharing the same m_f are grouped.
    """
    return _coverage(*_feature_counts(sets))


def _coverage(counts: np.ndarray, n_samples: int) -> np.ndarray:
    m_values, weights = np.unique(counts, return_counts=True)
    n = np.arange(1, n_samples + 1, dtype=np.float64)
    expected = np.zeros(n_samples)
    step = max(1, _CHUNK_ELEMENTS // n_samples)
    for start in range(0, m_values.size, step):
        free = (n_samples - m_values[start : start + step]).astype(np.float64)[:, None]  # samples lacking f
        possible = n <= free
        log_miss = gammaln(free + 1) + gammaln(n_samples - n + 1) - gammaln(np.where(possible, free - n, 0) + 1)
        miss = np.where(possible, np.exp(log_miss - gammaln(n_samples + 1)), 0.0)
        expected += weights[start : start + step] @ (1.0 - miss)
    return expected / counts.size


def feature_redundancy(sets: FeatureSets) -> float:
    """``R_hat(D) = sum_n c_n / |F(D)|`` (Eq. 9): AUC of c_n times the growth-rate correction N / |F(D)|."""
    counts, n_samples = _feature_counts(sets)
    return float(_coverage(counts, n_samples).sum() / counts.size)


def overlap(sets_a: FeatureSets, sets_b: FeatureSets, mode: str = "asymmetric") -> float:
    """Footprint overlap of two benchmarks.

    ``mode="asymmetric"`` (Eq. 10): ``|F(A) & F(B)| / |F(A)|``, how much of A's footprint B covers;
    ``mode="min"`` (Eq. 11): ``|F(A) & F(B)| / min(|F(A)|, |F(B)|)``, symmetric.
    """
    return _footprint_overlap(footprint(sets_a), footprint(sets_b), mode)


def _footprint_overlap(fa: np.ndarray, fb: np.ndarray, mode: str) -> float:
    if mode not in ("asymmetric", "min"):
        raise ValueError(f"mode must be 'asymmetric' or 'min', got {mode!r}")
    if fa.size == 0 or fb.size == 0:
        raise ValueError("cannot compute overlap with an empty footprint")
    shared = np.intersect1d(fa, fb, assume_unique=True).size
    return shared / (fa.size if mode == "asymmetric" else min(fa.size, fb.size))


def overlap_matrix(benchmarks: Mapping[str, FeatureSets], mode: str = "asymmetric") -> np.ndarray:
    """``O[i, j] = overlap(benchmark_i, benchmark_j)`` in the mapping's order (rows = the covered one)."""
    prints = [footprint(s) for s in benchmarks.values()]
    return np.array([[_footprint_overlap(a, b, mode) for b in prints] for a in prints])


# ----------------------------------------------------------------------------- performance-based R


def _as_score_matrix(scores: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.shape[1] < 1:
        raise ValueError(f"scores must be a models x samples matrix with at least 2 models, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("scores contain NaN or infinite values")
    return matrix


def _pair_signs(totals: np.ndarray) -> np.ndarray:
    """``sign(t_i - t_j)`` for all model pairs i < j; ``totals`` is (..., models)."""
    i, j = np.triu_indices(totals.shape[-1], k=1)
    return np.sign(totals[..., i] - totals[..., j])


def _tau_b_against(full_signs: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Kendall tau-b of each row of ``totals`` (rows x models) against the full ranking.

    Equals ``scipy.stats.kendalltau`` (variant b) row by row, but batched: scipy handles one pair of
    vectors per call, and R needs N x n_subsets of them. A row that ties every model orders no pair and
    counts as tau = 0 (scipy returns NaN there).
    """
    signs = _pair_signs(totals)
    denominator = np.sqrt(np.abs(signs).sum(-1) * np.abs(full_signs).sum())
    numerator = signs @ full_signs
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _full_signs(matrix: np.ndarray) -> np.ndarray:
    signs = _pair_signs(matrix.sum(1))
    if not signs.any():
        raise ValueError("every model has the same full-benchmark score, so the ranking is undefined")
    return signs


def subset_tau(scores: np.ndarray, subset: Sequence[int]) -> float:
    """``tau(S, D)`` (Eq. 4): Kendall tau-b between model rankings on the subset and on the full benchmark."""
    matrix = _as_score_matrix(scores)
    idx = np.asarray(subset, dtype=np.int64)
    if idx.size == 0:
        raise ValueError("subset is empty")
    return float(_tau_b_against(_full_signs(matrix), matrix[:, idx].sum(1)[None])[0])


@dataclass(frozen=True)
class PerformanceRedundancy:
    """``R(D)`` (Eq. 6) estimated from random subsets."""

    R: float
    """Mean over n = 1..N of tau_n: the area under the tau_n curve."""
    se: float
    """Standard error of ``R`` over the independent random orderings."""
    tau_n: np.ndarray
    """``tau_n`` (Eq. 5) for n = 1..N."""
    n_subsets: int
    """Random subsets drawn per size n."""


def performance_redundancy(scores: np.ndarray, n_subsets: int = 100, seed: int = 0) -> PerformanceRedundancy:
    """``R(D) = (1/N) sum_n E_{|S|=n} tau(S, D)`` for a ``models x samples`` score matrix.

    Each of the ``n_subsets`` draws is a uniformly random ordering of the samples; its first n samples are
    a uniform random n-subset for every n, so one ordering gives an unbiased tau for all N sizes at the
    cost of a cumulative sum. Orderings are independent, so the standard error of R is the spread of the
    per-ordering areas over sqrt(n_subsets).
    """
    matrix = _as_score_matrix(scores)
    if n_subsets < 2:
        raise ValueError(f"n_subsets must be >= 2 to estimate a standard error, got {n_subsets}")
    full = _full_signs(matrix)
    n_models, n_samples = matrix.shape
    rng = np.random.default_rng(seed)
    taus = np.empty((n_subsets, n_samples))
    rows = max(1, _CHUNK_ELEMENTS // full.size)
    for draw in range(n_subsets):
        totals = np.cumsum(matrix[:, rng.permutation(n_samples)], axis=1).T  # (n, models): subset sums
        for start in range(0, n_samples, rows):
            taus[draw, start : start + rows] = _tau_b_against(full, totals[start : start + rows])
    areas = taus.mean(1)
    return PerformanceRedundancy(
        R=float(areas.mean()), se=float(areas.std(ddof=1) / np.sqrt(n_subsets)), tau_n=taus.mean(0), n_subsets=n_subsets
    )


# ----------------------------------------------------------------------------- inter-benchmark similarity


def _benchmark_scores(scores: np.ndarray | Sequence[float]) -> np.ndarray:
    """Per-model benchmark score: a vector as given, or the row mean of a models x samples matrix."""
    values = np.asarray(scores, dtype=np.float64)
    return values.mean(1) if values.ndim == 2 else values


def performance_similarity(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Pearson correlation, across models, of two benchmarks' scores (vectors or models x samples)."""
    return float(stats.pearsonr(_benchmark_scores(scores_a), _benchmark_scores(scores_b)).statistic)


def partial_correlation(scores_a: np.ndarray, scores_b: np.ndarray, reference: np.ndarray) -> float:
    """Eq. 12: Pearson correlation of A and B across models after controlling for a reference benchmark."""
    a, b, m = (_benchmark_scores(s) for s in (scores_a, scores_b, reference))
    r_ab, r_am, r_bm = (stats.pearsonr(x, y).statistic for x, y in ((a, b), (a, m), (b, m)))
    denominator = np.sqrt((1 - r_am**2) * (1 - r_bm**2))
    if denominator < 1e-12:
        raise ValueError("a benchmark is perfectly correlated with the reference; the partial correlation is undefined")
    return float((r_ab - r_am * r_bm) / denominator)


@dataclass(frozen=True)
class PairCorrelation:
    """How well footprint overlap tracks performance similarity over benchmark pairs (report Table 2)."""

    pairs: list[tuple[str, str]]
    overlaps: np.ndarray
    similarities: np.ndarray
    pearson: float
    spearman: float


def overlap_similarity_correlation(
    benchmarks: Mapping[str, FeatureSets],
    scores: Mapping[str, np.ndarray],
    mode: str = "min",
    control: str | None = None,
) -> PairCorrelation:
    """Correlate overlap with performance similarity over all benchmark pairs.

    ``scores[name]`` holds each benchmark's per-model scores (vector or models x samples). With
    ``control`` the similarity is the partial correlation given that benchmark's scores, and pairs that
    include the control itself (where it is undefined) are left out. ``mode`` defaults to the symmetric
    overlap, as a pair has no direction.
    """
    missing = sorted(set(benchmarks) - set(scores))
    if missing:
        raise ValueError(f"no scores for benchmarks: {', '.join(missing)}")
    if control is not None and control not in scores:
        raise ValueError(f"no scores for the control benchmark {control!r}")
    prints = {name: footprint(sets) for name, sets in benchmarks.items()}
    pairs = [(a, b) for a, b in itertools.combinations(benchmarks, 2) if control not in (a, b)]
    if len(pairs) < 3:
        raise ValueError(f"need at least 3 benchmark pairs to correlate, got {len(pairs)}")
    overlaps = np.array([_footprint_overlap(prints[a], prints[b], mode) for a, b in pairs])
    if control is None:
        similarity = np.array([performance_similarity(scores[a], scores[b]) for a, b in pairs])
    else:
        similarity = np.array([partial_correlation(scores[a], scores[b], scores[control]) for a, b in pairs])
    return PairCorrelation(
        pairs=pairs,
        overlaps=overlaps,
        similarities=similarity,
        pearson=float(stats.pearsonr(overlaps, similarity).statistic),
        spearman=float(stats.spearmanr(overlaps, similarity).statistic),
    )


# ----------------------------------------------------------------------------- subset selection


@dataclass(frozen=True)
class CoverageSelection:
    """Samples picked by greedy max coverage, in pick order."""

    indices: np.ndarray
    coverage: np.ndarray
    """``|F(S_i)| / |F(D)|`` after each pick."""


def greedy_max_coverage(sets: FeatureSets, n: int) -> CoverageSelection:
    """Pick ``n`` samples whose footprints cover the most features.

    Coverage is monotone submodular, so the greedy choice (repeatedly add the sample that covers the most
    still-uncovered features) reaches at least (1 - 1/e) ~ 63% of the best possible coverage with n samples
    (Nemhauser, Wolsey and Fisher, 1978); finding the optimum is NP-hard. Gains only shrink, so stale gains
    in a heap are upper bounds and only the top entry needs re-checking (lazy greedy). Ties go to the lower
    sample index, so the result is deterministic.
    """
    arrays = as_id_arrays(sets)
    if not 1 <= n <= len(arrays):
        raise ValueError(f"n must be between 1 and the number of samples ({len(arrays)}), got {n}")
    universe = footprint(arrays)
    if universe.size == 0:
        raise ValueError("every sample has an empty feature set, so the footprint F(D) is empty")
    covered = np.zeros(int(universe[-1]) + 1, dtype=bool)
    heap = [(-a.size, i) for i, a in enumerate(arrays)]
    heapq.heapify(heap)
    picked, coverage, total = [], [], 0
    while len(picked) < n:
        _, i = heapq.heappop(heap)
        gain = int((~covered[arrays[i]]).sum())
        if heap and (-gain, i) > heap[0]:  # a (stale, upper-bound) entry may still beat this one
            heapq.heappush(heap, (-gain, i))
            continue
        covered[arrays[i]] = True
        total += gain
        picked.append(i)
        coverage.append(total / universe.size)
    return CoverageSelection(indices=np.array(picked, dtype=np.int64), coverage=np.array(coverage))


@dataclass(frozen=True)
class RankingComparison:
    """Kendall tau of a chosen subset against random subsets of the same size."""

    tau: float
    random_mean: float
    random_std: float
    percentile: float
    """Fraction of random subsets whose tau is <= the chosen subset's."""


def compare_ranking(scores: np.ndarray, subset: Sequence[int], n_random: int = 200, seed: int = 0) -> RankingComparison:
    """How well a subset preserves the full model ranking, relative to random subsets of its size."""
    matrix = _as_score_matrix(scores)
    idx = np.asarray(subset, dtype=np.int64)
    if idx.size == 0 or np.unique(idx).size != idx.size or idx.min() < 0 or idx.max() >= matrix.shape[1]:
        raise ValueError(f"subset must be distinct sample indices in [0, {matrix.shape[1]})")
    full = _full_signs(matrix)
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.choice(matrix.shape[1], idx.size, replace=False) for _ in range(n_random)])
    random_taus = _tau_b_against(full, matrix[:, draws].sum(-1).T)
    tau = float(_tau_b_against(full, matrix[:, idx].sum(1)[None])[0])
    return RankingComparison(
        tau=tau,
        random_mean=float(random_taus.mean()),
        random_std=float(random_taus.std(ddof=1)),
        percentile=float((random_taus <= tau).mean()),
    )
