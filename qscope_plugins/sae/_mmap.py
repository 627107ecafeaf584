"""Block-wise materialisation of memory-mapped weights with a bounded resident footprint.

A memory-mapped tensor costs nothing until it is read, but every page read stays resident
while the mapping lives. Converting a layer file (transpose, dtype cast, device move) therefore
walks it in blocks and tells the kernel to drop each source block once copied
(``madvise(MADV_DONTNEED)``: the pages are clean file pages, so they are re-read from disk if
ever touched again). Peak extra memory is then the output plus one block, not output + source.

The result always owns its memory, even when no conversion is needed: a tensor left backed
by the mapping would change when the file is rewritten in place and raise SIGBUS when the
file is truncated (SAELens users expect a loaded SAE to be independent of its file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from collections.abc import Iterator

import torch

from .format import check_finite

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
        if transpose:
            out[:, start:stop].copy_(moved.T)
        else:
            out[start:stop].copy_(moved)
        release(block)
    return out
