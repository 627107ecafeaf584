"""TransformerLens models: ``HookedTransformer`` and ``TransformerBridge``, via hook points.

Both expose ``blocks.{n}.hook_resid_post`` (on the bridge an alias of ``blocks.{n}.hook_out``),
the output of decoder layer n, so captures and edits are TransformerLens hooks on that name.

Generation: the bridge's own ``generate`` takes the left-padded batch's attention mask directly.
``HookedTransformer.generate`` can only guess padding from the pad token id (a prompt that starts
or ends with that id is mis-masked), so for it this module runs the same KV-cached loop with the
mask stated explicitly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import cached_property

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, TransformerLensKeyValueCache
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities.logits_utils import sample_logits

from ..remote import Intervention
from .base import Backend
from .editing import Editor, StopForward, editors_by_layer, layer_functions
from .hf import logit_head, watch_module
from .types import Batch, Sampling


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


class TransformerLensBackend(Backend):
    """A ``HookedTransformer`` or a ``TransformerBridge`` (both need a tokenizer)."""

    name = "transformer-lens"

    def __init__(self, model: HookedTransformer | TransformerBridge, tokenizer=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ValueError("this TransformerLens model has no tokenizer; pass tokenizer=")
        self.n_layers = int(model.cfg.n_layers)
        self.d_model = int(model.cfg.d_model)
        self.device = next(model.parameters()).device
        self.bridge = isinstance(model, TransformerBridge)
        hf_config = getattr(getattr(model, "original_model", None), "config", None)
        self.model_name = getattr(hf_config, "name_or_path", None) or getattr(model.cfg, "model_name", None)

    @classmethod
    def wraps(cls, obj: object) -> bool:
        return isinstance(obj, (HookedTransformer, TransformerBridge))

    @classmethod
    def from_pretrained(
        cls, model: str, *, device: str = "cpu", dtype: torch.dtype | None = None, hooked: bool = False
    ) -> TransformerLensBackend:
        """Boot ``model`` as a ``TransformerBridge`` (default; every Qwen3 / Qwen3.5 text model) or,
        with ``hooked=True``, as a ``HookedTransformer`` without weight processing (the residual
        stream the SAEs read must stay unchanged), after registering this package's adapters."""
        dtype = dtype or torch.float32
        if hooked:
            from qscope_plugins import register

            register()
            tl = HookedTransformer.from_pretrained_no_processing(model, device=device, dtype=dtype)
        else:
            tl = TransformerBridge.boot_transformers(model, device=device, dtype=dtype)
        return cls(tl)

    def _editors(self, batch: Batch, interventions: Sequence[Intervention]) -> dict[int, Editor]:
        return editors_by_layer(interventions, batch.attention_mask, self.device, self.model.cfg.dtype)

    @staticmethod
    def _fwd_hooks(fns: dict[int, Callable[[Tensor], Tensor]]) -> list[tuple[str, Callable]]:
        return [(hook_name(n), lambda h, hook, fn=fn: fn(h)) for n, fn in fns.items()]

    def _capture(self, batch: Batch, layers: Sequence[int], interventions: Sequence[Intervention]) -> dict[int, Tensor]:
        captured: dict[int, Tensor] = {}
        functions = layer_functions(self._editors(batch, interventions), layers, captured, stop=self.bridge)
        hooks = self._fwd_hooks(functions)
        # Right padding + causal attention: the real positions need no mask (see backends.base).
        # The forward stops after the last captured layer (later edits cannot matter): by
        # HookedTransformer's stop_at_layer, and by StopForward from the bridge's capture hook.
        kwargs = {} if self.bridge else {"stop_at_layer": max(layers) + 1}
        with self.model.hooks(fwd_hooks=hooks), contextlib.suppress(StopForward):
            self.model(batch.input_ids, **kwargs)
        return captured

    def _generate(self, batch: Batch, interventions: Sequence[Intervention], max_new_tokens: int, sampling: Sampling) -> Tensor:
        hooks = self._fwd_hooks(dict(self._editors(batch, interventions)))
        with self.model.hooks(fwd_hooks=hooks):
            if self.bridge:
                out = self.model.generate(
                    batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=max_new_tokens,
                    stop_at_eos=True,
                    eos_token_id=sorted(self.eos_token_ids) or None,
                    do_sample=sampling.do_sample,
                    top_k=sampling.top_k,
                    top_p=sampling.top_p,
                    temperature=sampling.temperature,
                    return_type="tokens",
                    verbose=False,
                )
                return out[:, batch.input_ids.shape[1] :]
            return self._hooked_generate(batch, max_new_tokens, sampling)

    def _hooked_generate(self, batch: Batch, max_new_tokens: int, sampling: Sampling) -> Tensor:
        """KV-cached decoding for ``HookedTransformer`` with the padding mask stated, not guessed."""
        model: HookedTransformer = self.model
        size = batch.input_ids.shape[0]
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, size)
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], device=self.device)
        done = torch.zeros(size, dtype=torch.bool, device=self.device)
        tokens, mask, new = batch.input_ids, batch.attention_mask, []
        for _ in range(max_new_tokens):
            logits = model(tokens, attention_mask=mask, past_kv_cache=cache)[:, -1]
            if sampling.do_sample:
                step = sample_logits(logits, top_k=sampling.top_k, top_p=sampling.top_p, temperature=sampling.temperature)
            else:
                step = logits.argmax(-1)
            step = torch.where(done, self.pad_token_id, step)
            new.append(step)
            done |= torch.isin(step, eos)
            if bool(done.all()):
                break
            tokens, mask = step[:, None], torch.ones_like(step[:, None])
        return torch.stack(new, dim=1)

    @cached_property
    def _head(self) -> Callable[[Tensor], Tensor]:
        if not self.bridge:
            return lambda h: self.model.unembed(self.model.ln_final(h))
        return logit_head(self.model.original_model)  # the HF modules the bridge runs

    def _unembed(self, hidden: Tensor) -> Tensor:
        return self._head(hidden)

    def _watch(self, layer: int, fn: Callable[[Tensor], None]) -> Callable[[], None]:
        # The hook point itself is a module (identity forward): a plain torch hook on it stays until removed.
        return watch_module(self.model.hook_dict[hook_name(layer)], fn)

