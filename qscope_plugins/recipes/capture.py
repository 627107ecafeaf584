"""Model plumbing shared by footprints and classifiers: texts -> pooled sparse SAE codes, batch by batch.

Depends only on :class:`qscope_plugins.backends.Backend`. One forward pass per batch serves every
requested layer; each layer's residuals are Top-k encoded sparsely and pooled over tokens with
:func:`~qscope_plugins.recipes.pooling.pool_codes`, so nothing of size tokens x d_sae is ever built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ..backends import Backend, Prompts
from .pooling import pool_codes

MODES = ("last", "max", "count")
_UNBOUNDED = 10**8  # tokenizers report ~1e30 as model_max_length when they do not know it


def context_limit(backend: Backend) -> int | None:
    """The model's context length as its tokenizer reports it, or ``None`` when unknown."""
    limit = getattr(backend.tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < _UNBOUNDED else None


def tokenize(backend: Backend, prompts: Prompts) -> list[list[int]]:
    """Token ids per prompt; a prompt longer than the model context is an error, not a silent truncation."""
    rows = backend.encode(prompts)
    limit = context_limit(backend)
    if limit is not None:
        for i, row in enumerate(rows):
            if len(row) > limit:
                raise ValueError(f"text {i} has {len(row)} tokens, more than the model context ({limit} tokens)")
    return rows


def sae_widths(backend: Backend, saes: Mapping[int, object]) -> dict[int, int]:
    """``{layer: d_sae}`` after checking each SAE against the model at its layer (width, range, provenance).

    Rejects an empty mapping and SAEs that cannot encode (feature subsets).
    """
    if not saes:
        raise ValueError("no SAEs given")
    for layer, sae in saes.items():
        if not sae.complete:
            raise ValueError(f"the SAE for layer {layer} cannot Top-k encode (load it with load_sae)")
        backend.check_sae(sae, layer)
    return {layer: int(sae.cfg.d_sae) for layer, sae in saes.items()}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not enabled)


def pooled_batches(
    backend: Backend,
    saes: Mapping[int, object],
    rows: Sequence[Sequence[int]],
    *,
    mode: str = "max",
    skip_first_token: bool = True,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "encoding",
) -> Iterator[dict[int, sp.csr_array]]:
    """For each batch of ``rows`` (token ids), ``{layer: (B, d_sae) sparse}`` pooled SAE codes.

    ``mode="last"``: the codes of each text's last token (the footprint of the report, Eq. 2);
    ``"max"``: each feature's max activation over the tokens (the classifier's Eq. 13);
    ``"count"``: the number of tokens at which each feature is active. ``skip_first_token`` drops
    each text's first token from ``max``/``count`` (its residual norm is extreme). The progress bar
    counts tokens, so it shows tokens/s.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    widths = sae_widths(backend, saes)
    layers = sorted(saes)
    bar = _progress(sum(len(r) for r in rows), progress, desc)
    try:
        for rb in backend.residuals(rows, layers, last_token=mode == "last", batch_size=batch_size):
            pooled = {}
            for layer in layers:
                with torch.no_grad():  # codes only: no graph, and fp32 SAEs may take the bf16 screen
                    codes = saes[layer].encode_sparse(rb.hidden[layer])
                mask = None if mode == "last" else rb.token_mask(skip_first_token)
                reduce = "count" if mode == "count" else "max"
                pooled[layer] = pool_codes(codes.values, codes.indices, widths[layer], mask, reduce)
            bar.update(int(rb.mask.sum()))
            yield pooled
    finally:
        bar.close()


def pooled_codes(backend: Backend, saes: Mapping[int, object], prompts: Prompts, **kwargs) -> dict[int, sp.csr_array]:
    """All prompts' pooled codes per layer as one ``texts x d_sae`` sparse matrix (see :func:`pooled_batches`)."""
    rows = tokenize(backend, prompts)
    parts: dict[int, list[sp.csr_array]] = {layer: [] for layer in saes}
    for pooled in pooled_batches(backend, saes, rows, **kwargs):
        for layer, matrix in pooled.items():
            parts[layer].append(matrix)
    return {layer: sp.vstack(chunks, format="csr") for layer, chunks in parts.items()}


@torch.no_grad()
def pooled_residuals(
    backend: Backend, prompts: Prompts, layers: Sequence[int], *, skip_first_token: bool = True, batch_size: int = 8
) -> dict[int, np.ndarray]:
    """Mean residual over each text's tokens per layer (``texts x d_model``): the linear-probe input.

    A one-token text keeps its only token even with ``skip_first_token``.
    """
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for rb in backend.residuals(tokenize(backend, prompts), layers, batch_size=batch_size):
        mask = rb.token_mask(skip_first_token)
        mask[mask.sum(-1) == 0] = rb.mask[mask.sum(-1) == 0]
        weights = mask.unsqueeze(-1).to(torch.float32)
        for layer in layers:
            hidden = rb.hidden[layer].to(torch.float32)
            out[layer].append(((hidden * weights).sum(1) / weights.sum(1)).cpu().numpy())
    return {layer: np.concatenate(chunks) for layer, chunks in out.items()}
