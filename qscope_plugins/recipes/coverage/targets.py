"""The target-feature schema: keys, labels, :class:`TargetFeature` and the features-file parser."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

FeatureKey = tuple[int, int]
"""``(layer, feature id)``."""
LABELS = ("harmful", "benign")
"""Safety labels: a synthesised response to a harmful prompt refuses, to a benign one it helps."""
STATUSES = ("missing", "weak", "covered", "not-target")

Complete = Callable[[str], str]
"""Any text generator: prompt in, completion (new text only) out."""
Render = Callable[[str, "str | None"], str]
"""``(prompt, response or None) -> text`` whose activations are measured."""



@dataclass(frozen=True)
class TargetFeature:
    """A candidate target: where it lives, what it means, how relevant it is, which label it carries."""

    layer: int
    feature: int
    explanation: str | None = None
    score: float | None = None
    label: str | None = None

    @property
    def key(self) -> FeatureKey:
        return (self.layer, self.feature)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _check_score(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where}: score must be a number in [0, 1], got {value!r}")
    return float(value)


def parse_features(items: Sequence[Mapping], where: str = "features") -> list[TargetFeature]:
    """Validated :class:`TargetFeature` objects from ``[{"layer", "feature", "explanation"?, "score"?, "label"?}]``."""
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: expected a non-empty JSON list of feature objects")
    out: list[TargetFeature] = []
    seen: set[FeatureKey] = set()
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{at}: expected an object, got {type(item).__name__}")
        unknown = set(item) - {"layer", "feature", "explanation", "score", "label"}
        if unknown:
            raise ValueError(f"{at}: unknown keys {sorted(unknown)}")
        layer, feature = item.get("layer"), item.get("feature")
        for name, value in (("layer", layer), ("feature", feature)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{at}: {name!r} must be an integer >= 0, got {value!r}")
        explanation = item.get("explanation")
        if explanation is not None and (not isinstance(explanation, str) or not explanation.strip()):
            raise ValueError(f"{at}: 'explanation' must be a non-empty string")
        score = _check_score(item["score"], at) if item.get("score") is not None else None
        label = item.get("label")
        if label is not None and label not in LABELS:
            raise ValueError(f"{at}: 'label' must be one of {', '.join(LABELS)}, got {label!r}")
        if (layer, feature) in seen:
            raise ValueError(f"{at}: feature ({layer}, {feature}) is listed twice")
        seen.add((layer, feature))
        out.append(TargetFeature(layer, feature, explanation, score, label))
    return out


def read_features(path: str | Path) -> list[TargetFeature]:
    """:func:`parse_features` of a JSON file."""
    path = Path(path)
    return parse_features(json.loads(path.read_text(encoding="utf-8")), str(path))
