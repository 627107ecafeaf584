"""Qwen3.5-MoE's feed-forward: routed top-k experts plus an always-on, gated shared expert.

The routed part is the Qwen MoE shared with Qwen3-MoE (:class:`~.._moe.RoutedMoE`: softmax
router, top-k, renormalised weights, routing hooks). The shared expert is a plain SwiGLU
``GatedMLP`` of its own width, scaled per token by ``sigmoid(x @ W_shared_gate)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformer_lens.components import GatedMLP
from transformer_lens.hook_points import HookPoint

from .._moe import RoutedMoE


class SharedExpertMoE(RoutedMoE):
    """``RoutedMoE(x) + sigmoid(x @ W_shared_gate) * shared_expert(x)``.

    Hooks added to ``RoutedMoE``'s: ``hook_routed_out`` and ``hook_shared_out`` (the two summands,
    ``[batch, pos, d_model]``) and ``hook_shared_gate`` (pre-sigmoid, ``[batch, pos, 1]``).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        width = self.cfg.hf_text_config["shared_expert_intermediate_size"]
        self.shared_expert = GatedMLP(dataclasses.replace(self.cfg, d_mlp=width))
        self.W_shared_gate = nn.Parameter(torch.empty(self.cfg.d_model, 1, dtype=self.cfg.dtype))
        self.hook_routed_out = HookPoint()
        self.hook_shared_gate = HookPoint()
        self.hook_shared_out = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.hook_routed_out(super().forward(x))
        gate = self.hook_shared_gate(x @ self.W_shared_gate)
        return routed + self.hook_shared_out(torch.sigmoid(gate) * self.shared_expert(x))
