"""The one interface for residual capture and interventions that every recipe uses.

Recipes (steering, discovery, footprints, classifiers, synthesis) talk only to :class:`Backend`,
so one recipe runs unchanged on a plain HF model, a HookedTransformer / TransformerBridge or an
nnsight model. A framework implements two primitives (:meth:`Backend._capture` and
:meth:`Backend._generate`); tokenisation, batching, padding, position masks, EOS trimming and
decoding live here once.

Conventions every implementation keeps:

* **Layer n** is the output of HF decoder layer n (0-based), i.e. TransformerLens
  ``blocks.{n}.hook_resid_post``, the activation SAE file ``layer{n}.sae.pt`` reads.
* **Capture batches are right-padded**: with causal attention a real token never sees a later pad,
  so every real position equals the unpadded forward exactly and no attention mask is needed.
  :attr:`ResidualBatch.mask` marks the real tokens; statistics must use it (see
  :meth:`ResidualBatch.tokens`), so padded positions are never counted.
* **Generation batches are left-padded** (real tokens flush right, so every row's next-token
  logits are at the last column); the attention mask is passed to the framework.
* **Prompt positions** of an :class:`Intervention` count from each row's first real token;
  negative positions count back from its last real token (``-1`` = last prompt token).
* An intervention edits layer n's output *before* anything downstream (including a capture of
  the same layer) sees it.

The pieces around this class: the value types (:mod:`.types`), the intervention type and its one
apply function (:mod:`qscope_plugins.remote`, shared with remote nnsight traces) and the local
hook plumbing (:mod:`.editing`), and the SAE fit checks (:mod:`.sae_compat`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..remote import Intervention, check_layer
from .sae_compat import check_sae
from .types import Batch, Generation, Prompts, ResidualBatch, Sampling


class Backend(ABC):
    """Residual capture and generation with interventions over one loaded model.

    Subclasses set ``tokenizer``, ``n_layers``, ``d_model``, ``device`` and ``model_name`` (the
    backbone id when known, used to warn about SAEs trained on another model) and implement
    :meth:`_capture` and :meth:`_generate`. Constructors take ``(model, tokenizer=None)``;
    ``from_pretrained(name_or_path, **kw)`` loads a hub id or local directory, and ``wraps(obj)``
    says whether a model object is one this backend drives (used by ``as_backend``).
    """

    name: str = "base"
    supports_functions: bool = True
    """False for backends that cannot run Python callables next to the model (remote nnsight)."""

    tokenizer: object
    n_layers: int
    d_model: int
    device: torch.device
    model_name: str | None = None

    # ---- what a framework implements -------------------------------------------------------
    @classmethod
    def wraps(cls, obj: object) -> bool:
        """Whether ``obj`` is a model object this backend drives."""
        return False

    @abstractmethod
    def _capture(self, batch: Batch, layers: Sequence[int], interventions: Sequence[Intervention]) -> dict[int, Tensor]:
        """One forward pass over a right-padded ``batch``; ``{layer: (B, T, D)}`` after the edits."""

    @abstractmethod
    def _generate(
        self, batch: Batch, interventions: Sequence[Intervention], max_new_tokens: int, sampling: Sampling
    ) -> Tensor:
        """Generate from a left-padded ``batch``; ``(B, <= max_new_tokens)`` new ids (anything after EOS is ignored)."""

    def _unembed(self, hidden: Tensor) -> Tensor:
        """The model's final norm, then its unembedding, on residuals ``(..., d_model)``."""
        raise NotImplementedError(f"the {self.name} backend does not map residuals to logits")

    def _watch(self, layer: int, fn: Callable[[Tensor], None]) -> Callable[[], None]:
        """Call ``fn`` on layer ``layer``'s output in every forward of the model; returns the remover."""
        raise NotImplementedError(f"the {self.name} backend cannot hook the model's own forward passes")

    # ---- shared plumbing -------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def eos_token_ids(self) -> set[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}

    def check_layer(self, layer: int) -> int:
        """``layer`` if it names a decoder layer of this model, else a ``LayerRangeError`` saying the range."""
        return check_layer(layer, self.n_layers)

    def check_sae(self, sae, layer: int | None = None) -> int:
        """Check that ``sae`` (a ``QwenScopeSAE`` or ``FeatureSubset``) fits this model at ``layer``.

        Returns the layer (default: the SAE's own). Raises ``ValueError`` when the layer is out of
        range or the widths differ; warns when the SAE was trained on another backbone or layer,
        since its features then mean little here (a base-model SAE on the same model's
        post-trained checkpoint is fine, as the Qwen-Scope cards say).
        """
        return check_sae(sae, layer, self.check_layer, self.d_model, self.model_name)

    def encode(self, prompts: Prompts) -> list[list[int]]:
        """Token ids per prompt (the tokenizer's own special tokens; Qwen adds no BOS)."""
        if len(prompts) == 0:
            raise ValueError("no prompts given: the prompt list is empty")
        ids = [
            list(self.tokenizer(p)["input_ids"]) if isinstance(p, str) else [int(t) for t in p] for p in prompts
        ]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"prompt {i} is empty (no tokens)")
        return ids

    def pad(self, rows: Sequence[Sequence[int]], side: str, start: int = 0) -> Batch:
        """One padded :class:`Batch` on the model's device; ``side`` is ``"left"`` or ``"right"``."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, cols] = torch.tensor(row, dtype=torch.long)
            mask[i, cols] = 1
        return Batch(ids.to(self.device), mask.to(self.device), start)

    def _batches(self, rows: list[list[int]], batch_size: int, side: str, progress: bool, desc: str) -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        starts = range(0, len(rows), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")
        return (self.pad(rows[s : s + batch_size], side, s) for s in starts)

    def _all_interventions(self, interventions: Sequence[Intervention]) -> list[Intervention]:
        chosen = [*self._active_interventions(), *interventions]
        for iv in chosen:
            self.check_layer(iv.layer)
            if iv.vector is not None and iv.vector.shape[-1] != self.d_model:
                raise ValueError(
                    f"intervention vector has size {iv.vector.shape[-1]} but the model's d_model is {self.d_model}"
                )
            if isinstance(iv.positions, Tensor):
                raise ValueError(
                    "a backend pads its own batches, so give intervention positions as a tuple of ints, "
                    "not a (B, T) mask (masks are for hand-built nnsight traces)"
                )
            if iv.fn is not None and not self.supports_functions:
                raise ValueError(
                    f"the {self.name} backend runs only additive (vector) interventions; "
                    "function edits such as SAE clamping need a local backend"
                )
        return chosen

    def _active_interventions(self) -> list[Intervention]:
        # Per instance, created lazily so subclasses need not call a base __init__.
        return self.__dict__.setdefault("_active", [])

    @contextlib.contextmanager
    def intervening(self, interventions: Sequence[Intervention]) -> Iterator[Backend]:
        """Apply ``interventions`` to every capture and generation inside the ``with`` block."""
        active = self._active_interventions()
        n = len(active)
        active.extend(interventions)
        try:
            yield self
        finally:
            del active[n:]

    def residuals(
        self,
        prompts: Prompts,
        layers: Sequence[int],
        *,
        last_token: bool = False,
        batch_size: int = 8,
        interventions: Sequence[Intervention] = (),
        progress: bool = False,
    ) -> Iterator[ResidualBatch]:
        """Stream residuals at ``layers`` batch by batch (right-padded; see :class:`ResidualBatch`).

        ``last_token=True`` keeps only each prompt's last real token (``(B, D)`` per layer).
        Streaming keeps memory at one batch, whatever the number of prompts. Arguments are
        checked here, before the first batch is requested.
        """
        layers = [self.check_layer(n) for n in layers]
        chosen = self._all_interventions(interventions)
        batches = self._batches(self.encode(prompts), batch_size, "right", progress, "residuals")
        return self._stream(batches, layers, chosen, last_token)

    @torch.no_grad()
    def _stream(self, batches, layers, chosen, last_token) -> Iterator[ResidualBatch]:
        for batch in batches:
            hidden = self._capture(batch, layers, chosen)
            if last_token:
                rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
                hidden = {n: h[rows, batch.last_index] for n, h in hidden.items()}
            yield ResidualBatch(batch, hidden, last_token)

    @torch.no_grad()
    def generate(
        self,
        prompts: Prompts,
        *,
        max_new_tokens: int,
        interventions: Sequence[Intervention] = (),
        sampling: Sampling = Sampling(),
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[Generation]:
        """Generate for every prompt (left-padded batches), with ``interventions`` applied."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        chosen = self._all_interventions(interventions)
        rows = self.encode(prompts)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out: list[Generation] = []
        for batch in self._batches(rows, batch_size, "left", progress, "generate"):
            new = self._generate(batch, chosen, max_new_tokens, sampling).tolist()
            for i, ids in enumerate(new):
                ids = self._trim(ids[:max_new_tokens])
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                out.append(Generation(rows[batch.start + i], ids, text))
        return out

    # ---- logits and loss -------------------------------------------------------------------
    def logits(self, hidden: Tensor) -> Tensor:
        """Logits ``(..., vocab)`` from residuals ``(..., d_model)``: the model's final norm, then its unembedding.

        On the last layer's output these are the model's own logits; on any other layer's output
        they are the logit lens. Gradients flow (wrap the call in ``torch.no_grad()`` when reading).
        """
        if hidden.shape[-1] != self.d_model:
            raise ValueError(f"residual has size {hidden.shape[-1]} but the model's d_model is {self.d_model}")
        return self._unembed(hidden)

    def token_losses(
        self,
        prompts: Prompts,
        *,
        layers: Sequence[int] = (),
        interventions: Sequence[Intervention] = (),
        batch_size: int = 8,
        progress: bool = False,
    ) -> Iterator[tuple[ResidualBatch, Tensor]]:
        """Stream next-token cross-entropy batch by batch, with ``interventions`` applied.

        Yields ``(residuals, ce)`` per right-padded batch: ``ce`` ``(B, T - 1)``, float32, holds
        ``-log p(token t + 1 | tokens 0..t)`` of each row at column ``t`` (counted where
        :meth:`loss_mask` is true); ``residuals`` holds the last layer and ``layers``, read in the
        same forward pass. An intervention ``fn`` that replaces a layer's output splices e.g. an SAE
        reconstruction into the model (SAELens's "CE loss with the SAE").
        """
        last = self.n_layers - 1
        wanted = sorted({*(self.check_layer(n) for n in layers), last})
        for rb in self.residuals(prompts, wanted, batch_size=batch_size, interventions=interventions,
                                 progress=progress):
            with torch.no_grad():
                logits = self.logits(rb.hidden[last])
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2),
                                                       rb.batch.input_ids[:, 1:], reduction="none")
            yield rb, ce

    def loss(
        self,
        prompts: Prompts,
        *,
        interventions: Sequence[Intervention] = (),
        skip_first_token: bool = False,
        batch_size: int = 8,
        progress: bool = False,
    ) -> float:
        """Mean next-token cross-entropy over the real tokens of ``prompts`` (see :meth:`token_losses`).

        ``skip_first_token`` leaves out each text's first prediction (the token after the first).
        NaN when no prediction is counted (every text is one token long).
        """
        total, count = 0.0, 0
        for rb, ce in self.token_losses(prompts, interventions=interventions, batch_size=batch_size,
                                        progress=progress):
            keep = self.loss_mask(rb.batch, skip_first_token)
            total += ce[keep].sum().item()
            count += int(keep.sum())
        return total / count if count else float("nan")

    @staticmethod
    def loss_mask(batch: Batch, skip_first_token: bool = False) -> Tensor:
        """``(B, T - 1)`` bool: the predictions of :meth:`token_losses` that count (real targets;
        with ``skip_first_token`` not each row's first). Right padding: a real target's source is real."""
        keep = batch.attention_mask[:, 1:].bool()
        if skip_first_token:
            keep = keep.clone()
            keep[:, 0] = False
        return keep

    def watch(self, layer: int, fn: Callable[[Tensor], None]) -> Callable[[], None]:
        """Call ``fn(hidden)`` with layer ``layer``'s output ``(B, T, D)`` in every forward of the model.

        Unlike :meth:`residuals` this sees the forward passes others run on the model (a
        ``Trainer``'s), with gradients kept: the way to read a layer for a training loss. Returns a
        function that removes the hook. ``fn``'s return value is ignored (it must not edit).
        """
        return self._watch(self.check_layer(layer), fn)

    def _trim(self, ids: list[int]) -> list[int]:
        """Cut at the first EOS (kept): what follows is padding from the batch's longer rows."""
        eos = self.eos_token_ids
        for i, t in enumerate(ids):
            if t in eos:
                return ids[: i + 1]
        return ids
