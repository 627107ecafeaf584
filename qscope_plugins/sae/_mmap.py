"""Block-wise materialisation of memory-mapped weights with a bounded resident footprint.

A memory-mapped tensor costs nothing until it is read, but every page read stays resident
while the mapping lives. Converting a layer file (transpose, dtype cast, device move) therefore
walks it in blocks and tells the kernel to drop each source block once copied
(``madvise(MADV_DONTNEED)``: the pages are clean file pages, so they are re-read from disk if
ever touched again). Peak extra memory is then the output plus one block, not output + source.

Before anything is materialised, :func:`check_layout` compares what each tensor claims (shape,
strides, dtype) with the bytes actually behind it: a crafted file of a few KB whose tensor has
stride 0 (or overlapping strides) and a huge shape would otherwise make a copy allocate gigabytes.
Casting to a narrower dtype is checked too (:func:`check_fits`): weights that overflow float16
become inf and are refused, not loaded.

The result always owns its memory, even when no conversion is needed: a tensor left backed
by the mapping would change when the file is rewritten in place and raise SIGBUS when the
file is truncated (SAELens users expect a loaded SAE to be independent of its file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from collections.abc import Iterator, Mapping

import torch

from .format import SAEFormatError, check_finite

BLOCK_BYTES = 32 << 20
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def release(tensor: torch.Tensor) -> None:
    """Drop the resident pages fully inside a contiguous CPU tensor backed by a file mapping."""
    if _libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def _non_overlapping(tensor: torch.Tensor) -> bool:
    """True when no two elements of ``tensor`` share memory (so it cannot claim more than its storage)."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1)
    reach = 0  # the largest offset the faster-moving dimensions can reach
    for stride, size in dims:
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def check_layout(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse tensors that claim more elements than the bytes behind them (before anything is copied).

    Each tensor must be non-overlapping (no stride 0, no overlapping strides), lie inside its storage,
    and the storages together cannot hold more bytes than the file has.
    """
    source = os.fspath(source)
    try:
        file_bytes = os.path.getsize(source)
    except OSError:
        file_bytes = None
    storages: dict[int, int] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        claimed = tensor.numel() * tensor.element_size()
        if tensor.numel() > 1 and not _non_overlapping(tensor):
            raise SAEFormatError(
                f"{source}: key {key!r} claims shape {tuple(tensor.shape)} with strides {tuple(tensor.stride())}: "
                "its elements overlap in storage (stride 0 or overlapping strides), so it is not a saved weight "
                "matrix; refusing to expand it"
            )
        storage = tensor.untyped_storage()
        end = (tensor.storage_offset() * tensor.element_size()) + claimed
        if end > storage.nbytes():
            raise SAEFormatError(
                f"{source}: key {key!r} claims {claimed} bytes but its storage holds {storage.nbytes()}"
            )
        storages[storage.data_ptr()] = storage.nbytes()
    total = sum(storages.values())
    if file_bytes is not None and total > file_bytes:
        raise SAEFormatError(
            f"{source}: its tensors claim {total} bytes but the file has only {file_bytes}; refusing to read it"
        )


def check_fits(converted: torch.Tensor, original: torch.Tensor, source: str, key: str) -> None:
    """Raise when a cast made finite values infinite (e.g. float32 weights above 65504 as float16)."""
    if converted.dtype == original.dtype or not converted.is_floating_point() or not converted.numel():
        return
    if bool(torch.isfinite(torch.stack(torch.aminmax(converted))).all()):
        return
    lo, hi = torch.aminmax(original)
    largest = max(abs(float(lo)), abs(float(hi)))
    raise SAEFormatError(
        f"{source}: key {key!r} does not fit in {str(converted.dtype).removeprefix('torch.')}: values up to "
        f"{largest:.6g} overflow to inf (largest finite {torch.finfo(converted.dtype).max:.6g}); load it as "
        "float32 or bfloat16"
    )


def cast(tensor: torch.Tensor, *, device: torch.device, dtype: torch.dtype, source: str, key: str) -> torch.Tensor:
    """``tensor.to(device, dtype)`` as a copy, refused when the cast overflows."""
    out = tensor.to(device=device, dtype=dtype, copy=True)
    check_fits(out, tensor, source, key)
    return out


def _row_blocks(tensor: torch.Tensor) -> Iterator[tuple[int, int]]:
    row_bytes = max(1, tensor[0].numel() * tensor.element_size()) if tensor.shape[0] else 1
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, tensor.shape[0], step):
        yield start, min(start + step, tensor.shape[0])


def materialize(
    src: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
    transpose: bool,
    source: str,
    key: str,
) -> torch.Tensor:
    """Return a copy of ``src`` (or ``src.T``) on ``device`` in ``dtype``, contiguous, checked finite.

    The copy is made block by block and each source block is dropped once copied, so the peak
    extra memory is the output plus one block, and the output never refers to the mapping.
    """
    shape = (src.shape[1], src.shape[0]) if transpose else tuple(src.shape)
    out = torch.empty(shape, dtype=dtype, device=device)
    for start, stop in _row_blocks(src):
        block = src[start:stop]
        check_finite(block, source, key)
        moved = block.to(device=device, dtype=dtype)
        check_fits(moved, block, source, key)
        if transpose:
            out[:, start:stop].copy_(moved.T)
        else:
            out[start:stop].copy_(moved)
        release(block)
    return out
