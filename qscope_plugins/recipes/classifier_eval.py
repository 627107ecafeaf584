"""Evaluating SAE-feature classifiers: metrics with bootstrap intervals, cross-lingual transfer, data efficiency.

Mirrors the report's section 5 analyses (F1 per layer and K, Fig. 8; transfer of features found on one
language to others and Jaccard of top-10 sets, Fig. 9; F1 against the share of discovery data, Fig. 12)
as functions of precomputed example-level activation matrices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .classifier import FeatureClassifier, as_csr, fit, top_features

METRICS = ("precision", "recall", "f1", "accuracy")
_BOOT_CHUNK = 1 << 22


def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError("labels and predictions must be 1-D arrays of 0/1")
    return y.astype(bool)


def _from_counts(tp, fp, fn, tn, metric: str):
    """A metric from confusion counts (arrays allowed); 0 where it is undefined (no predicted/actual positives)."""
    tp, fp, fn, tn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn, tn))
    num, den = {
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
        "accuracy": (tp + tn, tp + fp + fn + tn),
    }[metric]
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def binary_metrics(y_true, y_pred) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of 0/1 predictions (0 when a ratio is undefined)."""
    t, p = _labels(y_true), _labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} labels but {p.size} predictions")
    counts = ((t & p).sum(), (~t & p).sum(), (t & ~p).sum(), (~t & ~p).sum())
    return {m: float(_from_counts(*counts, m)) for m in METRICS}


def tpr_at_fpr(y_true, scores, fpr: float = 0.05) -> float:
    """True-positive rate at the strictest threshold whose false-positive rate is at most ``fpr``.

    A threshold ``t`` flags ``score > t``; it is the (k+1)-th largest negative score with
    k = floor(fpr * negatives), so ties at ``t`` never push the FPR over the target.
    """
    t = _labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    if not t.any() or t.all():
        raise ValueError("tpr_at_fpr needs both positive and negative examples")
    negatives = np.sort(s[~t])[::-1]
    allowed = int(np.floor(fpr * negatives.size))
    threshold = negatives[allowed] if allowed < negatives.size else -np.inf
    return float((s[t] > threshold).mean())


def bootstrap_ci(
    y_true, y_pred, metric: str = "f1", n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the metric and its percentile bootstrap interval over resampled examples."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    t, p = _labels(y_true), _labels(y_pred)
    if t.size == 0 or t.shape != p.shape:
        raise ValueError(f"need equally many labels and predictions (at least one), got {t.size} and {p.size}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n, per_chunk = t.size, max(1, _BOOT_CHUNK // t.size)
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n_boot, per_chunk):
        idx = rng.integers(0, n, size=(min(per_chunk, n_boot - start), n))
        tb, pb = t[idx], p[idx]
        values.append(_from_counts((tb & pb).sum(1), (~tb & pb).sum(1), (tb & ~pb).sum(1), (~tb & ~pb).sum(1), metric))
    low, high = np.quantile(np.concatenate(values), [(1 - level) / 2, (1 + level) / 2])
    return binary_metrics(t, p)[metric], float(low), float(high)


@dataclass(frozen=True)
class Evaluation:
    """A classifier's held-out quality on labelled examples."""

    precision: float
    recall: float
    f1: float
    accuracy: float
    tpr_at_fpr: float
    fpr: float
    f1_low: float | None
    f1_high: float | None
    """Bootstrap interval of F1 (``None`` when evaluated with ``n_boot=0``)."""
    n_pos: int
    n_neg: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _stack(pos, neg):
    """Positive then negative activations as one input, per layer when given as mappings."""
    if isinstance(pos, Mapping):
        return {n: sp.vstack([as_csr(pos[n]), as_csr(neg[n])]).tocsr() for n in pos}
    return sp.vstack([as_csr(pos, "pos_acts"), as_csr(neg, "neg_acts")]).tocsr()


def _rows(acts) -> int:
    return as_csr(next(iter(acts.values())) if isinstance(acts, Mapping) else acts).shape[0]


def evaluate(
    classifier: FeatureClassifier, pos_acts, neg_acts, fpr: float = 0.05, n_boot: int = 1000, seed: int = 0
) -> Evaluation:
    """Precision, recall, F1 (with a bootstrap interval unless ``n_boot=0``) and TPR at ``fpr`` on held-out examples."""
    n_pos, n_neg = _rows(pos_acts), _rows(neg_acts)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"evaluation needs both classes, got {n_pos} positive and {n_neg} negative examples")
    acts = _stack(pos_acts, neg_acts)
    y = np.r_[np.ones(n_pos, dtype=np.int8), np.zeros(n_neg, dtype=np.int8)]
    pred = classifier.predict(acts)
    metrics = binary_metrics(y, pred)
    low, high = bootstrap_ci(y, pred, "f1", n_boot=n_boot, seed=seed)[1:] if n_boot else (None, None)
    return Evaluation(
        precision=metrics["precision"],
        recall=metrics["recall"],
        f1=metrics["f1"],
        accuracy=metrics["accuracy"],
        tpr_at_fpr=tpr_at_fpr(y, classifier.score(acts), fpr),
        fpr=fpr,
        f1_low=low,
        f1_high=high,
        n_pos=n_pos,
        n_neg=n_neg,
    )


Split = tuple[object, object]
"""``(positive activations, negative activations)`` of one language (or domain)."""


def transfer_matrix(
    discovery: Mapping[str, Split], evaluation: Mapping[str, Split], top_k: int = 5, eps: float = 0.0
) -> tuple[list[str], list[str], np.ndarray]:
    """``F1[a, b]``: features discovered on ``discovery[a]``, evaluated on ``evaluation[b]`` (one layer)."""
    sources, targets = list(discovery), list(evaluation)
    f1 = np.zeros((len(sources), len(targets)))
    for i, a in enumerate(sources):
        classifier = fit(*discovery[a], top_k=top_k, eps=eps)
        for j, b in enumerate(targets):
            f1[i, j] = evaluate(classifier, *evaluation[b], n_boot=0).f1
    return sources, targets, f1


def jaccard_matrix(feature_sets: Mapping[str, Sequence[int]]) -> np.ndarray:
    """``|A & B| / |A | B|`` for every pair of named feature sets."""
    sets = [set(int(f) for f in s) for s in feature_sets.values()]
    return np.array([[len(a & b) / len(a | b) if a | b else 1.0 for b in sets] for a in sets])


def top_feature_jaccard(deltas_by_name: Mapping[str, np.ndarray], k: int = 10) -> np.ndarray:
    """Jaccard overlap of the top-``k`` Delta features between languages at one layer (report: k = 10)."""
    return jaccard_matrix({name: top_features(d, k) for name, d in deltas_by_name.items()})


@dataclass(frozen=True)
class EfficiencyPoint:
    fraction: float
    f1_mean: float
    f1_std: float
    jaccard_with_full: float
    """Mean Jaccard overlap of the selected features with those chosen on all the discovery data."""


def data_efficiency(
    discovery: Split,
    evaluation: Split,
    fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
    top_k: int = 5,
    eps: float = 0.0,
    n_repeats: int = 5,
    seed: int = 0,
) -> list[EfficiencyPoint]:
    """Held-out F1 when features are chosen on a random ``fraction`` of each discovery class (>= 1 example)."""
    pos, neg = as_csr(discovery[0], "pos_acts"), as_csr(discovery[1], "neg_acts")
    full = set(fit(pos, neg, top_k=top_k, eps=eps).features)
    rng = np.random.default_rng(seed)
    points = []
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"fractions must lie in (0, 1], got {fraction}")
        f1s, overlaps = [], []
        for _ in range(n_repeats if fraction < 1 else 1):
            take = [rng.choice(m.shape[0], max(1, round(fraction * m.shape[0])), replace=False) for m in (pos, neg)]
            classifier = fit(pos[take[0]], neg[take[1]], top_k=top_k, eps=eps)
            f1s.append(evaluate(classifier, *evaluation, n_boot=0).f1)
            overlaps.append(len(full & set(classifier.features)) / len(full | set(classifier.features)))
        points.append(EfficiencyPoint(float(fraction), float(np.mean(f1s)), float(np.std(f1s)), float(np.mean(overlaps))))
    return points

