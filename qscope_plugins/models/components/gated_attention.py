"""Qwen3.5's full attention: grouped-query attention whose output is gated per channel.

HF's ``q_proj`` is twice as wide as the query: per head it emits the query and a gate of the
same size, and the attention output is multiplied by ``sigmoid(gate)`` before ``o_proj``. Here
the gate has its own weight ``W_G`` (shaped like ``W_Q``) and everything else -- q/k norm,
partial rotary, the causal mask, the KV cache, ``hook_pattern`` -- is TransformerLens's own
``GroupedQueryAttention``, fused through SDPA when nothing hooks the pattern (:mod:`.._attention`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.attention import simple_attn_linear

from .._attention import FusedGroupedQueryAttention
from .zero_centred_rms_norm import ZeroCentredRMSNorm


class OutputGatedAttention(FusedGroupedQueryAttention):
    """``GroupedQueryAttention`` + ``z * sigmoid(x @ W_G + b_G)`` before ``W_O``.

    Hooks added to TransformerLens's: ``hook_gate`` (pre-sigmoid gate, ``[batch, pos, head * d_head]``,
    head-major: flat so that TransformerLens's cache slicing, which finds the position axis by
    hook name, cuts positions). ``hook_z`` keeps its TransformerLens meaning (pattern @ v);
    ``W_O`` reads ``hook_z * sigmoid(hook_gate)``.
    """

    def __init__(self, cfg, attn_type: str = "global", layer_id: int | None = None):
        super().__init__(cfg, attn_type, layer_id)
        n_heads, d_model, d_head = self.cfg.n_heads, self.cfg.d_model, self.cfg.d_head
        self.W_G = nn.Parameter(torch.empty(n_heads, d_model, d_head, dtype=self.cfg.dtype))
        self.b_G = nn.Parameter(torch.zeros(n_heads, d_head, dtype=self.cfg.dtype))
        self.q_norm = ZeroCentredRMSNorm(self.cfg, d_head)
        self.k_norm = ZeroCentredRMSNorm(self.cfg, d_head)
        self.hook_gate = HookPoint()
        # The gate is computed from the query input but applied to z; TransformerLens's forward
        # computes both in one call, so it is carried between the two overridden steps.
        self._pending_gate: torch.Tensor | None = None

    def calculate_qkv_matrices(self, query_input, key_input, value_input):
        gate = simple_attn_linear(query_input, self.W_G, self.b_G)
        self._pending_gate = self.hook_gate(gate.flatten(-2)).unflatten(-1, gate.shape[-2:])
        return super().calculate_qkv_matrices(query_input, key_input, value_input)

    def output_gate(self, z):
        gate, self._pending_gate = self._pending_gate, None
        return z * torch.sigmoid(gate.to(z.device))
