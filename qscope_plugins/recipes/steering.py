"""Steering with SAE feature directions (Qwen-Scope report section 3, Eq. 1: ``h <- h + alpha * d``).

``d`` is feature j's raw decoder column (not re-normalised, like the official demo), added to
the output of decoder layer n (the residual the SAE reads), at every prompt position by default
and at every generated token. ``alpha < 0`` suppresses. Several features combine as
``sum_j alpha_j d_j``.

Clamp/ablation sets chosen features' activations to a value through the SAE and keeps the
reconstruction error: ``h <- h + W_dec (z' - z)``, where ``z`` are the Top-k codes of ``h`` and
``z'`` the same codes with the chosen features set (``value=0`` ablates a feature where it fires).
It needs the full SAE next to the model, so only local backends run it.

Pure math (:func:`steering_vector`, :func:`clamp_delta`, :func:`parse_positions`) is separate from
plumbing (:func:`additive`, :func:`clamp`, :func:`steer`, :func:`steering`), which only builds
:class:`~qscope_plugins.backends.Intervention` objects for any backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..backends import Backend, Generation, Intervention, Prompts, Sampling


# ---- pure math ---------------------------------------------------------------------------------
def steering_vector(sae, features: Sequence[int], alphas: float | Sequence[float]) -> Tensor:
    """``sum_j alpha_j * d_j`` over raw decoder columns, in float32; one ``alpha`` broadcasts.

    ``sae`` is a ``QwenScopeSAE`` or a ``FeatureSubset`` holding the features.
    """
    features = [int(f) for f in features]
    if not features:
        raise ValueError("no features given")
    alphas = [float(alphas)] * len(features) if isinstance(alphas, (int, float)) else [float(a) for a in alphas]
    if len(alphas) != len(features):
        raise ValueError(f"{len(alphas)} strengths for {len(features)} features")
    directions = sae.directions(features).float()
    return torch.tensor(alphas, dtype=torch.float32, device=directions.device) @ directions


def clamp_delta(codes, features: Tensor, values: Tensor, directions: Tensor) -> Tensor:
    """``W_dec (z' - z)``: the residual change that sets ``features`` to ``values`` in the codes.

    ``codes`` are the Top-k codes of the hidden states (``TopKCodes``, shape ``(..., k)``); a
    feature outside a row's top k has activation 0 there. ``directions`` are the features' decoder
    columns ``(F, d_model)``. Adding the result keeps the SAE's reconstruction error intact, and no
    ``N x d_sae`` code tensor is ever built.
    """
    hits = codes.indices.unsqueeze(-1) == features  # (..., k, F)
    current = (codes.values.unsqueeze(-1) * hits).sum(-2)  # (..., F)
    return (values - current) @ directions


def parse_positions(spec: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``None``/``"all"`` -> every position; ``"0,2,5-8,-1"`` or ``[0, 2]`` -> those positions.

    Negative numbers count back from the last prompt token; ``"none"`` or ``""`` edits no
    prompt position (generated tokens only).
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        return tuple(int(p) for p in spec)
    text = spec.strip().lower()
    if text == "all":
        return None
    if text in ("", "none"):
        return ()
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"bad position {part!r} in {spec!r}; use e.g. 'all', '0,2,5-8' or '-1'") from None
    return tuple(out)


# ---- interventions ---------------------------------------------------------------------------
def additive(
    sae,
    features: int | Sequence[int],
    alphas: float | Sequence[float],
    *,
    layer: int | None = None,
    positions: str | Sequence[int] | None = None,
    generated: bool = True,
    backend: Backend | None = None,
) -> Intervention:
    """``h <- h + sum_j alpha_j d_j`` at ``layer`` (default: the SAE's), remote-safe.

    With ``backend`` given, the SAE is checked against the model first (layer range, width,
    backbone: see :meth:`Backend.check_sae`).
    """
    features = [features] if isinstance(features, int) else list(features)
    layer = backend.check_sae(sae, layer) if backend is not None else _layer(sae, layer)
    vector = steering_vector(sae, features, alphas)
    return Intervention(layer, vector=vector, positions=parse_positions(positions), generated=generated)


def clamp(
    sae,
    features: int | Sequence[int],
    value: float | Sequence[float] = 0.0,
    *,
    layer: int | None = None,
    positions: str | Sequence[int] | None = None,
    generated: bool = True,
    backend: Backend | None = None,
) -> Intervention:
    """Set ``features``' SAE activations to ``value`` (0 = ablation), reconstruction error kept.

    Needs a full ``QwenScopeSAE`` (Top-k must see every feature) and a local backend.
    """
    if not sae.complete:
        raise ValueError("clamping needs the full SAE (Top-k sees every feature); load it with load_sae")
    features = [features] if isinstance(features, int) else list(features)
    layer = backend.check_sae(sae, layer) if backend is not None else _layer(sae, layer)
    directions = sae.directions(features).float()  # validates the ids
    ids = torch.tensor(features, dtype=torch.long, device=directions.device)
    values = torch.as_tensor(value, dtype=torch.float32, device=ids.device).expand(len(features)).clone()

    def fn(hidden: Tensor) -> Tensor:
        codes = sae.encode_sparse(hidden.to(ids.device, torch.float32))
        delta = clamp_delta(codes, ids, values, directions)
        return hidden + delta.to(hidden.device, hidden.dtype)

    return Intervention(layer, fn=fn, positions=parse_positions(positions), generated=generated)


def _layer(sae, layer: int | None) -> int:
    layer = layer if layer is not None else getattr(sae, "layer", None)
    if layer is None:
        raise ValueError("this SAE does not record its layer; pass layer=")
    return int(layer)


# ---- functional and context-manager forms -----------------------------------------------------
def steer(
    backend: Backend,
    prompts: Prompts,
    interventions: Intervention | Sequence[Intervention],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    progress: bool = False,
) -> list[Generation]:
    """Generate from ``prompts`` with ``interventions`` applied (greedy by default)."""
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    return backend.generate(
        prompts,
        max_new_tokens=max_new_tokens,
        interventions=interventions,
        sampling=sampling,
        batch_size=batch_size,
        progress=progress,
    )


@contextlib.contextmanager
def steering(backend: Backend, *interventions: Intervention) -> Iterator[Backend]:
    """``with steering(backend, additive(sae, 6159, -20)):`` every capture and generation is steered."""
    with backend.intervening(interventions) as steered:
        yield steered
