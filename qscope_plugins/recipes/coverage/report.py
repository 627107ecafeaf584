"""The pure math of coverage: per-feature support of a dataset and the coverage report (Eqs. 18-20, 23)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .targets import FeatureKey

@dataclass
class Support:
    """How many examples fire each feature, and its peak activation; adding two datasets adds these."""

    features: tuple[FeatureKey, ...]
    counts: np.ndarray
    """int64 ``(F,)``: examples whose max activation of the feature is > 0."""
    peaks: np.ndarray
    """float32 ``(F,)``: the largest activation seen (0 if it never fired)."""
    n_examples: int = 0

    @classmethod
    def empty(cls, features: Sequence[FeatureKey]) -> Support:
        n = len(features)
        return cls(tuple(features), np.zeros(n, np.int64), np.zeros(n, np.float32))

    def update(self, maxima: np.ndarray) -> None:
        """Fold in an ``(examples, F)`` block of per-example max activations."""
        maxima = np.asarray(maxima, dtype=np.float32)
        if maxima.ndim != 2 or maxima.shape[1] != len(self.features):
            raise ValueError(f"expected (examples, {len(self.features)}) max activations, got {maxima.shape}")
        self.counts += (maxima > 0).sum(0)
        if maxima.shape[0]:
            self.peaks = np.maximum(self.peaks, maxima.max(0))
        self.n_examples += maxima.shape[0]

    def __add__(self, other: Support) -> Support:
        if self.features != other.features:
            raise ValueError("cannot add supports of different feature lists")
        return Support(self.features, self.counts + other.counts, np.maximum(self.peaks, other.peaks),
                       self.n_examples + other.n_examples)


def support_from_maxima(maxima, features: Sequence[FeatureKey]) -> Support:
    """:class:`Support` of an ``(examples, F)`` matrix of per-example max activations."""
    support = Support.empty(features)
    support.update(maxima)
    return support


@dataclass(frozen=True)
class FeatureCoverage:
    """One feature's row of a coverage report."""

    layer: int
    feature: int
    score: float
    support: int
    peak: float
    status: str


@dataclass
class CoverageReport:
    """Coverage of the target set ``T`` by one dataset (Eqs. 18-20, 23)."""

    rows: list[FeatureCoverage]
    tau: float
    min_support: int
    n_examples: int

    def _keys(self, status: str) -> list[FeatureKey]:
        return [(r.layer, r.feature) for r in self.rows if r.status == status]

    @property
    def targets(self) -> list[FeatureKey]:
        return [(r.layer, r.feature) for r in self.rows if r.status != "not-target"]

    @property
    def missing(self) -> list[FeatureKey]:
        """``T_miss``: targets no example fires."""
        return self._keys("missing")

    @property
    def weak(self) -> list[FeatureKey]:
        """Targets that fire on at least one but fewer than ``min_support`` examples."""
        return self._keys("weak")

    @property
    def coverage(self) -> float:
        """``Cov(D)``: the fraction of targets fired by at least one example (1.0 when there are none)."""
        n = len(self.targets)
        return 1.0 if n == 0 else 1.0 - len(self.missing) / n

    def to_dict(self) -> dict:
        return {
            "n_examples": self.n_examples, "tau": self.tau, "min_support": self.min_support,
            "n_targets": len(self.targets), "coverage": self.coverage,
            "missing": [list(k) for k in self.missing], "weak": [list(k) for k in self.weak],
            "rows": [asdict(r) for r in self.rows],
        }

    def summary(self) -> str:
        n = len(self.targets)
        covered = n - len(self.missing)
        return (f"{self.n_examples} examples cover {covered}/{n} targets ({100 * self.coverage:.2f}%) "
                f"at tau={self.tau}; {len(self.missing)} missing, {len(self.weak)} weak (< {self.min_support} examples)")


def coverage_report(support: Support, scores: Mapping[FeatureKey, float], *, tau: float = 0.5,
                    min_support: int = 3) -> CoverageReport:
    """Classify every feature of ``support`` as missing / weak / covered target, or not a target."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if min_support < 1:
        raise ValueError(f"min_support must be >= 1, got {min_support}")
    absent = [k for k in support.features if k not in scores]
    if absent:
        raise ValueError(f"no relevance score for feature {absent[0]}")
    rows = []
    for key, count, peak in zip(support.features, support.counts.tolist(), support.peaks.tolist()):
        score = float(scores[key])
        if score < tau:
            status = "not-target"
        elif count == 0:
            status = "missing"
        else:
            status = "weak" if count < min_support else "covered"
        rows.append(FeatureCoverage(key[0], key[1], score, int(count), float(peak), status))
    return CoverageReport(rows, tau, min_support, support.n_examples)
