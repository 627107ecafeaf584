"""The released Qwen-Scope layer file: a plain dict of four float tensors, read safely.

``layer{n}.sae.pt`` holds ``W_enc (d_sae, d_model)``, ``W_dec (d_model, d_sae)``,
``b_enc (d_sae,)`` and ``b_dec (d_model,)``. Reading goes through
``torch.load(weights_only=True, mmap=True)`` only, so no arbitrary object is ever unpickled
and nothing is copied until the caller decides the target device and dtype.
"""

from __future__ import annotations

import numbers
import pickle
from pathlib import Path

import torch

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


class SAEFormatError(ValueError):
    """A file is not a valid Qwen-Scope SAE layer; the message names the file and the key."""


def as_index(value, name: str) -> int:
    """``value`` as a plain int: Python and NumPy integers (and 0-d integer tensors) pass; bools, floats do not."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def read_layer_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Memory-map a released layer file and return its four tensors, unvalidated shapes aside.

    Raises :class:`SAEFormatError` for anything that is not a zip-format checkpoint holding
    only tensors (a pickle with code in it is refused before anything runs).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise SAEFormatError(
            f"{path}: refused to unpickle: the file holds objects other than tensors "
            f"(only weights_only loading is allowed): {err}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise SAEFormatError(
            f"{path}: not a readable PyTorch zip checkpoint (truncated or corrupt?): {err}"
        ) from None
    if not isinstance(state, dict):
        raise SAEFormatError(
            f"{path}: expected a dict of tensors with keys {', '.join(KEYS)}, got {type(state).__name__}"
        )
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise SAEFormatError(
            f"{path}: missing key {missing[0]!r} (expected keys {', '.join(KEYS)}; found {sorted(map(str, state))})"
        )
    extra = sorted(str(key) for key in state if key not in KEYS)
    if extra:
        raise SAEFormatError(f"{path}: unexpected keys {extra} (expected exactly {', '.join(KEYS)})")
    for key in KEYS:
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise SAEFormatError(f"{path}: key {key!r} must be a floating-point tensor, got {kind}")
    return state


def check_shapes(
    state: dict[str, torch.Tensor],
    source: str,
    *,
    d_model: int | None = None,
    d_sae: int | None = None,
) -> tuple[int, int]:
    """Check the four shapes against each other (and the catalog, when known); return (d_model, d_sae)."""
    W_enc = state["W_enc"]
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{source}: key 'W_enc' must be 2-D (d_sae, d_model), got shape {tuple(W_enc.shape)}")
    found_sae, found_model = W_enc.shape
    expected = {
        "W_enc": (d_sae or found_sae, d_model or found_model),
        "W_dec": (d_model or found_model, d_sae or found_sae),
        "b_enc": (d_sae or found_sae,),
        "b_dec": (d_model or found_model,),
    }
    names = {"W_enc": "(d_sae, d_model)", "W_dec": "(d_model, d_sae)", "b_enc": "(d_sae,)", "b_dec": "(d_model,)"}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise SAEFormatError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected {names[key]} = {shape}"
            )
    return expected["b_dec"][0], expected["b_enc"][0]


def check_finite(tensor: torch.Tensor, source: str, key: str) -> None:
    """Raise unless every value is finite; a min/max reduction allocates nothing tensor-sized."""
    if tensor.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
        raise SAEFormatError(f"{source}: key {key!r} holds non-finite values (NaN or inf)")


def save_layer_file(path: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Write the four tensors exactly as Qwen-Scope does (``torch.save`` of a plain dict)."""
    path = Path(path)
    torch.save({key: state[key].detach().contiguous() for key in KEYS}, path)
    return path


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense codes ``ReLU(TopK_k(pre))`` of the released formula (the k largest, sorted, ReLU, scattered into zeros)."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


@torch.no_grad()
def released_layout(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, *,
                    b_dec_presub: bool, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Trained weights in SAELens's orientation (``W_enc (d_in, d_sae)``, ``W_dec (d_sae, d_in)``) as the
    four released tensors (new copies, each keeping its view's strides), with the training conventions folded in.

    ``b_dec_presub``: training encoded ``x - b_dec``, so ``b_enc - W_enc^T b_dec`` replaces ``b_enc``.
    ``scale``: training saw ``x / scale``; Top-k and ReLU commute with a positive factor, so both biases
    are multiplied by it. The result computes ``ReLU(TopK_k(W_enc x + b_enc))`` / ``W_dec z + b_dec`` on raw ``x``.
    """
    rows = W_enc.detach().T
    if b_dec_presub:
        b_enc = b_enc.detach() - rows @ b_dec.detach()
    return {key: value.detach().clone() for key, value in (
        ("W_enc", rows), ("W_dec", W_dec.detach().T), ("b_enc", b_enc * scale), ("b_dec", b_dec * scale))}

