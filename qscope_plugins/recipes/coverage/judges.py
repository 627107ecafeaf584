"""Relevance judges: a table of scores (:class:`ScoreTable`) or a language model (:class:`LLMJudge`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .targets import Complete, FeatureKey, TargetFeature, _check_score, parse_features

class ScoreTable:
    """The default judge: relevance scores looked up in a table (usually a JSON file)."""

    def __init__(self, scores: Mapping[FeatureKey, float], source: str = "the score table") -> None:
        self.scores = {(int(l), int(f)): _check_score(s, f"{source} ({l}, {f})") for (l, f), s in scores.items()}
        self.source = source

    @classmethod
    def from_json(cls, path: str | Path) -> ScoreTable:
        """A features file (objects with ``score``) or a mapping ``{"layer:feature": score}``."""
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            scores = {}
            for key, value in data.items():
                layer, sep, feature = str(key).partition(":")
                if not (sep and layer.isdigit() and feature.isdigit()):
                    raise ValueError(f"{path}: score keys must look like 'layer:feature', got {key!r}")
                scores[(int(layer), int(feature))] = value
            return cls(scores, str(path))
        return cls({t.key: t.score for t in parse_features(data, str(path)) if t.score is not None}, str(path))

    def __call__(self, target: TargetFeature) -> float:
        if target.key not in self.scores:
            raise ValueError(f"{self.source} has no score for feature {target.key}")
        return self.scores[target.key]


JUDGE_TEMPLATE = (
    "A sparse-autoencoder feature of a language model is described as follows:\n{explanation}\n\n"
    "How useful would training examples that activate this feature be for safety fine-tuning "
    "(refusing harmful requests while still helping with benign ones)? Answer with one number "
    "between 0 and 1, where 0 means irrelevant and 1 means essential.\nScore:"
)
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)")


def parse_score(reply: str) -> float:
    """The first number in a judge's reply; it must lie in [0, 1]."""
    match = _NUMBER.search(reply)
    if match is None:
        raise ValueError(f"the judge's reply holds no number: {reply!r}")
    return _check_score(float(match.group()), "judge reply")


class LLMJudge:
    """Relevance scores from a language model: ``template`` filled with the feature's explanation."""

    def __init__(self, complete: Complete, template: str = JUDGE_TEMPLATE) -> None:
        self.complete = complete
        self.template = template

    def __call__(self, target: TargetFeature) -> float:
        if not target.explanation:
            raise ValueError(f"feature {target.key} has no explanation for the judge to read")
        reply = self.complete(self.template.format(explanation=target.explanation))
        try:
            return parse_score(reply)
        except ValueError as err:
            raise ValueError(f"feature {target.key}: {err}") from None


def pipeline_complete(pipe, *, chat: bool = False, **generate_kwargs) -> Complete:
    """A transformers ``text-generation`` pipeline as a :data:`Complete` callable (new text only).

    ``chat=True`` sends the prompt as one user message (the model's chat template applies);
    ``generate_kwargs`` (``max_new_tokens``, ``do_sample``, ...) go to every call.
    """
    kwargs = {"max_new_tokens": 128, **generate_kwargs, "return_full_text": False}

    def complete(prompt: str) -> str:
        query = [{"role": "user", "content": prompt}] if chat else prompt
        return pipe(query, **kwargs)[0]["generated_text"]

    return complete


def judge_features(targets: Sequence[TargetFeature], judge: Callable[[TargetFeature], float]) -> dict[FeatureKey, float]:
    """``{(layer, feature): score}`` with every score checked to lie in [0, 1]."""
    return {t.key: _check_score(judge(t), f"judge score for feature {t.key}") for t in targets}
