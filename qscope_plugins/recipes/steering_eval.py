"""Does steering work? Baseline vs steered generation over a prompt set, scored by a metric.

The report gives no steering numbers (facts section 2.4), so this harness is how a user measures
an effect: the same prompts are generated with and without the intervention (greedy by default,
so the only difference is the intervention), each continuation is scored by a metric callback
(``text -> float``: :func:`cjk_fraction` for language mixing, or a classifier's score), and the
result is the mean per arm and the mean paired difference, each with a bootstrap confidence
interval over prompts, plus the per-prompt values. :func:`sweep` repeats this over strengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..backends import Backend, Generation, Intervention, Prompts, Sampling

Metric = Callable[[str], float]


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0x20000 <= code <= 0x2FA1F  # extensions B.. and compatibility supplement
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0x3000 <= code <= 0x303F  # CJK punctuation
        or 0xFF00 <= code <= 0xFFEF  # full-width forms
    )


def cjk_fraction(text: str) -> float:
    """Fraction of the non-whitespace characters of ``text`` that are CJK (0 for an empty text)."""
    chars = [c for c in text if not c.isspace()]
    return sum(map(_is_cjk, chars)) / len(chars) if chars else 0.0


@dataclass(frozen=True)
class Estimate:
    """A mean with a percentile-bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def mean_ci(values: Sequence[float], confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> Estimate:
    """Mean of ``values`` and a percentile-bootstrap interval (reproducible from ``seed``).

    Bootstrap because metric values (fractions, classifier scores) are bounded and often skewed;
    with one value the interval collapses to it.
    """
    if not values:
        raise ValueError("no values to summarise")
    data = torch.tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = data[torch.randint(len(data), (n_boot, len(data)), generator=gen)].mean(-1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Estimate(float(data.mean()), low, high, len(data))


@dataclass
class Comparison:
    """Baseline and steered generations of the same prompts, with their metric values."""

    baseline: list[Generation]
    steered: list[Generation]
    baseline_scores: list[float]
    steered_scores: list[float]

    @property
    def differences(self) -> list[float]:
        """Per prompt: steered score minus baseline score."""
        return [s - b for s, b in zip(self.steered_scores, self.baseline_scores)]

    def summary(self, confidence: float = 0.95) -> dict:
        return {
            "baseline": mean_ci(self.baseline_scores, confidence).to_dict(),
            "steered": mean_ci(self.steered_scores, confidence).to_dict(),
            "difference": mean_ci(self.differences, confidence).to_dict(),
        }

    def per_prompt(self) -> list[dict]:
        return [
            {"baseline_text": b.text, "steered_text": s.text, "baseline": bs, "steered": ss, "difference": ss - bs}
            for b, s, bs, ss in zip(self.baseline, self.steered, self.baseline_scores, self.steered_scores)
        ]


def evaluate(
    backend: Backend,
    prompts: Prompts,
    interventions: Intervention | Sequence[Intervention],
    metric: Metric,
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    baseline: list[Generation] | None = None,
    progress: bool = False,
) -> Comparison:
    """Generate baseline (unless given) and steered continuations of ``prompts`` and score both."""
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    run = dict(max_new_tokens=max_new_tokens, sampling=sampling, batch_size=batch_size, progress=progress)
    if baseline is None:
        baseline = backend.generate(prompts, **run)
    steered = backend.generate(prompts, interventions=interventions, **run)
    if len(baseline) != len(steered):
        raise ValueError(f"baseline has {len(baseline)} generations for {len(steered)} prompts")
    return Comparison(baseline, steered, [float(metric(g.text)) for g in baseline], [float(metric(g.text)) for g in steered])


def sweep(
    backend: Backend,
    prompts: Prompts,
    make: Callable[[float], Intervention | Sequence[Intervention]],
    strengths: Sequence[float],
    metric: Metric,
    *,
    confidence: float = 0.95,
    **generate_kw,
) -> list[dict]:
    """One row per strength: ``make(alpha)``'s steered mean and its difference from one shared baseline.

    Example: ``sweep(backend, prompts, lambda a: additive(sae, 6159, a), [-40, -20, -5], cjk_fraction)``.
    """
    if not strengths:
        raise ValueError("no strengths to sweep")
    baseline = None
    rows = []
    for alpha in strengths:
        result = evaluate(backend, prompts, make(alpha), metric, baseline=baseline, **generate_kw)
        baseline = result.baseline
        summary = result.summary(confidence)
        rows.append({"alpha": float(alpha), "steered": summary["steered"], "difference": summary["difference"],
                     "baseline": summary["baseline"]})
    return rows
