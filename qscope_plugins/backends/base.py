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
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Prompts = Sequence[str] | Sequence[Sequence[int]]
"""Texts, or already tokenised prompts (lists of token ids)."""


@dataclass(frozen=True)
class Intervention:
    """An edit of decoder layer ``layer``'s residual output, at prompt positions and generated tokens.

    Exactly one of ``vector`` and ``fn`` is set:

    * ``vector`` (``(d_model,)``): additive, ``h <- h + vector``. Plain tensor arithmetic, so every
      backend supports it, remote nnsight included (``h + mask[..., None] * vector``).
    * ``fn``: any map ``(..., d_model) -> (..., d_model)`` applied to the hidden states, e.g. an
      SAE clamp. Needs the model in this process, so only local backends accept it
      (:attr:`Backend.supports_functions`).

    ``positions=None`` edits every real prompt token, ``()`` none of them; ``generated`` says
    whether every generated token is edited too (the Qwen-Scope demo's default).
    """

    layer: int
    vector: Tensor | None = None
    fn: Callable[[Tensor], Tensor] | None = None
    positions: tuple[int, ...] | None = None
    generated: bool = True

    def __post_init__(self) -> None:
        if (self.vector is None) == (self.fn is None):
            raise ValueError("an Intervention needs exactly one of `vector` and `fn`")
        if self.vector is not None and self.vector.ndim != 1:
            raise ValueError(f"intervention vector must be 1-D (d_model,), got shape {tuple(self.vector.shape)}")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    @property
    def remote_safe(self) -> bool:
        """True when the edit is plain tensor arithmetic (no Python callable to ship)."""
        return self.fn is None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Intervention:
        """The same intervention with its vector on ``device`` / ``dtype`` (done once per call)."""
        if self.vector is None:
            return self
        return Intervention(self.layer, self.vector.to(device, dtype), None, self.positions, self.generated)

    def prompt_mask(self, attention_mask: Tensor) -> Tensor | None:
        """``(B, T)`` bool: which prompt positions to edit (pads never); ``None`` means "all of them".

        Works for left and right padding, since positions are counted from each row's real tokens.
        """
        real = attention_mask.bool()
        if self.positions is None:
            return None if bool(real.all()) else real
        index = real.long().cumsum(-1) - 1  # position among the row's real tokens
        length = real.sum(-1, keepdim=True)
        wanted = torch.zeros_like(real)
        for p in self.positions:
            wanted |= index == (p if p >= 0 else length + p)
        return wanted & real

    def apply(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        """Edit ``hidden`` ``(B, T, D)`` where ``mask`` ``(B, T)`` is true (everywhere if ``None``)."""
        if self.vector is not None:
            if mask is None:
                return hidden + self.vector
            return hidden + mask.unsqueeze(-1).to(hidden.dtype) * self.vector
        edited = self.fn(hidden)
        if mask is None:
            return edited
        return torch.where(mask.unsqueeze(-1), edited, hidden)


class Editor:
    """Applies interventions to one layer's output across a prefill call and the decode steps.

    Backends create one per ``(batch, layer)``: the first call is the prompt (prefill) and every
    later call is one generated token, which is how KV-cached generation calls a layer.
    """

    def __init__(self, interventions: Sequence[Intervention], attention_mask: Tensor | None) -> None:
        self.interventions = list(interventions)
        self.masks = [
            iv.prompt_mask(attention_mask) if attention_mask is not None else None for iv in self.interventions
        ]
        self.calls = 0

    def __call__(self, hidden: Tensor) -> Tensor:
        prefill = self.calls == 0
        self.calls += 1
        for iv, mask in zip(self.interventions, self.masks):
            if prefill:
                if iv.positions != ():
                    hidden = iv.apply(hidden, mask)
            elif iv.generated:
                hidden = iv.apply(hidden)
        return hidden


def editors_by_layer(
    interventions: Sequence[Intervention], attention_mask: Tensor, device: torch.device, dtype: torch.dtype
) -> dict[int, Editor]:
    """One :class:`Editor` per edited layer, its vectors moved to the model's device and dtype once."""
    grouped: dict[int, list[Intervention]] = {}
    for iv in interventions:
        grouped.setdefault(iv.layer, []).append(iv.to(device, dtype))
    return {n: Editor(ivs, attention_mask) for n, ivs in grouped.items()}


class StopForward(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by a capture hook once the deepest captured layer has run: the rest of the forward
    pass cannot change what was captured, so a backend that catches it skips those layers."""


def layer_functions(
    editors: dict[int, Editor], capture: Sequence[int], captured: dict[int, Tensor], *, stop: bool = False
) -> dict[int, Callable[[Tensor], Tensor]]:
    """For every layer to hook: apply its editor (if any), then store the output in ``captured``
    (if asked), so a capture sees the edited residual. Backends wrap these in their own hooks.

    ``stop=True``: the hook of the deepest captured layer raises :class:`StopForward` after
    storing its output (edits of deeper layers are then never needed, so they are not hooked).
    """
    last = max(capture) if stop and capture else None

    def make(n: int) -> Callable[[Tensor], Tensor]:
        def fn(hidden: Tensor) -> Tensor:
            if n in editors:
                hidden = editors[n](hidden)
            if n in capture:
                captured[n] = hidden
            if n == last:
                raise StopForward
            return hidden

        return fn

    return {n: make(n) for n in {*capture, *editors} if last is None or n <= last}


@dataclass(frozen=True)
class Batch:
    """Token ids of one padded batch and its attention mask (1 = real token)."""

    input_ids: Tensor
    attention_mask: Tensor
    start: int = 0
    """Index of this batch's first row among all inputs of the call."""

    @property
    def lengths(self) -> Tensor:
        return self.attention_mask.sum(-1)

    @property
    def last_index(self) -> Tensor:
        """``(B,)`` column of each row's last real token, for left or right padding."""
        cols = torch.arange(self.attention_mask.shape[-1], device=self.attention_mask.device)
        return torch.where(self.attention_mask.bool(), cols, -1).max(-1).values


@dataclass
class ResidualBatch:
    """Residuals of one batch: ``hidden[layer]`` is ``(B, T, D)``, or ``(B, D)`` when ``last_token``."""

    batch: Batch
    hidden: dict[int, Tensor]
    last_token: bool = False

    @property
    def mask(self) -> Tensor:
        """``(B, T)`` bool, true at real tokens (right padding: pads are at the end)."""
        return self.batch.attention_mask.bool()

    def token_mask(self, skip_first: bool = False) -> Tensor:
        """The real-token mask, optionally without each row's first token (its norm is extreme)."""
        mask = self.mask
        if skip_first:
            mask = mask.clone()
            mask[:, 0] = False
        return mask

    def tokens(self, layer: int, skip_first: bool = False) -> Tensor:
        """``(N_real, D)`` residuals of the real tokens only: the input of every token statistic."""
        if self.last_token:
            return self.hidden[layer]
        return self.hidden[layer][self.token_mask(skip_first)]


@dataclass
class Generation:
    """One prompt's generation: ids of the prompt and of the new tokens only (EOS kept, pads dropped)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text}


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; the default is greedy, which every backend reproduces exactly."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


def sae_backbone(sae) -> str | None:
    """The backbone id an SAE (``QwenScopeSAE`` or ``FeatureSubset``) was trained on, when recorded."""
    from ..catalog import find_group

    cfg = getattr(sae, "cfg", None)
    name = getattr(getattr(cfg, "metadata", None), "model_name", None)
    if name:
        return name
    group = find_group((getattr(sae, "metadata", None) or {}).get("qwen_scope_group") or "")
    return group.model if group else None


def _backbone_key(name: str) -> str:
    """``"Qwen/Qwen3-1.7B-Base"``, ``"/models/qwen3-1.7b"`` -> ``"qwen3-1.7b"``: hub id or path, base or not."""
    key = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in ("-base", "-instruct"):
        key = key.removesuffix(suffix)
    return key


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
        """``layer`` if it names a decoder layer of this model, else a ``ValueError`` saying the range."""
        if not 0 <= int(layer) < self.n_layers:
            raise ValueError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}")
        return int(layer)

    def check_sae(self, sae, layer: int | None = None) -> int:
        """Check that ``sae`` (a ``QwenScopeSAE`` or ``FeatureSubset``) fits this model at ``layer``.

        Returns the layer (default: the SAE's own). Raises ``ValueError`` when the layer is out of
        range or the widths differ; warns when the SAE was trained on another backbone or layer,
        since its features then mean little here (a base-model SAE on the same model's
        post-trained checkpoint is fine, as the Qwen-Scope cards say).
        """
        own_layer = getattr(sae, "layer", None)
        if layer is None:
            if own_layer is None:
                raise ValueError("this SAE does not record its layer; pass layer=")
            layer = own_layer
        layer = self.check_layer(layer)
        d_in = sae.d_in
        if d_in != self.d_model:
            raise ValueError(f"SAE d_model {d_in} does not match the model's d_model {self.d_model}")
        if own_layer is not None and own_layer != layer:
            warnings.warn(f"SAE was trained on layer {own_layer} but is used at layer {layer}", stacklevel=2)
        trained_on = sae_backbone(sae)
        if trained_on and self.model_name and _backbone_key(trained_on) != _backbone_key(self.model_name):
            warnings.warn(
                f"SAE was trained on {trained_on} but the model is {self.model_name}; its features may not transfer",
                stacklevel=2,
            )
        return layer

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

    def _trim(self, ids: list[int]) -> list[int]:
        """Cut at the first EOS (kept): what follows is padding from the batch's longer rows."""
        eos = self.eos_token_ids
        for i, t in enumerate(ids):
            if t in eos:
                return ids[: i + 1]
        return ids
