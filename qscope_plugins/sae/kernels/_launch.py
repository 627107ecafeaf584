"""Launch a 2-D-grid Triton kernel: autotuned on GPU, one fixed tile under the interpreter.

The interpreter runs programs one after another in Python and cannot time configs, so it gets
a single large tile instead of the autotuner.
"""

from __future__ import annotations

from typing import Any

import triton

from ._triton import interpreting


def tile_configs(block_names: tuple[str, str], shapes: list[tuple[int, int, int]]) -> list[triton.Config]:
    """The autotuner's candidates: one config per ``(rows, columns, num_warps)``, tiles named ``block_names``."""
    return [triton.Config(dict(zip(block_names, (m, n))), num_warps=w) for m, n, w in shapes]


def launch_2d(
    kernel: Any, tuned: Any, extent: tuple[int, int], block_names: tuple[str, str],
    interpreter_blocks: dict[str, int], *args: Any, **constexprs: Any,
) -> None:
    """Cover ``extent`` (rows, columns) with tiles named ``block_names`` in the config."""

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(extent[0], meta[block_names[0]]), triton.cdiv(extent[1], meta[block_names[1]])

    if interpreting():
        kernel[grid](*args, **constexprs, **interpreter_blocks)
    else:
        tuned[grid](*args, **constexprs)
