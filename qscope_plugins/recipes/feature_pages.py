"""A feature's page from an activation index: top contexts, quantile samples, histogram, logit effects.

Pure array work over a finished :class:`~.feature_index.FeatureIndex` (no model, no SAE), so a page
takes milliseconds once the layer is loaded. Contexts are token windows around an activating token,
one per document, with the feature's activation at every token of the window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .feature_index import FeatureIndex
from .token_text import display, single

NEURONPEDIA = "https://www.neuronpedia.org"


@dataclass
class Context:
    """A window of tokens around token ``peak`` of document ``doc``, with the feature's activations."""

    doc: int
    start: int
    """Position of the window's first token in the document."""
    peak: int
    """Position (in the document) of the token the context was chosen for."""
    token_ids: list[int]
    acts: list[float]

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0


@dataclass
class FeaturePage:
    layer: int
    feature: int
    density: float
    """Fraction of indexed tokens on which the feature is active."""
    n_active: int
    n_tokens: int
    max_act: float
    mean_act: float
    """Mean over the tokens where it is active."""
    top: list[Context]
    quantiles: list[dict]
    """``{"lo", "hi", "contexts"}`` per activation quantile bin, lowest first."""
    histogram: dict
    """``{"edges", "counts"}`` of the non-zero activations."""
    logits_up: list[tuple[int, float]]
    logits_down: list[tuple[int, float]]
    neighbours: list[tuple[int, float]]
    """Nearest features of the same SAE by decoder cosine."""
    explanation: dict | None = None
    neuronpedia_url: str | None = None
    model: str = ""
    sae_source: str = ""
    vocab: list[bytes] = field(default_factory=list, repr=False)

    def token(self, token_id: int) -> str:
        """One token on its own (its bytes when they are not whole characters)."""
        return single(token_id, self.vocab)

    def text(self, token_ids) -> list[str]:
        """A context's tokens as strings that join to its exact text."""
        return display(token_ids, self.vocab)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("vocab")
        for ctx in data["top"] + [c for q in data["quantiles"] for c in q["contexts"]]:
            ctx["tokens"] = self.text(ctx["token_ids"])
        for key in ("logits_up", "logits_down"):
            data[key] = [{"token_id": t, "token": self.token(t), "effect": v} for t, v in data[key]]
        data["neighbours"] = [{"feature": f, "cosine": c} for f, c in data["neighbours"]]
        return data


def neuronpedia_url(index: FeatureIndex, layer: int, feature: int) -> str | None:
    """The feature's Neuronpedia page when Neuronpedia hosts the index's SAE (recorded at index time)."""
    ids = (index.meta.get("provenance") or {}).get("neuronpedia_ids") or {}
    np_id = ids.get(str(layer))
    return f"{NEURONPEDIA}/{np_id}/{feature}" if np_id else None


class _Contexts:
    """Windows around activating tokens of one feature in the index's corpus."""

    def __init__(self, index: FeatureIndex, where: np.ndarray, values: np.ndarray, before: int, after: int):
        self.offsets, self.tokens = index.offsets, index.tokens
        self.where, self.values = where, values
        self.before, self.after = before, after
        self.docs = np.searchsorted(self.offsets, where, side="right") - 1

    def window(self, doc: int, position: int) -> Context:
        begin, end = int(self.offsets[doc]), int(self.offsets[doc + 1])
        lo, hi = max(begin, begin + position - self.before), min(end, begin + position + self.after + 1)
        acts = np.zeros(hi - lo, dtype=np.float32)
        a, b = np.searchsorted(self.where, [lo, hi])
        acts[self.where[a:b] - lo] = self.values[a:b]
        return Context(doc, lo - begin, position, self.tokens[lo:hi].tolist(), [round(float(x), 4) for x in acts])

    def at(self, i: int) -> Context:
        """The context of the ``i``-th activating token."""
        doc = int(self.docs[i])
        return self.window(doc, int(self.where[i] - self.offsets[doc]))

    def per_doc_peaks(self) -> np.ndarray:
        """Index (into the activations) of each document's strongest activation."""
        if not self.where.size:
            return np.zeros(0, dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, self.docs[1:] != self.docs[:-1]])
        peaks = np.maximum.reduceat(self.values, starts)
        ends = np.r_[starts[1:], self.values.size]
        return np.array([s + int(np.argmax(self.values[s:e] == p)) for s, e, p in zip(starts, ends, peaks)])


def feature_page(
    index: FeatureIndex,
    layer: int,
    feature: int,
    *,
    n_top: int = 20,
    n_quantiles: int = 5,
    per_quantile: int = 4,
    before: int = 24,
    after: int = 8,
    bins: int = 30,
    seed: int = 0,
) -> FeaturePage:
    """The page of ``feature`` at ``layer``: top contexts (one per document, strongest first),
    ``per_quantile`` random contexts from each of ``n_quantiles`` activation quantile bins, the
    activation histogram, logit effects, decoder-cosine neighbours and the explanation if stored."""
    where, values = index.activations(layer, feature)
    ctx = _Contexts(index, where, values, before, after)
    peaks = ctx.per_doc_peaks()
    order = peaks[np.argsort(-values[peaks], kind="stable")][:n_top]
    top = [ctx.at(int(i)) for i in order]

    quantiles = []
    if values.size:
        rng = np.random.default_rng([seed, layer, feature])
        edges = np.quantile(values, np.linspace(0, 1, n_quantiles + 1))
        for q in range(n_quantiles):
            lo, hi = edges[q], edges[q + 1]
            members = np.flatnonzero((values >= lo) & ((values <= hi) if q == n_quantiles - 1 else (values < hi)))
            picks = rng.choice(members, size=min(per_quantile, members.size), replace=False) if members.size else []
            quantiles.append({"lo": float(lo), "hi": float(hi), "contexts": [ctx.at(int(i)) for i in sorted(picks)]})
    counts, edges = np.histogram(values, bins=bins) if values.size else (np.zeros(0, int), np.zeros(0))

    effects = index.effects

    def pairs(ids: str, vals: str) -> list[tuple[int, float]]:
        return [(int(i), round(float(v), 4))
                for i, v in zip(effects[f"l{layer}_{ids}"][feature], effects[f"l{layer}_{vals}"][feature])]

    n_tokens = index.indexed_tokens
    return FeaturePage(
        layer=layer, feature=feature,
        density=values.size / max(n_tokens, 1), n_active=int(values.size), n_tokens=n_tokens,
        max_act=float(values.max()) if values.size else 0.0,
        mean_act=float(values.mean()) if values.size else 0.0,
        top=top, quantiles=quantiles,
        histogram={"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]},
        logits_up=pairs("up_ids", "up"), logits_down=pairs("down_ids", "down"),
        neighbours=pairs("nbr_ids", "nbr_cos"),
        explanation=index.explanation(layer, feature), neuronpedia_url=neuronpedia_url(index, layer, feature),
        model=index.config.model, sae_source=index.config.sae_source, vocab=index.vocab,
    )


def random_contexts(index: FeatureIndex, layer: int, feature: int, n: int, *, length: int = 32, seed: int = 0,
                    exclude_docs: set[int] | None = None) -> list[Context]:
    """``n`` random windows in which the feature is not active anywhere (the explainer's negatives)."""
    where, values = index.activations(layer, feature)
    ctx = _Contexts(index, where, values, length // 2, length - length // 2 - 1)
    rng = np.random.default_rng([seed, layer, feature, 1])
    offsets, out, tried = index.offsets, [], 0
    while len(out) < n and tried < 50 * n:
        tried += 1
        doc = int(rng.integers(len(offsets) - 1))
        if exclude_docs and doc in exclude_docs:
            continue
        size = int(offsets[doc + 1] - offsets[doc])
        c = ctx.window(doc, int(rng.integers(size)))
        if c.max_act == 0 and all((c.doc, c.start) != (o.doc, o.start) for o in out):
            out.append(c)
    return out
