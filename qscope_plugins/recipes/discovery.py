"""Finding features to steer with: contrast two text sets, or diagnose one bad response.

Contrast (Qwen-Scope report section 3.2 and the official demo's comparison tab): per layer, compare
how often each feature fires (firing-rate difference) and how strongly (mean-activation
difference) on a positive versus a negative set; the largest differences are steering
candidates (positive difference: activate; negative: suppress).

Bad-case diagnosis (report section 3.3): rank features by their activation over the tokens of a
problematic response.

Everything streams: each batch's residuals are Top-k encoded sparsely and folded into per-layer
count/sum/max vectors of length ``d_sae`` (:class:`FeatureStats`), so memory never holds a
texts x tokens x d_sae tensor. Results are tables: lists of dataclass rows (``asdict`` them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import Backend, Prompts, ResidualBatch


@dataclass
class FeatureStats:
    """Running per-feature statistics over a stream of tokens (one layer, one text set)."""

    fires: Tensor
    """Tokens on which the feature's activation was > 0."""
    total: Tensor
    """Sum of its activations."""
    peak: Tensor
    """Its largest activation."""
    tokens: int = 0

    @classmethod
    def empty(cls, d_sae: int) -> FeatureStats:
        zeros = torch.zeros(d_sae, dtype=torch.float64)
        return cls(zeros.clone(), zeros.clone(), zeros.clone())

    def update(self, values: Tensor, indices: Tensor) -> None:
        """Fold in Top-k codes ``(N, k)`` of N tokens (values are >= 0 after ReLU)."""
        flat_i = indices.reshape(-1).cpu()
        flat_v = values.reshape(-1).to("cpu", torch.float64)
        self.fires.index_add_(0, flat_i, (flat_v > 0).to(torch.float64))
        self.total.index_add_(0, flat_i, flat_v)
        self.peak.scatter_reduce_(0, flat_i, flat_v, reduce="amax")
        self.tokens += values.shape[0]

    def update_dense(self, values: Tensor) -> None:
        """Fold in dense values ``(N, d_sae)`` of N tokens, e.g. raw pre-activations (may be negative)."""
        flat = values.to("cpu", torch.float64)
        self.fires += (flat > 0).sum(0)
        self.total += flat.sum(0)
        self.peak = torch.maximum(self.peak, flat.max(0).values) if self.tokens else flat.max(0).values
        self.tokens += values.shape[0]

    @property
    def rate(self) -> Tensor:
        """Firing rate per feature (fraction of tokens)."""
        return self.fires / max(self.tokens, 1)

    @property
    def mean(self) -> Tensor:
        """Mean activation per feature over all tokens (0 where it did not fire)."""
        return self.total / max(self.tokens, 1)


@dataclass
class ContrastRow:
    """One candidate feature of a positive-versus-negative contrast."""

    layer: int
    feature: int
    rate_pos: float
    rate_neg: float
    rate_diff: float
    mean_pos: float
    mean_neg: float
    mean_diff: float


@dataclass
class FeatureRow:
    """One feature ranked by its activation on a text or a response span."""

    layer: int
    feature: int
    mean: float
    max: float
    rate: float


def _by_layer(saes) -> dict[int, object]:
    """``{layer: sae}`` from a mapping or one SAE (which then must record its layer)."""
    if isinstance(saes, Mapping):
        return {int(n): sae for n, sae in saes.items()}
    if getattr(saes, "layer", None) is None:
        raise ValueError("this SAE does not record its layer; pass {layer: sae}")
    return {int(saes.layer): saes}


def _check(backend: Backend, saes) -> dict[int, object]:
    by_layer = _by_layer(saes)
    if not by_layer:
        raise ValueError("no SAEs given")
    for layer, sae in by_layer.items():
        if not sae.complete:
            raise ValueError(f"layer {layer}: discovery needs a full SAE, not a feature subset")
        backend.check_sae(sae, layer)
    return by_layer


@torch.no_grad()
def _accumulate(
    backend: Backend,
    by_layer: Mapping[int, object],
    prompts: Prompts,
    keep,
    *,
    batch_size: int,
    progress: bool,
    raw: bool = False,
) -> dict[int, FeatureStats]:
    """Per-layer :class:`FeatureStats` over the tokens ``keep(residual_batch)`` selects (``raw``: of the
    raw pre-activations, dense per batch, as the official demo's raw mode)."""
    stats = {n: FeatureStats.empty(sae.cfg.d_sae) for n, sae in by_layer.items()}
    for rb in backend.residuals(prompts, list(by_layer), batch_size=batch_size, progress=progress):
        mask = keep(rb)
        for n, sae in by_layer.items():
            tokens = rb.hidden[n][mask]
            if tokens.shape[0] and raw:
                stats[n].update_dense(sae.encode_pre(tokens.to(sae.W_enc.device, torch.float32)))
            elif tokens.shape[0]:
                codes = sae.encode_sparse(tokens.to(sae.W_enc.device, torch.float32))
                stats[n].update(codes.values, codes.indices)
    return stats


def _top(score: Tensor, top: int) -> list[int]:
    """Ids of the ``top`` highest scores, best first, leaving out zero scores (nothing to report)."""
    values, ids = score.topk(min(top, score.numel()))
    return ids[values > 0].tolist()


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    shortest = min(len(r) for r in rows)
    for i in range(shortest):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return shortest


def token_mask(rb: ResidualBatch, *, skip_first: bool, prefix: int = 0, drop_ids: Tensor | None = None) -> Tensor:
    """Real tokens of ``rb`` minus the first token, the first ``prefix`` tokens and ``drop_ids``."""
    mask = rb.token_mask(skip_first)
    if prefix:
        mask[:, :prefix] = False
    if drop_ids is not None and drop_ids.numel():
        mask &= ~torch.isin(rb.batch.input_ids, drop_ids.to(rb.batch.input_ids.device))
    return mask


def contrast(
    backend: Backend,
    saes,
    positive: Prompts,
    negative: Prompts,
    *,
    top: int = 20,
    rank_by: str = "rate",
    skip_first: bool = True,
    drop_shared_tokens: bool = False,
    drop_common_prefix: bool = False,
    raw: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> list[ContrastRow]:
    """Top ``top`` features per layer by ``|rate_diff|`` (``rank_by="rate"``) or ``|mean_diff|``.

    ``saes``: ``{layer: QwenScopeSAE}`` or one SAE. Options: ``skip_first`` drops each text's
    first token (extreme norm); ``drop_shared_tokens`` drops every token id occurring on both
    sides (so only what differs is compared); ``drop_common_prefix`` drops the longest token prefix
    shared by all texts of both sides (e.g. a chat template); ``raw`` compares raw pre-activations
    (``W_enc x + b_enc``: a "firing" is a positive pre-activation), dense per batch. Rows come sorted
    by layer, then score.
    """
    if rank_by not in ("rate", "mean"):
        raise ValueError(f"rank_by must be 'rate' or 'mean', got {rank_by!r}")
    by_layer = _check(backend, saes)
    pos_ids, neg_ids = backend.encode(positive), backend.encode(negative)
    prefix = common_prefix_length(pos_ids + neg_ids) if drop_common_prefix else 0
    shared = None
    if drop_shared_tokens:
        both = {t for r in pos_ids for t in r} & {t for r in neg_ids for t in r}
        shared = torch.tensor(sorted(both), dtype=torch.long)

    def keep(rb: ResidualBatch) -> Tensor:
        return token_mask(rb, skip_first=skip_first, prefix=prefix, drop_ids=shared)

    side = dict(batch_size=batch_size, progress=progress, raw=raw)
    stats_pos = _accumulate(backend, by_layer, pos_ids, keep, **side)
    stats_neg = _accumulate(backend, by_layer, neg_ids, keep, **side)
    rows: list[ContrastRow] = []
    for n in sorted(by_layer):
        p, q = stats_pos[n], stats_neg[n]
        if p.tokens == 0 or q.tokens == 0:
            raise ValueError(f"no tokens left on the {'positive' if p.tokens == 0 else 'negative'} side after filtering")
        rate_diff, mean_diff = p.rate - q.rate, p.mean - q.mean
        score = (rate_diff if rank_by == "rate" else mean_diff).abs()
        for f in _top(score, top):
            rows.append(
                ContrastRow(n, f, float(p.rate[f]), float(q.rate[f]), float(rate_diff[f]),
                            float(p.mean[f]), float(q.mean[f]), float(mean_diff[f]))
            )
    return rows


def rank_features(
    backend: Backend,
    saes,
    token_ids: Sequence[int],
    *,
    span: tuple[int, int] | None = None,
    top: int = 20,
    skip_first: bool = True,
) -> list[FeatureRow]:
    """Features ranked by mean activation over ``token_ids[span[0]:span[1]]`` (default: all tokens)."""
    by_layer = _check(backend, saes)
    n_tokens = len(token_ids)
    start, stop = span if span is not None else (0, n_tokens)
    if not 0 <= start < stop <= n_tokens:
        raise ValueError(f"span {span} is empty or outside the {n_tokens} tokens")

    def keep(rb: ResidualBatch) -> Tensor:
        mask = rb.token_mask(skip_first)
        mask[:, :start] = False
        mask[:, stop:] = False
        return mask

    stats = _accumulate(backend, by_layer, [list(token_ids)], keep, batch_size=1, progress=False)
    rows: list[FeatureRow] = []
    for n in sorted(by_layer):
        s = stats[n]
        if s.tokens == 0:
            raise ValueError("no tokens to rank: the span holds only the skipped first token")
        for f in _top(s.mean, top):
            rows.append(FeatureRow(n, f, float(s.mean[f]), float(s.peak[f]), float(s.rate[f])))
    return rows


def top_features(backend: Backend, saes, text: str, *, top: int = 20, skip_first: bool = True) -> list[FeatureRow]:
    """The features most active on ``text``, per layer (mean activation over its tokens)."""
    return rank_features(backend, saes, backend.encode([text])[0], top=top, skip_first=skip_first)


def diagnose(
    backend: Backend, saes, prompt: str | Sequence[int], response: str | Sequence[int], *, top: int = 20
) -> list[FeatureRow]:
    """Bad-case diagnosis: features ranked by activation on ``response`` following ``prompt``.

    Token ids are concatenated as generation produced them (pass ``Generation.prompt_ids`` and
    ``Generation.token_ids`` to diagnose exactly what the model generated); only the response's
    positions are scored.
    """
    prompt_ids, response_ids = backend.encode([prompt, response])
    ids = prompt_ids + response_ids
    return rank_features(backend, saes, ids, span=(len(prompt_ids), len(ids)), top=top, skip_first=False)
