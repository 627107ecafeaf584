"""Plain HF transformers models, driven by torch forward hooks on the decoder-layer modules.

The hook on ``layers[n]`` sees exactly what the Qwen-Scope SAEs were trained on (the model
card hooks the same module). Generation is HF's own ``generate`` with the attention mask of a
left-padded batch; the hooks edit each layer's output on the prefill call and on every decode step.
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..remote import Intervention, decoder_layers, final_norm, layout, unembedding
from .base import Backend
from .editing import Editor, StopForward, editors_by_layer, layer_functions
from .types import Batch, Sampling


def logit_head(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """Residual -> logits of an HF causal LM: its final norm, then its unembedding (the modules its
    own forward ends with), found by the layout resolver."""
    norm, head = final_norm(model), unembedding(model)
    return lambda h: head(norm(h))


def watch_module(module: nn.Module, fn: Callable[[Tensor], None]) -> Callable[[], None]:
    """Call ``fn`` on ``module``'s output (a tensor, or the first of a tuple) in every forward; returns the remover."""

    def hook(module, args, output) -> None:
        fn(output[0] if isinstance(output, tuple) else output)

    return module.register_forward_hook(hook).remove


def _edit_output(edit: Callable[[Tensor], Tensor]):
    """A forward hook applying ``edit`` to a layer output that is a tensor or a tuple led by one."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return hook


class HFBackend(Backend):
    """A ``transformers`` causal LM (``PreTrainedModel``) with its tokenizer."""

    name = "hf"

    def __init__(self, model: nn.Module, tokenizer=None) -> None:
        self.model = model.eval()
        self._tokenizer = tokenizer
        where = layout(model)  # the one resolver (also used by nnsight traces), checked against the config
        self.layers = decoder_layers(model, where)
        self.n_layers, self.d_model = where.n_layers, where.d_model
        self.device = next(model.parameters()).device
        self.model_name = model.config.name_or_path or None

    @property
    def tokenizer(self):
        """The tokenizer given, else the model's own (``AutoTokenizer`` on its path), loaded when first used:
        :meth:`watch` and :meth:`logits` need none."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model.config.name_or_path)
        return self._tokenizer

    @classmethod
    def wraps(cls, obj: object) -> bool:
        from transformers import PreTrainedModel

        return isinstance(obj, PreTrainedModel)

    @classmethod
    def from_pretrained(cls, model: str, *, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs) -> HFBackend:
        """Load a hub id or local checkpoint with ``AutoModelForCausalLM`` (fp32 unless ``dtype``)."""
        from transformers import AutoTokenizer

        from ..models._hf import load_causal_lm

        hf = load_causal_lm(model, dtype=dtype or torch.float32, **kwargs).to(device)
        return cls(hf, AutoTokenizer.from_pretrained(model))

    @contextlib.contextmanager
    def _hooks(self, edits: dict[int, Callable[[Tensor], Tensor]]) -> Iterator[None]:
        handles = [self.layers[n].register_forward_hook(_edit_output(fn)) for n, fn in edits.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _editors(self, batch: Batch, interventions: Sequence[Intervention]) -> dict[int, Editor]:
        return editors_by_layer(interventions, batch.attention_mask, self.device, next(self.model.parameters()).dtype)

    def _capture(self, batch: Batch, layers: Sequence[int], interventions: Sequence[Intervention]) -> dict[int, Tensor]:
        captured: dict[int, Tensor] = {}
        # The forward stops after the deepest captured layer (nothing later can change the capture):
        # a middle-layer capture skips the remaining layers, the final norm and the LM head.
        with self._hooks(layer_functions(self._editors(batch, interventions), layers, captured, stop=True)):
            # Right padding + causal attention: no mask needed for the real positions, and none
            # passed keeps the forward identical to the unpadded one.
            with contextlib.suppress(StopForward):
                self.model(input_ids=batch.input_ids, use_cache=False)
        return captured

    def _generate(self, batch: Batch, interventions: Sequence[Intervention], max_new_tokens: int, sampling: Sampling) -> Tensor:
        editors = self._editors(batch, interventions)
        with self._hooks(dict(editors)):
            out = self.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                pad_token_id=self.pad_token_id,
                eos_token_id=sorted(self.eos_token_ids) or None,
                **hf_sampling_kwargs(sampling),
            )
        return out[:, batch.input_ids.shape[1] :]

    @cached_property
    def _head(self) -> Callable[[Tensor], Tensor]:
        return logit_head(self.model)

    def _unembed(self, hidden: Tensor) -> Tensor:
        return self._head(hidden)

    def _watch(self, layer: int, fn: Callable[[Tensor], None]) -> Callable[[], None]:
        return watch_module(self.layers[layer], fn)


def hf_sampling_kwargs(sampling: Sampling) -> dict:
    """``generate`` keyword arguments for ``sampling`` (greedy: ``do_sample=False``, no filters)."""
    if not sampling.do_sample:
        return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    return {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
    }
