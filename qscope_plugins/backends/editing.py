"""Interventions in a local forward: per-layer hook functions over :func:`qscope_plugins.remote.edit`.

The intervention type and its apply function are :mod:`qscope_plugins.remote`'s (torch-only, so
remote nnsight traces run the same code); this module adds what hooks in this process need:
an :class:`Editor` that tells the prompt's forward (prefill) from the decode steps, and
:func:`layer_functions`, which combines edits with residual capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..remote import Intervention, edit, prompt_masks


class Editor:
    """Applies interventions to one layer's output across a prefill call and the decode steps.

    Backends create one per ``(batch, layer)``: the first call is the prompt (prefill) and every
    later call is one generated token, which is how KV-cached generation calls a layer.
    """

    def __init__(self, interventions: Sequence[Intervention], attention_mask: Tensor | None) -> None:
        self.interventions = list(interventions)
        if attention_mask is None:
            self.masks: list[Tensor | None] = [None] * len(self.interventions)
        else:
            self.masks = prompt_masks(self.interventions, attention_mask)
        self.calls = 0

    def __call__(self, hidden: Tensor) -> Tensor:
        prefill = self.calls == 0
        self.calls += 1
        return edit(hidden, self.interventions, self.masks, prompt=prefill)


def editors_by_layer(
    interventions: Sequence[Intervention], attention_mask: Tensor, device: torch.device, dtype: torch.dtype
) -> dict[int, Editor]:
    """One :class:`Editor` per edited layer, its vectors moved to the model's device and dtype once."""
    grouped: dict[int, list[Intervention]] = {}
    for iv in interventions:
        grouped.setdefault(iv.layer, []).append(iv.to(device, dtype))
    return {n: Editor(ivs, attention_mask) for n, ivs in grouped.items()}


class StopForward(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by a capture hook once the deepest captured layer has run: the rest of the forward
    pass cannot change what was captured, so a backend that catches it skips those layers."""


def layer_functions(
    editors: dict[int, Editor], capture: Sequence[int], captured: dict[int, Tensor], *, stop: bool = False
) -> dict[int, Callable[[Tensor], Tensor]]:
    """For every layer to hook: apply its editor (if any), then store the output in ``captured``
    (if asked), so a capture sees the edited residual. Backends wrap these in their own hooks.

    ``stop=True``: the hook of the deepest captured layer raises :class:`StopForward` after
    storing its output (edits of deeper layers are then never needed, so they are not hooked).
    """
    last = max(capture) if stop and capture else None

    def make(n: int) -> Callable[[Tensor], Tensor]:
        def fn(hidden: Tensor) -> Tensor:
            if n in editors:
                hidden = editors[n](hidden)
            if n in capture:
                captured[n] = hidden
            if n == last:
                raise StopForward
            return hidden

        return fn

    return {n: make(n) for n in {*capture, *editors} if last is None or n <= last}
