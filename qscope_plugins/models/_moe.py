"""Qwen's routed mixture of experts as a HookedTransformer MLP, and mixed dense/MoE blocks.

Shared by Qwen3-MoE and Qwen3.5-MoE: both route with softmax -> top-k -> (optionally)
renormalise, like TransformerLens's ``MoE``; this subclass keeps its parameter names (so
TransformerLens's ``fold_ln`` folds into the router and every expert) and adds the hooks an
analysis of routing needs.

The experts' weights are stored the way HF's fused ``Qwen3MoeExperts`` stores them: every
expert's ``W_gate`` / ``W_in`` are the two halves of one ``(E, 2 d_mlp, d_model)`` tensor and
its ``W_out`` a slice of one ``(E, d_model, d_mlp)`` tensor (TransformerLens's per-expert
``nn.Linear`` parameters are views into them). So, when no expert hook point is hooked and no
gradient must reach the experts, the experts can run as transformers' own ``grouped_mm`` path
does: tokens sorted by expert, two ``torch.nn.functional.grouped_mm`` calls, no Python loop over
experts, the same bits as HF's default ``experts_implementation="grouped_mm"``. ``grouped``
picks it: ``"auto"`` (the default) wherever transformers' own dispatch would use grouped_mm (CPU;
CUDA from compute capability 8.0, in bf16 / fp16), ``True`` / ``False`` force it (fp64 always
loops: grouped_mm has no fp64 kernel)
(:func:`set_grouped_experts`). Otherwise, and whenever an expert or its ``hook_gate`` /
``hook_pre`` / ``hook_post`` is hooked or a gradient must reach the experts, TransformerLens's
per-expert loop runs, and those hooks fire per expert as before.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.components import TransformerBlock
from transformer_lens.components.mlps.moe import MoE
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from ._attention import is_hooked, use_fused_attention
from ._memory_layout import use_hf_memory_layout

_EXPERT_HOOKS = ("hook_gate", "hook_pre", "hook_post")
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what grouped_mm multiplies


class RoutedMoE(MoE):
    """Top-k routed experts with hooks on every routing decision.

    Hooks (all ``[batch, pos, ...]``):

    - ``hook_router_logits``: router logits over all experts, ``[batch, pos, n_experts]``.
    - ``hook_expert_indices``: the chosen experts, ``[batch, pos, k]`` (int64).
    - ``hook_expert_weights``: the weights the chosen experts' outputs are multiplied by,
      after ``norm_topk_prob`` renormalisation, ``[batch, pos, k]``. (TransformerLens's own
      ``MoE`` puts the full softmax on this name; here it is what the layer really uses.)

    Editing a hook changes the routing: e.g. zeroing ``hook_expert_weights`` ablates experts.
    """

    def __init__(self, cfg: HookedTransformerConfig):
        # The experts are nn.Linear layers; skip their random init (weights are loaded, and
        # HookedTransformer.init_weights covers every W_* parameter when a model is built fresh).
        with torch.device("meta"):
            super().__init__(cfg)
        self.to_empty(device=torch.get_default_device())
        # TransformerLens creates the experts' nn.Linear layers in the default dtype, not cfg.dtype.
        self.to(cfg.dtype)
        self.hook_router_logits = HookPoint()
        self.grouped: bool | str = "auto"
        self._stack_experts()

    # --------------------------------------------------------------- stacked expert weights
    def _expert_weights(self) -> list[torch.Tensor]:
        """Every expert's ``W_gate``, ``W_in``, ``W_out`` weight, in that order (no module lookups:
        this runs on every forward)."""
        return [linear._parameters["weight"] for expert in self.experts._modules.values()
                for linear in (expert._modules["W_gate"], expert._modules["W_in"], expert._modules["W_out"])]

    def _stack_experts(self) -> None:
        """Re-store the experts' weights as views of one gate/up and one down tensor (HF's layout)."""
        self._stacked_cache = None  # drop views of storage that may just have been moved or cast
        if self.stacked_experts() is not None:
            return
        first = self.experts[0]
        d_mlp, d_model = first.W_in.weight.shape
        like = first.W_in.weight
        gate_up = torch.empty(self.num_experts, 2 * d_mlp, d_model, dtype=like.dtype, device=like.device)
        down = torch.empty(self.num_experts, d_model, d_mlp, dtype=like.dtype, device=like.device)
        for e, expert in enumerate(self.experts):
            for linear, view in ((expert.W_gate, gate_up[e, :d_mlp]), (expert.W_in, gate_up[e, d_mlp:]),
                                 (expert.W_out, down[e])):
                old = linear.weight
                if old.device.type != "meta":
                    with torch.no_grad():
                        view.copy_(old)
                linear._parameters["weight"] = nn.Parameter(view, requires_grad=old.requires_grad)

    def _apply(self, fn, recurse=True):
        # Moving or casting gives every parameter storage of its own: store them stacked again.
        out = super()._apply(fn, recurse)
        self._stack_experts()
        return out

    def stacked_experts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(gate_up (E, 2 d_mlp, d_model), down (E, d_model, d_mlp))``, views of the experts'
        parameters, while those lie in HF's fused layout in one storage each (they do after
        loading, ``fold_ln`` and ``.to()``); ``None`` once one was replaced some other way.

        The answer is kept until a weight's address changes (a replaced parameter, ``.data =``,
        ``.to()``), so a forward pays one address read per weight, not the layout check."""
        return self._stacked(self._expert_weights())

    def _stacked(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = tuple(w.data_ptr() for w in weights)
        cached = getattr(self, "_stacked_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        self._stacked_cache = (key, self._check_stacked(weights))
        return self._stacked_cache[1]

    def _check_stacked(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        g0, o0 = weights[0], weights[2]
        d_mlp, d_model = g0.shape
        block, size = d_mlp * d_model, g0.element_size()
        storages = (g0.untyped_storage().data_ptr(), o0.untyped_storage().data_ptr())

        def at(t: torch.Tensor, base: torch.Tensor, storage: int, offset: int) -> bool:
            return (t.is_contiguous() and t.dtype == g0.dtype and t.device == base.device
                    and t.untyped_storage().data_ptr() == storage and t.data_ptr() == base.data_ptr() + offset * size)

        for e in range(self.num_experts):
            gate, up, down = weights[3 * e:3 * e + 3]
            if not (at(gate, g0, storages[0], 2 * e * block) and at(up, g0, storages[0], (2 * e + 1) * block)
                    and at(down, o0, storages[1], e * block)):
                return None
        E = self.num_experts
        return (g0.as_strided((E, 2 * d_mlp, d_model), (2 * block, d_model, 1)),
                o0.as_strided((E, d_model, d_mlp), (block, d_mlp, 1)))

    def uses_grouped(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the grouped path (see the module docstring)."""
        return self._grouped_weights(x) is not None

    def _grouped_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stacked weights when this forward takes the grouped path, else ``None``."""
        if self.grouped is False or not hasattr(F, "grouped_mm") or x.dtype not in _GROUPED_DTYPES:
            return None
        if self.grouped == "auto" and x.device.type != "cpu" and not (
                x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
                and torch.cuda.get_device_capability(x.device) >= (8, 0)):
            return None
        weights = self._expert_weights()
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return None
        points = [point for expert in self.experts._modules.values()
                  for point in (expert, *(expert._modules[h] for h in _EXPERT_HOOKS))]
        if is_hooked(*points):
            return None
        return self._stacked(weights)

    def _grouped_experts(self, flat_x: torch.Tensor, flat_indices: torch.Tensor, flat_weights: torch.Tensor,
                         stacked: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """All experts in two grouped GEMMs, the way transformers' ``grouped_mm`` experts run."""
        gate_up, down = stacked
        n_tokens, top_k = flat_indices.shape
        expert_ids, order = flat_indices.reshape(-1).sort()
        offsets = torch.bincount(expert_ids, minlength=self.num_experts).cumsum(0).to(torch.int32)
        tokens = flat_x[order // top_k].to(gate_up.dtype)
        gate, up = F.grouped_mm(tokens, gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        hidden = self.experts[0].act_fn(gate) * up
        out = F.grouped_mm(hidden, down.transpose(-2, -1), offs=offsets)
        out = out * flat_weights.reshape(-1)[order, None]
        restored = torch.empty_like(out)
        restored[order] = out
        return restored.view(n_tokens, top_k, -1).sum(1).to(flat_x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, pos, d_model = x.shape
        logits = self.hook_router_logits(self.W_gate(x))
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, self.experts_per_token, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        indices = self.hook_expert_indices(indices)
        weights = self.hook_expert_weights(weights.to(x.dtype))

        flat_x = x.reshape(-1, d_model)
        flat_indices = indices.reshape(-1, self.experts_per_token)
        flat_weights = weights.reshape(-1, self.experts_per_token)
        stacked = self._grouped_weights(x)
        if stacked is not None:
            return self._grouped_experts(flat_x, flat_indices, flat_weights, stacked).reshape(batch, pos, d_model)
        out = torch.zeros_like(flat_x)
        for expert in torch.unique(flat_indices).tolist():  # ascending, like HF: same sum order
            token, slot = torch.where(flat_indices == expert)
            expert_out = self.experts[expert](flat_x[token]) * flat_weights[token, slot, None]
            out.index_add_(0, token, expert_out.to(out.dtype))
        return out.reshape(batch, pos, d_model)


def mixed_block(cfg: HookedTransformerConfig, block_index: int, moe: type[MoE] | None, d_mlp: int) -> TransformerBlock:
    """A TransformerLens block whose MLP is ``moe(cfg)``, or a dense ``GatedMLP`` of width
    ``d_mlp`` when ``moe`` is ``None`` (dense layers of an MoE stack).

    The block is built from a dense copy of ``cfg`` (TransformerLens picks the MLP from the
    config), then every submodule is pointed back at ``cfg`` itself, so runtime switches such
    as ``model.set_use_attn_result(True)`` reach this block too. Its attention is fused
    (:func:`~._attention.use_fused_attention`) and its weights are in HF's memory layout.
    """
    dense_cfg = dataclasses.replace(cfg, num_experts=None, experts_per_token=None, d_mlp=d_mlp)
    block = TransformerBlock(dense_cfg, block_index)
    if moe is not None:
        block.mlp = moe(cfg)
    for module in block.modules():
        if getattr(module, "cfg", None) is dense_cfg:
            module.cfg = cfg
    return use_hf_memory_layout(use_fused_attention(block))


def set_grouped_experts(model: nn.Module, grouped: bool | str) -> None:
    """Set the experts path of every routed MoE in ``model``: ``"auto"``, ``True`` or ``False``."""
    if grouped not in ("auto", True, False):
        raise ValueError(f"grouped must be 'auto', True or False, got {grouped!r}")
    for module in model.modules():
        if isinstance(module, RoutedMoE):
            module.grouped = grouped
