"""SAE-feature classifiers: the Qwen-Scope toxicity recipe (report section 5) as plain functions.

A text *fires* feature f when its max activation over tokens exceeds ``eps`` (Eq. 13, eps = 0). Features
are ranked by ``Delta_f = P(fire | positive) - P(fire | negative)`` (Eq. 14), a difference of firing
frequencies rather than of mean activations, and the classifier flags a text when any of the top-K
features fires (Eq. 15): no trained head, so it needs no more than a JSON file of feature ids.

Inputs are example-level max-activation matrices (examples x d_sae): dense numpy / torch, scipy.sparse or
torch sparse. :func:`qscope_plugins.recipes.pooling.pool_codes` builds them from per-token Top-k codes.
Layer selection (top1-diff, Eq. 16), multi-layer composition (Eq. 17) and the baselines (weighted
variant, random features, linear probe on residuals) live here too; evaluation is in
:mod:`qscope_plugins.recipes.classifier_eval`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import minimize

from .._io import write_json

FORMAT = "qscope-feature-classifier"
VERSION = 1
RULES = ("or", "logistic")


def as_csr(acts, name: str = "acts") -> sp.csr_array:
    """Any supported examples x d_sae matrix as a float32 CSR array (sparse inputs stay sparse)."""
    if isinstance(acts, torch.Tensor):
        if acts.layout == torch.sparse_csr:
            acts = acts.to_sparse_coo()
        if acts.is_sparse:
            acts = acts.coalesce()
            rows, cols = acts.indices().cpu().numpy()
            acts = sp.coo_array((acts.values().cpu().numpy(), (rows, cols)), shape=tuple(acts.shape))
        else:
            acts = acts.detach().cpu().numpy()
    matrix = sp.csr_array(acts, dtype=np.float32) if sp.issparse(acts) or np.ndim(acts) == 2 else None
    if matrix is None:
        raise ValueError(f"{name} must be a 2-D examples x d_sae matrix, got shape {np.shape(acts)}")
    return matrix


def _check_eps(eps: float) -> float:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (Top-k ReLU activations are never negative), got {eps}")
    return float(eps)


def firing_rates(acts, eps: float = 0.0, name: str = "acts") -> np.ndarray:
    """``P(fire)`` per feature: the fraction of examples whose max activation exceeds ``eps``."""
    matrix = as_csr(acts, name)
    if matrix.shape[0] == 0:
        raise ValueError(f"{name} has no examples")
    return np.asarray((matrix > _check_eps(eps)).sum(axis=0)).ravel() / matrix.shape[0]


def feature_deltas(pos_acts, neg_acts, eps: float = 0.0) -> np.ndarray:
    """``Delta_f = P(fire | positive) - P(fire | negative)`` for every feature (Eq. 14)."""
    pos, neg = as_csr(pos_acts, "pos_acts"), as_csr(neg_acts, "neg_acts")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"pos_acts has d_sae={pos.shape[1]} but neg_acts has d_sae={neg.shape[1]}")
    return firing_rates(pos, eps, "pos_acts") - firing_rates(neg, eps, "neg_acts")


def top_features(deltas: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` feature ids with the largest Delta, best first (ties: lower id first)."""
    deltas = np.asarray(deltas)
    if not 1 <= k <= deltas.size:
        raise ValueError(f"top_k must be between 1 and d_sae ({deltas.size}), got {k}")
    return np.argsort(-deltas, kind="stable")[:k]


@dataclass(frozen=True)
class FeatureClassifier:
    """Flags an example when any selected feature fires (``rule="or"``), or by a logistic head on the
    selected features' max activations (``rule="logistic"``, the weighted baseline).

    Feature i is ``features[i]`` of the SAE at ``layers[i]`` (``None`` when fit on bare matrices).
    Inputs to :meth:`score` / :meth:`predict` are one matrix when all features come from one layer, or
    a mapping ``{layer: matrix}``.
    """

    features: tuple[int, ...]
    layers: tuple[int | None, ...]
    d_sae: int
    eps: float = 0.0
    rule: str = "or"
    deltas: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    bias: float = 0.0
    skip_first_token: bool = True
    model: str | None = None
    sae_source: str | None = None
    sae_revision: str | None = None

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("a classifier needs at least one feature")
        if len(self.layers) != len(self.features):
            raise ValueError(f"{len(self.features)} features but {len(self.layers)} layers")
        if any(not 0 <= f < self.d_sae for f in self.features):
            raise ValueError(f"feature ids must lie in [0, {self.d_sae})")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.rule == "logistic" and len(self.weights) != len(self.features):
            raise ValueError(f"a logistic classifier needs one weight per feature ({len(self.features)})")
        _check_eps(self.eps)

    @property
    def layer_set(self) -> list[int | None]:
        return sorted(set(self.layers), key=lambda n: -1 if n is None else n)

    def selected(self, acts) -> np.ndarray:
        """``(examples, len(features))`` dense max activations of the selected features."""
        if not isinstance(acts, Mapping):
            if len(set(self.layers)) > 1:
                raise ValueError(f"this classifier uses layers {self.layer_set}; pass a mapping {{layer: acts}}")
            acts = {self.layers[0]: acts}
        matrices = {}
        for layer in set(self.layers):
            if layer not in acts:
                raise ValueError(f"no activations given for layer {layer}")
            matrices[layer] = as_csr(acts[layer])
            if matrices[layer].shape[1] != self.d_sae:
                raise ValueError(
                    f"acts has d_sae={matrices[layer].shape[1]} but the classifier was fit with d_sae={self.d_sae}"
                )
        if len({m.shape[0] for m in matrices.values()}) != 1:
            raise ValueError("every layer's activations must have the same number of examples")
        columns = [matrices[layer][:, [feature]].toarray().ravel() for layer, feature in zip(self.layers, self.features)]
        return np.stack(columns, axis=1)

    def score(self, acts) -> np.ndarray:
        """A continuous score per example: max selected activation (OR rule) or the logit (logistic)."""
        x = self.selected(acts)
        return x.max(1) if self.rule == "or" else x @ np.asarray(self.weights) + self.bias

    def predict(self, acts) -> np.ndarray:
        """0/1 per example: any selected feature fires (OR) or the logit is positive (logistic)."""
        threshold = self.eps if self.rule == "or" else 0.0
        return (self.score(acts) > threshold).astype(np.int8)

    # ---- persistence: small JSON, no training data ---------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        return {"format": FORMAT, "version": VERSION, **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> FeatureClassifier:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a feature classifier file: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"unsupported classifier file version {data.get('version')!r} (this build reads {VERSION})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"format", "version"})
        if unknown:
            raise ValueError(f"unknown classifier fields: {', '.join(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        kwargs["features"] = tuple(int(f) for f in kwargs.get("features", ()))
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (a temporary file, then a rename)."""
        return write_json(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> FeatureClassifier:
        return cls.from_dict(json.loads(Path(path).read_text()))


def fit(pos_acts, neg_acts, top_k: int = 5, eps: float = 0.0, layer: int | None = None, **meta) -> FeatureClassifier:
    """The OR-rule classifier over the ``top_k`` features with the largest Delta (Eq. 14-15).

    ``meta`` fills the provenance fields (``model``, ``sae_source``, ``sae_revision``, ``skip_first_token``).
    """
    deltas = feature_deltas(pos_acts, neg_acts, eps)
    ids = top_features(deltas, top_k)
    return FeatureClassifier(
        features=tuple(int(f) for f in ids),
        layers=(layer,) * len(ids),
        d_sae=deltas.size,
        eps=eps,
        deltas=tuple(float(d) for d in deltas[ids]),
        **meta,
    )


def random_control(
    pos_acts, neg_acts, top_k: int = 5, eps: float = 0.0, seed: int = 0, layer: int | None = None, **meta
) -> FeatureClassifier:
    """The OR rule over ``top_k`` random features, drawn among those that fire on some discovery example
    (features that never fire would make the control trivially predict nothing)."""
    deltas = feature_deltas(pos_acts, neg_acts, eps)
    fired = np.flatnonzero(firing_rates(sp.vstack([as_csr(pos_acts), as_csr(neg_acts)]), eps) > 0)
    if fired.size < top_k:
        raise ValueError(f"only {fired.size} features fire on the discovery data; cannot draw {top_k}")
    ids = np.random.default_rng(seed).choice(fired, size=top_k, replace=False)
    return FeatureClassifier(
        features=tuple(int(f) for f in ids),
        layers=(layer,) * top_k,
        d_sae=deltas.size,
        eps=eps,
        deltas=tuple(float(d) for d in deltas[ids]),
        **meta,
    )


# ----------------------------------------------------------------------------- layer selection


def layer_deltas(pos_by_layer: Mapping[int, object], neg_by_layer: Mapping[int, object], eps: float = 0.0) -> dict:
    """``{layer: Delta_f}`` for every layer; both mappings must name the same layers."""
    if set(pos_by_layer) != set(neg_by_layer):
        raise ValueError(f"positive layers {sorted(pos_by_layer)} differ from negative layers {sorted(neg_by_layer)}")
    return {n: feature_deltas(pos_by_layer[n], neg_by_layer[n], eps) for n in sorted(pos_by_layer)}


def top1_diff(deltas_by_layer: Mapping[int, np.ndarray]) -> dict[int, float]:
    """``d(l) = max_f Delta_f(l)`` per layer (Eq. 16): an evaluation-free score of each layer."""
    if not deltas_by_layer:
        raise ValueError("no layers given")
    return {n: float(np.max(d)) for n, d in deltas_by_layer.items()}


def select_layer(deltas_by_layer: Mapping[int, np.ndarray]) -> int:
    """``argmax_l d(l)``: the layer whose best feature separates the classes most (ties: lower layer)."""
    scores = top1_diff(deltas_by_layer)
    return min(scores, key=lambda n: (-scores[n], n))


def compose_layers(deltas_by_layer: Mapping[int, np.ndarray], m: int, eps: float = 0.0, **meta) -> FeatureClassifier:
    """Eq. 17: the single best feature of each of the ``m`` layers with the highest top1-diff, OR-ed."""
    scores = top1_diff(deltas_by_layer)
    if not 1 <= m <= len(scores):
        raise ValueError(f"m must be between 1 and the number of layers ({len(scores)}), got {m}")
    layers = sorted(scores, key=lambda n: (-scores[n], n))[:m]
    widths = {deltas_by_layer[n].size for n in layers}
    if len(widths) != 1:
        raise ValueError(f"layers have different d_sae: {sorted(widths)}")
    best = [int(top_features(deltas_by_layer[n], 1)[0]) for n in layers]
    return FeatureClassifier(
        features=tuple(best),
        layers=tuple(layers),
        d_sae=widths.pop(),
        eps=eps,
        deltas=tuple(float(deltas_by_layer[n][f]) for n, f in zip(layers, best)),
        **meta,
    )


# ----------------------------------------------------------------------------- trained baselines


@dataclass(frozen=True)
class LogisticModel:
    """``sigmoid(x @ weights + bias)``: the weighted baseline's head, or a linear probe."""

    weights: np.ndarray
    bias: float

    def score(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weights + self.bias

    def predict(self, x) -> np.ndarray:
        return (self.score(x) > 0).astype(np.int8)


def fit_logistic(x_pos, x_neg, l2: float = 1e-2) -> LogisticModel:
    """L2-regularised logistic regression by L-BFGS (scipy) on standardised columns.

    Kept small on purpose: the project does not depend on scikit-learn. Columns are standardised for
    conditioning (activations reach tens) and the weights are mapped back to the raw scale.
    """
    x_pos, x_neg = (np.asarray(a, dtype=np.float64) for a in (x_pos, x_neg))
    for name, a in (("positive", x_pos), ("negative", x_neg)):
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"{name} examples must be a non-empty 2-D matrix, got shape {a.shape}")
    if x_pos.shape[1] != x_neg.shape[1]:
        raise ValueError(f"positive examples have {x_pos.shape[1]} columns but negative examples have {x_neg.shape[1]}")
    x = np.vstack([x_pos, x_neg])
    y = np.r_[np.ones(len(x_pos)), np.zeros(len(x_neg))]
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        logits = z @ w + b
        p = 1.0 / (1.0 + np.exp(-logits))
        value = np.mean(np.logaddexp(0.0, logits) - y * logits) + 0.5 * l2 * w @ w
        residual = (p - y) / len(y)
        return value, np.r_[z.T @ residual + l2 * w, residual.sum()]

    theta = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
    weights = theta[:-1] / scale
    return LogisticModel(weights=weights, bias=float(theta[-1] - mean @ weights))


def reweight(classifier: FeatureClassifier, pos_acts, neg_acts, l2: float = 1e-2) -> FeatureClassifier:
    """The weighted baseline: a logistic head on the classifier's selected features' max activations."""
    model = fit_logistic(classifier.selected(pos_acts), classifier.selected(neg_acts), l2)
    return replace(classifier, rule="logistic", weights=tuple(float(w) for w in model.weights), bias=model.bias)


def fit_linear_probe(pos_residuals, neg_residuals, l2: float = 1e-2) -> LogisticModel:
    """The linear-probe baseline on pooled raw residuals (examples x d_model), no SAE involved."""
    to_np = lambda a: a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else a  # noqa: E731
    return fit_logistic(to_np(pos_residuals), to_np(neg_residuals), l2)

