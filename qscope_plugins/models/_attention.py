"""Attention through ``torch.nn.functional.scaled_dot_product_attention`` when nothing needs the pattern.

TransformerLens 3.9's ``AbstractAttention.forward`` always builds the ``[batch, head, query,
key]`` scores, masks them, takes the softmax and multiplies by the values, so that
``hook_attn_scores`` and ``hook_pattern`` can fire; its config has no switch for a fused kernel
(``HookedTransformerConfig`` has no ``attn_implementation`` or flash field, and
``use_attn_result`` / ``use_split_qkv_input`` only change the projections). HF's models use
SDPA by default, so the hooked model did the same work less efficiently.

:class:`FusedAttention` (a mixin in front of TransformerLens's ``Attention`` or
``GroupedQueryAttention``) runs SDPA instead whenever neither ``hook_attn_scores`` nor
``hook_pattern`` has a hook (``run_with_cache`` and ``hooks()`` attach PyTorch hooks, and any
module-level or global hook counts) and the config asks for nothing SDPA cannot express;
otherwise TransformerLens's own forward runs unchanged. Both paths fire ``hook_q``, ``hook_k``,
``hook_v``, ``hook_rot_q``, ``hook_rot_k``, ``hook_z`` and ``hook_result`` (when
``use_attn_result``), with values equal up to the fused kernel's fp rounding.
:func:`set_fused_attention` turns it off for a whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module
from transformer_lens.components import AbstractAttention, Attention, GroupedQueryAttention


def is_hooked(*points: nn.Module) -> bool:
    """Whether running any of ``points`` may call anything but its own forward: a forward, pre or
    backward hook on it, a global module hook, or a replaced instance ``forward``."""
    if (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
            or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks):
        return True
    return any(
        point._forward_hooks
        or point._forward_pre_hooks
        or point._backward_hooks
        or point._backward_pre_hooks
        or "forward" in vars(point)
        for point in points
    )


class FusedAttention(AbstractAttention):
    """Mixin (in front of a concrete TransformerLens attention class): ``forward`` takes the
    SDPA path when :meth:`fusable` says it may. It holds no state of its own.

    ``fused`` (default ``True``) is an instance switch; subclasses that post-process ``z``
    override :meth:`output_gate`, which both paths apply right after ``hook_z``.
    """

    fused: bool = True

    def output_gate(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def calculate_z_scores(self, v, pattern):
        return self.output_gate(super().calculate_z_scores(v, pattern))

    def fusable(self, additive_attention_mask, position_bias) -> bool:
        cfg = self.cfg
        return (
            self.fused
            and additive_attention_mask is None
            and position_bias is None
            and cfg.positional_embedding_type == "rotary"
            and self.attn_type == "global"
            and (self._attention_dir_override or cfg.attention_dir) == "causal"
            and not cfg.use_logn_attn
            and not cfg.use_attention_sinks
            and not cfg.load_in_4bit
            and cfg.clip_qkv is None
            and not (cfg.attn_scores_soft_cap or 0) > 0
            and not is_hooked(self.hook_attn_scores)
            and not is_hooked(self.hook_pattern)
        )

    def forward(
        self,
        query_input,
        key_input,
        value_input,
        past_kv_cache_entry=None,
        additive_attention_mask=None,
        attention_mask=None,
        position_bias=None,
    ):
        if not self.fusable(additive_attention_mask, position_bias):
            return super().forward(
                query_input, key_input, value_input, past_kv_cache_entry,
                additive_attention_mask, attention_mask, position_bias,
            )
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        offset = 0
        if past_kv_cache_entry is not None:
            offset = past_kv_cache_entry.past_keys.size(1)
            k, v = past_kv_cache_entry.append(k, v)
        q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
        k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))
        z = self.output_gate(self.hook_z(self._attend(q, k, v.to(q.device), offset, attention_mask)))
        return self._project_out(z)

    def _attend(self, q, k, v, offset: int, attention_mask) -> torch.Tensor:
        """``softmax(q k^T / attn_scale + causal/padding mask) v`` as ``[batch, pos, head, d_head]``;
        a query that may attend to no key gets zeros (TransformerLens turns its NaN row into 0)."""
        q_len, k_len = q.shape[1], k.shape[1]
        q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
        v_ = v_.to(q_.dtype)
        # Grouped-query heads go to SDPA as they are (no repeated copies of the keys and values).
        sdpa = dict(scale=1.0 / self.attn_scale, enable_gqa=k_.shape[1] != q_.shape[1])
        if attention_mask is None and offset == 0 and q_len == k_len:
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, **sdpa).transpose(1, 2)
        mask = self._make_causal_mask(q_len, k_len, offset, q.device)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].to(device=q.device, dtype=torch.bool)
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, **sdpa)
        out = torch.where(mask.any(-1, keepdim=True), out, out.new_zeros(()))
        return out.transpose(1, 2)

    def _project_out(self, z: torch.Tensor) -> torch.Tensor:
        """``W_O`` and ``b_O`` as TransformerLens applies them (same ops, so the same bits)."""
        W_O, b_O = self.W_O.to(z.device), self.b_O.to(z.device)
        z = z.to(W_O.dtype)
        if not self.cfg.use_attn_result:
            n_heads, d_head, d_model = W_O.shape
            weight = W_O.permute(2, 0, 1).reshape(d_model, n_heads * d_head)
            return F.linear(z.reshape(z.shape[0], z.shape[1], n_heads * d_head), weight, b_O)
        result = self.hook_result((z.unsqueeze(-1) * W_O[None, None]).sum(-2))
        return result.sum(-2) + b_O


class FusedPlainAttention(FusedAttention, Attention):
    """TransformerLens ``Attention`` (as many key/value heads as query heads) with fused attention."""


class FusedGroupedQueryAttention(FusedAttention, GroupedQueryAttention):
    """TransformerLens ``GroupedQueryAttention`` with fused attention."""


def use_fused_attention(block: nn.Module) -> nn.Module:
    """Give a TransformerLens ``TransformerBlock`` the fused version of its attention, in place.

    The mixin adds no state, so the attention module keeps its parameters, buffers and hook
    points and only its class changes (building a second attention layer would recompute the
    rotary tables). Local (windowed) attention is left as it is.
    """
    attn = block.attn
    if type(attn) in (Attention, GroupedQueryAttention) and attn.attn_type == "global":
        attn.__class__ = FusedPlainAttention if type(attn) is Attention else FusedGroupedQueryAttention
    return block


def set_fused_attention(model: nn.Module, enabled: bool) -> None:
    """Turn the fused path on or off in every attention layer of ``model``."""
    for module in model.modules():
        if isinstance(module, FusedAttention):
            module.fused = enabled
