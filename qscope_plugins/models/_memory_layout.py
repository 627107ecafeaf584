"""Hooked weights stored in the memory layout HF's ``nn.Linear`` uses, so forwards copy nothing.

TransformerLens keeps ``W_in`` as ``[d_model, d_mlp]`` and ``W_Q`` as ``[head, d_model, d_head]``
and, to multiply exactly as HF does, calls ``F.linear`` on ``W.T.contiguous()`` /
``rearrange(W, "h m d -> (h d) m")``: a fresh copy of every weight matrix on every forward.
Storing each parameter as a transposed view of HF-shaped storage (same shape, same values,
other strides) makes those calls views of the parameter itself: the products get the very
same operands, bit for bit, without the copies. ``load_state_dict`` copies into the
parameters in place and ``.to()`` preserves strides, so the layout survives loading,
``fold_ln`` and moving the model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.components import AbstractAttention, GatedMLP

# parameter name -> the permutation of its dims that is contiguous in HF's layout
_ATTENTION = {"W_Q": (0, 2, 1), "W_K": (0, 2, 1), "_W_K": (0, 2, 1), "W_V": (0, 2, 1), "_W_V": (0, 2, 1),
              "W_G": (0, 2, 1), "W_O": (2, 0, 1)}
_MLP = {"W_in": (1, 0), "W_gate": (1, 0), "W_out": (1, 0)}


def _store_permuted(module: nn.Module, name: str, order: tuple[int, ...]) -> None:
    old = module._parameters.get(name)
    if not isinstance(old, torch.Tensor):
        return
    storage = torch.empty([old.shape[i] for i in order], dtype=old.dtype, device=old.device)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    new = storage.permute(inverse)
    if old.device.type != "meta":
        new.copy_(old)
    module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)


def use_hf_memory_layout(block: nn.Module) -> nn.Module:
    """Re-store the attention and dense-MLP weights of ``block`` in HF's layout, in place."""
    for module in block.modules():
        spec = _ATTENTION if isinstance(module, AbstractAttention) else _MLP if isinstance(module, GatedMLP) else {}
        for name, order in spec.items():
            _store_permuted(module, name, order)
    return block
