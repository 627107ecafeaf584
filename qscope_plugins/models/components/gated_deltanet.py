"""Gated DeltaNet linear attention (Qwen3.5's ``linear_attn``), with hooks.

The maths is transformers' own: the causal depthwise convolution and the chunked (prompt) and
recurrent (one cached token) gated delta rules are the functions of
``transformers.models.qwen3_5.modeling_qwen3_5``, which dispatch to the ``causal_conv1d`` and
``fla`` kernels when those are installed and to the torch reference otherwise. This module only
holds the weights in TransformerLens layout, the hook points and the cache plumbing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN
from transformers.models.qwen3_5 import modeling_qwen3_5 as _hf_qwen3_5
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5RMSNormGated,
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from .recurrent_cache import recurrent_state, store


def _torch_conv1d_fn(x, weight, bias=None, activation=None, **_):
    """Causal depthwise conv over ``[batch, channels, pos]`` (transformers >= 5.24's torch fallback)."""
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])
    out = out[..., : x.shape[-1]]
    return (ACT2FN[activation](out) if activation else out).to(x.dtype)


def _torch_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decode step of the conv; shifts ``conv_state`` in place (same contract as the kernel)."""
    window = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(window[..., -conv_state.shape[-1]:])
    out = F.conv1d(window, weight.unsqueeze(1), bias, groups=x.shape[1])[..., -x.shape[-1]:]
    return (ACT2FN[activation](out) if activation else out).to(x.dtype)


# transformers >= 5.24 defines these functions (a kernel when installed, else torch); older 5.x
# set them to None unless the causal_conv1d package is installed, and keep the torch path inline.
causal_conv1d_fn = getattr(_hf_qwen3_5, "causal_conv1d_fn", None) or _torch_conv1d_fn
causal_conv1d_update = getattr(_hf_qwen3_5, "causal_conv1d_update", None) or _torch_conv1d_update


class GatedDeltaNet(nn.Module):
    """``W_O(RMSNormGated(delta_rule(q, k, v, g, beta), gate))`` over a causal conv of q, k, v.

    Sizes come from the HF text config kept on ``cfg.hf_text_config``. Hooks (``b`` batch,
    ``p`` pos): ``hook_q``, ``hook_k`` ``[b, p, key_heads, key_dim]`` and ``hook_v``
    ``[b, p, value_heads, value_dim]`` after the convolution (the kernel L2-normalises q and k
    itself); ``hook_gate`` the output gate before SiLU ``[b, p, value_heads * value_dim]``;
    ``hook_beta`` the write strength ``[b, p, value_heads]``; ``hook_g`` the log-space decay
    ``[b, p, value_heads]``; ``hook_recurrent_out`` the delta-rule output
    ``[b, p, value_heads * value_dim]``. The last two are flat (head-major) because
    TransformerLens's cache slicing finds the position axis by hook name: ``-3`` only for names
    ending in ``hook_q/k/v/z/result``, ``-2`` for every other hook.
    """

    def __init__(self, cfg, layer_id: int | None = None):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        hf = cfg.hf_text_config
        n_k, n_v = hf["linear_num_key_heads"], hf["linear_num_value_heads"]
        self.d_k, self.d_v = hf["linear_key_head_dim"], hf["linear_value_head_dim"]
        self.split = (n_k * self.d_k, n_k * self.d_k, n_v * self.d_v)
        channels, d_model, dtype = sum(self.split), cfg.d_model, cfg.dtype
        self.W_qkv = nn.Parameter(torch.empty(d_model, channels, dtype=dtype))
        self.W_conv = nn.Parameter(torch.empty(channels, hf["linear_conv_kernel_dim"], dtype=dtype))
        self.W_gate = nn.Parameter(torch.empty(d_model, n_v * self.d_v, dtype=dtype))
        self.W_beta = nn.Parameter(torch.empty(d_model, n_v, dtype=dtype))
        self.W_decay = nn.Parameter(torch.empty(d_model, n_v, dtype=dtype))
        self.A_log = nn.Parameter(torch.zeros(n_v, dtype=dtype))
        self.dt_bias = nn.Parameter(torch.ones(n_v, dtype=dtype))
        self.norm = Qwen3_5RMSNormGated(self.d_v, eps=cfg.eps).to(dtype)
        self.W_O = nn.Parameter(torch.empty(n_v, self.d_v, d_model, dtype=dtype))
        for name in ("q", "k", "v", "gate", "beta", "g", "recurrent_out"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        x: torch.Tensor,
        past_kv_cache_entry: TransformerLensKeyValueCacheEntry | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, pos, _ = x.shape
        if attention_mask is not None and pos > 1:
            # Padding must not leak into the conv window or the recurrent state (as in HF).
            x = x * attention_mask[:, -pos:, None].to(x.dtype)
        state = recurrent_state(past_kv_cache_entry) if past_kv_cache_entry is not None else None
        mixed, conv_state = self._conv((x @ self.W_qkv).transpose(1, 2), state.conv if state else None)
        q, k, v = mixed.transpose(1, 2).split(self.split, dim=-1)
        q = self.hook_q(q.reshape(batch, pos, -1, self.d_k))
        k = self.hook_k(k.reshape(batch, pos, -1, self.d_k))
        v = self.hook_v(v.reshape(batch, pos, -1, self.d_v))
        gate = self.hook_gate(x @ self.W_gate)
        beta = self.hook_beta((x @ self.W_beta).sigmoid())
        g = self.hook_g(-self.A_log.float().exp() * F.softplus((x @ self.W_decay).float() + self.dt_bias))

        if q.shape[-2] != v.shape[-2]:  # transformers < 5.24's rules expect one q/k head per value head
            q, k = (t.repeat_interleave(v.shape[-2] // t.shape[-2], dim=-2) for t in (q, k))
        initial = state.recurrent if state is not None else None
        rule = torch_recurrent_gated_delta_rule if initial is not None and pos == 1 else torch_chunk_gated_delta_rule
        out, final = rule(
            q, k, v, g=g, beta=beta, initial_state=initial,
            output_final_state=state is not None, use_qk_l2norm_in_kernel=True,
        )
        if past_kv_cache_entry is not None:
            store(past_kv_cache_entry, conv_state, final)
        out = self.hook_recurrent_out(out.flatten(-2))
        normed = self.norm(out.reshape(-1, self.d_v), gate.reshape(-1, self.d_v))
        return normed.reshape(batch, pos, -1) @ self.W_O.reshape(-1, self.cfg.d_model)

    def _conv(self, mixed: torch.Tensor, cached: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal conv + activation over ``[batch, channels, pos]``, and the next conv state.

        ``cached`` holds the inputs of the last ``kernel`` positions (``None`` on a prompt).
        """
        act = self.cfg.act_fn
        kernel, pos = self.W_conv.shape[-1], mixed.shape[-1]
        if cached is not None and pos == 1:
            state = cached.clone()  # the decode kernel shifts the window in place
            return causal_conv1d_update(mixed, state, self.W_conv, None, act), state
        window = mixed if cached is None else torch.cat([cached, mixed], dim=-1)
        out = causal_conv1d_fn(window, self.W_conv, None, activation=act)[..., -pos:]
        last = F.pad(window, (max(kernel - window.shape[-1], 0), 0))[..., -kernel:]
        return out, last.clone(memory_format=torch.contiguous_format)  # a copy: do not pin the prompt
