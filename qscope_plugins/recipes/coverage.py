"""Per-feature coverage of a dataset for safety-relevant SAE features (Qwen-Scope report section 6).

An example *fires* feature f at layer l when its max SAE activation over tokens is > 0 (Eq. 13). A
dataset covers f when at least one example fires it (Eq. 18). A judge scores each feature's relevance
``s_f`` in [0, 1]; the targets are ``T = {(l, f) : s_f >= tau}`` (Eq. 19), the priority targets are
the ones no example fires (``T_miss``, Eq. 20), the weakly covered ones fire on fewer than
``min_support`` examples, and ``Cov(D) = |covered targets| / |T|`` (Eq. 23). The report gives neither
``tau`` nor the support threshold; the defaults here (0.5 and 3) are ours.

Layout: the pure math (:class:`Support`, :func:`coverage_report`) takes example x feature max
activations and knows nothing of models. The plumbing (:func:`example_maxima`,
:func:`collect_support`) streams texts through any :class:`~qscope_plugins.backends.Backend`, Top-k
encodes each batch sparsely and keeps only the target columns, so nothing of size
texts x tokens x d_sae ever exists. Judges are any callable ``TargetFeature -> float``: a JSON table of
scores (:class:`ScoreTable`, the default) or an LLM (:class:`LLMJudge` over a text-generation callable,
e.g. a transformers pipeline wrapped by :func:`pipeline_complete`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..backends import Backend
from .capture import pooled_batches, tokenize

FeatureKey = tuple[int, int]
"""``(layer, feature id)``."""
LABELS = ("harmful", "benign")
"""Safety labels: a synthesised response to a harmful prompt refuses, to a benign one it helps."""
STATUSES = ("missing", "weak", "covered", "not-target")

Complete = Callable[[str], str]
"""Any text generator: prompt in, completion (new text only) out."""
Render = Callable[[str, "str | None"], str]
"""``(prompt, response or None) -> text`` whose activations are measured."""


# ---- targets ---------------------------------------------------------------------------------
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


# ---- judges ----------------------------------------------------------------------------------
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


# ---- examples --------------------------------------------------------------------------------
def default_render(prompt: str, response: str | None) -> str:
    """The prompt, then a blank line and the response when there is one."""
    return prompt if response is None else f"{prompt}\n\n{response}"


def chat_render(tokenizer) -> Render:
    """Render examples with ``tokenizer``'s chat template (user turn, then the assistant's answer)."""

    def render(prompt: str, response: str | None) -> str:
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)

    return render


def example_text(example: str | Mapping, render: Render = default_render) -> str:
    """The text of a plain string, a ``{"text"}`` record or a ``{"prompt", "response"?}`` record."""
    if isinstance(example, str):
        return example
    if isinstance(example.get("text"), str):
        return example["text"]
    if isinstance(example.get("prompt"), str):
        response = example.get("response")
        return render(example["prompt"], response if isinstance(response, str) else None)
    raise ValueError(f"an example needs 'text' or 'prompt', got keys {sorted(example)}")


# ---- pure math -------------------------------------------------------------------------------
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


# ---- plumbing: texts -> per-example max activations of the target features ------------------
def example_maxima(
    backend: Backend,
    saes: Mapping[int, object],
    texts: Sequence[str],
    features: Sequence[FeatureKey],
    *,
    skip_first_token: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """For each batch of ``texts``, ``(B, F)`` max activations of ``features`` over each text's tokens.

    ``saes`` maps each needed layer to a full SAE (Top-k membership needs every encoder row). One
    forward pass per batch serves all layers; only the F target columns leave the sparse pooling.
    """
    features = [(int(l), int(f)) for l, f in features]
    if not features:
        raise ValueError("no target features given")
    layers = sorted({l for l, _ in features})
    missing = [l for l in layers if l not in saes]
    if missing:
        raise ValueError(f"no SAE given for layer {missing[0]}")
    for layer in layers:
        backend.check_sae(saes[layer], layer)
        d_sae = int(saes[layer].cfg.d_sae)
        bad = [f for l, f in features if l == layer and f >= d_sae]
        if bad:
            raise ValueError(f"feature {bad[0]} out of range for the layer-{layer} SAE (d_sae={d_sae})")
    columns = {l: [f for k, f in features if k == l] for l in layers}
    order = np.argsort([i for l in layers for i, (k, _) in enumerate(features) if k == l], kind="stable")
    rows = tokenize(backend, list(texts))
    for pooled in pooled_batches(backend, {l: saes[l] for l in layers}, rows, mode="max",
                                 skip_first_token=skip_first_token, batch_size=batch_size, progress=progress):
        block = np.concatenate([pooled[l][:, columns[l]].toarray() for l in layers], axis=1)
        yield block[:, order]


def collect_support(backend: Backend, saes: Mapping[int, object], texts: Sequence[str],
                    features: Sequence[FeatureKey], **kwargs) -> Support:
    """:class:`Support` of ``texts`` for ``features``, streamed batch by batch (see :func:`example_maxima`)."""
    support = Support.empty([(int(l), int(f)) for l, f in features])
    for block in example_maxima(backend, saes, texts, support.features, **kwargs):
        support.update(block)
    return support
