"""nnsight models (``TransformersModel`` / ``LanguageModel``), run locally or remotely on NDIF.

Each capture is one ``model.trace`` and each generation one ``model.generate``; the trace bodies
call only :mod:`qscope_plugins.remote` on plain tensors, so the same code runs locally, with
``remote="local"`` (nnsight's serialization dry run) and on NDIF. Interventions are
:class:`~qscope_plugins.remote.Intervention` itself, applied in the trace by the same
:func:`~qscope_plugins.remote.edit` as the other backends' hooks, with the batch's attention mask
for the prompt positions. Remote runs take vector interventions only (``supports_functions`` is
False there).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cached_property
from typing import Any

import nnsight
import torch
from nnsight.modeling.transformers import TransformersModel
from torch import Tensor

from .. import remote as trace_fns
from ..remote import Intervention
from .base import Backend
from .hf import hf_sampling_kwargs, logit_head, watch_module
from .types import Batch, Sampling


def _on(device: torch.device, interventions: Sequence[Intervention]) -> list[Intervention]:
    # The vectors' dtype is left alone: the edit casts to the residual's dtype in the trace.
    return [iv if iv.vector is None else replace(iv, vector=iv.vector.to(device)) for iv in interventions]


class NNsightBackend(Backend):
    """An nnsight ``TransformersModel`` (or a plain HF causal LM, wrapped here).

    ``remote``: ``False`` runs locally; ``True`` sends every trace to NDIF (the model may stay
    undispatched, on the meta device); ``"local"`` runs nnsight's local simulation of the remote
    path. ``nnsight_backend``: any nnsight backend object instead (e.g. a ``RemoteBackend`` with
    an explicit host and model key).
    """

    name = "nnsight"

    def __init__(self, model: Any, tokenizer=None, *, remote: bool | str = False, nnsight_backend: Any = None) -> None:
        if not isinstance(model, TransformersModel):
            model = TransformersModel(model, tokenizer=tokenizer, task="text-generation")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        where = trace_fns.layout(model)
        self.n_layers, self.d_model = where.n_layers, where.d_model
        self._trace_kwargs: dict[str, Any] = (
            {"backend": nnsight_backend} if nnsight_backend is not None else {"remote": remote} if remote else {}
        )
        self.supports_functions = not self._trace_kwargs
        device = next(model._module.parameters()).device
        self.device = torch.device("cpu") if device.type == "meta" else device
        self.model_name = getattr(model.config, "name_or_path", None) or None

    @classmethod
    def wraps(cls, obj: object) -> bool:
        return isinstance(obj, TransformersModel)

    @classmethod
    def from_pretrained(
        cls, model: str, *, device: str = "cpu", dtype: torch.dtype | None = None, remote: bool | str = False, **kwargs
    ) -> NNsightBackend:
        """Wrap a hub id or local checkpoint; loaded here (fp32 unless ``dtype``) unless ``remote=True``."""
        lm = TransformersModel(
            model, task="text-generation", dispatch=remote is not True, device_map=device,
            dtype=dtype or torch.float32, **kwargs,
        )
        return cls(lm, remote=remote)

    def _capture(self, batch: Batch, layers: Sequence[int], interventions: Sequence[Intervention]) -> dict[int, Tensor]:
        model, edits, mask = self.model, _on(self.device, interventions), batch.attention_mask
        with model.trace({"input_ids": batch.input_ids}, use_cache=False, **self._trace_kwargs) as tracer:
            hidden = trace_fns.apply(model, edits, read=layers, attention_mask=mask)
            nnsight.save(hidden)
            tracer.stop()  # the deeper layers and the LM head cannot change what was read
        return hidden

    def _generate(self, batch: Batch, interventions: Sequence[Intervention], max_new_tokens: int, sampling: Sampling) -> Tensor:
        model, edits, mask = self.model, _on(self.device, interventions), batch.attention_mask
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        options = dict(
            max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids) or None, **hf_sampling_kwargs(sampling),
        )
        with warnings.catch_warnings():
            # A batch that ends early (EOS) leaves the steering loop's last steps unreached, by design.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with model.generate(**options, **self._trace_kwargs) as tracer:
                with tracer.invoke(inputs):
                    trace_fns.generate_steered(model, tracer, edits, max_new_tokens, mask)
                with tracer.invoke():
                    ids = tracer.result.save()
        return ids[:, batch.input_ids.shape[1] :]

    def _local(self, what: str, *, forwards: bool = False) -> Any:
        """The HF model nnsight wraps, for work done next to it rather than inside a trace: its
        weights must be here (not on the meta device), and for ``forwards`` the traces must run here."""
        module = self.model._module
        if (forwards and not self.supports_functions) or next(module.parameters()).device.type == "meta":
            raise ValueError(f"{what} needs the model in this process; this nnsight backend runs remotely")
        return module

    @cached_property
    def _head(self) -> Callable[[Tensor], Tensor]:
        return logit_head(self._local("mapping residuals to logits"))

    def _unembed(self, hidden: Tensor) -> Tensor:
        return self._head(hidden)

    def _watch(self, layer: int, fn: Callable[[Tensor], None]) -> Callable[[], None]:
        return watch_module(trace_fns.decoder_layers(self._local("hooking the model's forward", forwards=True))[layer], fn)
