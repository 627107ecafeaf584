"""Everything that runs inside an nnsight trace, locally or on NDIF. Imports torch and stdlib only.

Why a separate module: an NDIF server can import only what it has installed (torch,
transformers, nnsight, ...; not sae_lens, not transformer_lens, not this package). This module is
registered with ``nnsight.register`` (see :mod:`qscope_plugins.integrations.nnsight`), so its
source travels with each remote request and is rebuilt there; it must therefore never import
anything else from ``qscope_plugins``.

It is also the package's one model of two things every framework shares, so that a layer edit
and a layer path are written once:

* :class:`Intervention` (alias :data:`Steering`) and :func:`edit`, the one apply function: prompt
  position masks (negative positions, left / right padding), prefill vs generated tokens, vector
  vs function edits. The local backends' hooks (:mod:`qscope_plugins.backends.editing`) and the
  trace functions here (:func:`apply`, :func:`generate_steered`) all call it.
* :func:`layout` (:class:`Layout`): where the decoder layers, the final norm and the unembedding
  of a model sit, checked against its config; :func:`check_layer` is the one layer check
  (:class:`LayerRangeError`).

What travels is small on purpose. Requests carry an :class:`Intervention` (one ``d_model`` vector,
the sum of the chosen decoder columns) and :class:`EncoderRows` (the encoder rows of a declared
feature subset), never a full SAE: a W128K layer is about 2 GiB in fp32 and would ride along with
every request. Top-k codes need every encoder row, so they are computed locally, on residuals
downloaded from a remote trace (or inside a local trace, see :func:`encode`).

Functions taking ``model`` accept an nnsight model (``TransformersModel`` / ``LanguageModel``)
inside a trace; :func:`layout`, :func:`layer_module`, :func:`decoder_layers`, :func:`final_norm`
and :func:`unembedding` also accept a plain HF model.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

# Where decoder layers live, relative to the causal LM: Qwen3 / Qwen3-MoE / Qwen3.5 text models,
# the published Qwen3.5 multimodal layout (`Qwen3_5ForConditionalGeneration`), then a bare
# multimodal or text base model. The final norm sits next to the layers (``<stack>.norm``) and the
# unembedding on the causal LM itself (:data:`UNEMBED_PATH`).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.layers",
    "layers",
)
UNEMBED_PATH = "lm_head"


class LayoutError(ValueError):
    """The decoder layers of a model could not be found, or do not match its config."""


class LayerRangeError(ValueError):
    """A layer index names no decoder layer of the model."""


def check_layer(layer: int, n_layers: int, path: str | None = None) -> int:
    """``layer`` as an int if it names one of ``n_layers`` decoder layers, else a :class:`LayerRangeError`.

    The one layer check of the package (backends, nnsight specs, remote traces); ``path`` (where
    the layers sit, when known) makes the message say where and which SAE file fits.
    """
    try:
        index = operator.index(layer)
    except TypeError:
        index = -1
    if isinstance(layer, bool) or not 0 <= index < n_layers:
        if path is None:
            raise LayerRangeError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
        raise LayerRangeError(
            f"layer {layer!r} is out of range: this model has decoder layers 0..{n_layers - 1} "
            f"(at {path}); Qwen-Scope file layer{{n}}.sae.pt reads the output of layer n, "
            f"so pick an SAE and a layer in that range"
        )
    return index


@dataclass(frozen=True)
class Layout:
    """Where a model keeps its decoder layers, how many there are and the residual width.

    The decoder stack (embeddings, layers, final norm) is the module holding the layers
    (:attr:`stack`); its final norm is :attr:`norm_path`, the unembedding :data:`UNEMBED_PATH`.
    """

    path: str
    n_layers: int
    d_model: int

    @property
    def stack(self) -> str:
        """Path of the decoder stack that holds the layers (``""``: the model itself)."""
        return self.path.rpartition(".")[0]

    @property
    def norm_path(self) -> str:
        """Path of the final norm (applied after the last layer, before the unembedding)."""
        return f"{self.stack}.norm" if self.stack else "norm"

    def check_layer(self, layer: int) -> int:
        """``layer`` as an int if it names a decoder layer, else a :class:`LayerRangeError`."""
        return check_layer(layer, self.n_layers, self.path)

    def check_vector(self, vector: Tensor, what: str) -> None:
        if vector.shape[-1] != self.d_model:
            raise LayoutError(
                f"{what} has width {vector.shape[-1]} but this model's residual stream has d_model "
                f"{self.d_model}: the SAE was trained on another backbone; use one made for this model"
            )


@dataclass(frozen=True)
class Intervention:
    """An edit of decoder layer ``layer``'s output ``h``: ``h + vector``, or ``fn(h)``.

    The one model of an edit, for every backend and for nnsight traces, local or remote
    (:data:`Steering` is the same class). Exactly one of ``vector`` and ``fn`` is set:

    * ``vector`` (``(d_model,)``): additive, plain tensor arithmetic, so it also runs on NDIF.
    * ``fn``: any map ``(..., d_model) -> (..., d_model)`` (e.g. an SAE clamp); it needs the model
      in this process, so only local backends and local traces take it.

    ``positions`` selects prompt tokens on the prompt's forward pass (prefill): ``None`` every real
    token, ``()`` none, a tuple of positions, or a ``(B, T)`` bool mask used as given. Positions
    count from each row's first real token and negative ones back from its last (``-1`` = last
    prompt token), so left and right padding select the same tokens; pads are never edited.
    ``generated`` edits every generated token too (the Qwen-Scope demo's default).
    """

    layer: int
    vector: Tensor | None = None
    fn: Callable[[Tensor], Tensor] | None = None
    positions: tuple[int, ...] | Tensor | None = None
    generated: bool = True

    def __post_init__(self) -> None:
        if (self.vector is None) == (self.fn is None):
            raise ValueError("an Intervention needs exactly one of `vector` and `fn`")
        if self.vector is not None and self.vector.ndim != 1:
            raise ValueError(f"intervention vector must be 1-D (d_model,), got shape {tuple(self.vector.shape)}")
        if self.positions is not None and not isinstance(self.positions, Tensor):
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    @property
    def remote_safe(self) -> bool:
        """True when the edit is plain tensor arithmetic (no Python callable to ship)."""
        return self.fn is None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Intervention:
        """The same intervention with its vector on ``device`` / ``dtype`` (done once per call)."""
        if self.vector is None:
            return self
        return replace(self, vector=self.vector.to(device, dtype))

    def applies(self, prompt: bool) -> bool:
        """Whether it edits the prompt's forward (``prompt=True``) or a generated token."""
        if prompt:
            return not (isinstance(self.positions, tuple) and len(self.positions) == 0)
        return self.generated

    def prompt_mask(self, attention_mask: Tensor | None = None, width: int | None = None) -> Tensor | None:
        """``(B, T)`` bool: which prompt tokens to edit (pads never); ``None`` means "all of them".

        ``attention_mask`` (1 = real token) gives each row's real tokens, for left or right
        padding. Without it (a hand-built spec in a trace) the prompt is ``width`` real tokens,
        and a position outside it raises ``IndexError``; with it, a position outside a row's
        prompt edits nothing in that row (rows differ in length).
        """
        if isinstance(self.positions, Tensor):
            return self.positions.bool()
        if attention_mask is None:
            if width is None:
                raise ValueError("prompt_mask needs the attention mask or the prompt width")
            for p in self.positions or ():
                if not -width <= p < width:
                    raise IndexError(f"steering position {p} is outside the prompt (length {width})")
            real = torch.ones(1, width, dtype=torch.bool)
        else:
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
        where = None if mask is None else mask.to(hidden.device).unsqueeze(-1)
        if self.vector is not None:
            vector = self.vector.to(hidden.device, hidden.dtype)
            return hidden + vector if where is None else hidden + where.to(hidden.dtype) * vector
        edited = self.fn(hidden)
        return edited if where is None else torch.where(where, edited, hidden)


Steering = Intervention
"""The name nnsight users know; the same class as :class:`Intervention`."""


def prompt_masks(
    interventions: Sequence[Intervention], attention_mask: Tensor | None, width: int | None = None
) -> list[Tensor | None]:
    """Each intervention's prompt mask (see :meth:`Intervention.prompt_mask`), computed once per batch."""
    return [iv.prompt_mask(attention_mask, width) if iv.applies(True) else None for iv in interventions]


def edit(
    hidden: Tensor, interventions: Sequence[Intervention], masks: Sequence[Tensor | None], prompt: bool
) -> Tensor:
    """Apply ``interventions`` to one layer's output: the prompt's forward (``prompt=True``, at
    their ``masks``) or one generated token (only those with ``generated=True``, everywhere).

    The one apply function: the local backends' hooks and nnsight traces, local or remote, call it.
    """
    for iv, mask in zip(interventions, masks):
        if iv.applies(prompt):
            hidden = iv.apply(hidden, mask if prompt else None)
    return hidden


@dataclass(frozen=True)
class EncoderRows:
    """Encoder rows of a declared feature subset: pre-activations of ``ids`` at ``layer``."""

    layer: int
    ids: Tensor
    """Feature ids, ``(F,)``."""
    weight: Tensor
    """Encoder rows, ``(F, d_model)``."""
    bias: Tensor
    """``(F,)``."""


def walk(obj: Any, path: str) -> Any:
    """``obj.a.b.c`` for ``path="a.b.c"`` (``obj`` itself for ``""``), or ``None`` where a step is missing."""
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def layout(model: Any) -> Layout:
    """Find the decoder layers of ``model`` and check them against its (text) config.

    A candidate must be a ``ModuleList`` holding exactly ``num_hidden_layers`` entries, so a
    vision tower's block list is never taken for the text layers.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise LayoutError(
            f"{type(model).__name__} has no `config`: wrap the HF causal LM itself "
            "(nnsight.modeling.transformers.TransformersModel or LanguageModel), not a submodule"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers, d_model = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    found = []
    for path in LAYER_PATHS:
        layers = walk(model, path)
        module = getattr(layers, "_module", layers)  # an nnsight Envoy wraps the real module
        if isinstance(module, torch.nn.ModuleList):
            if len(module) == n_layers and d_model:
                return Layout(path, int(n_layers), int(d_model))
            found.append(f"{path} ({len(module)} modules)")
    detail = f"found {', '.join(found)}, but" if found else "found none of them;"
    raise LayoutError(
        f"cannot find the decoder layers of {type(getattr(model, '_module', model)).__name__}: tried "
        f"{', '.join(LAYER_PATHS)}; {detail} the config declares num_hidden_layers={n_layers}. "
        "Load the checkpoint as a causal LM (AutoModelForCausalLM, or TransformersModel/LanguageModel "
        "on the repo id) so its text layers sit at one of these paths"
    )


def decoder_layers(model: Any, where: Layout | None = None) -> Any:
    """The decoder-layer ``ModuleList`` of ``model`` (an nnsight Envoy inside a trace)."""
    where = where or layout(model)
    return walk(model, where.path)


def decoder_stack(model: Any, where: Layout | None = None) -> Any:
    """The module holding the decoder layers, their embedding and the final norm."""
    where = where or layout(model)
    return walk(model, where.stack)


def _part(model: Any, path: str, what: str) -> Any:
    found = walk(model, path)
    if found is None:
        raise LayoutError(f"{type(getattr(model, '_module', model)).__name__} has no {what} at `{path}`")
    return found


def final_norm(model: Any, where: Layout | None = None) -> Any:
    """The final norm, applied to the last layer's output before the unembedding."""
    return _part(model, (where or layout(model)).norm_path, "final norm")


def unembedding(model: Any) -> Any:
    """The unembedding (``lm_head``) of a causal LM: residual after the final norm -> logits."""
    return _part(model, UNEMBED_PATH, "unembedding (a base model, not a causal LM?)")


def layer_module(model: Any, layer: int, where: Layout | None = None) -> Any:
    """The module (an nnsight Envoy inside a trace) of decoder layer ``layer``."""
    where = where or layout(model)
    return decoder_layers(model, where)[where.check_layer(layer)]


def _hidden(output: Any) -> Tensor:
    # transformers 5 decoder layers return the hidden states; older versions a tuple led by them.
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def residual(model: Any, layer: int) -> Tensor:
    """Residual stream after decoder layer ``layer``, ``(B, T, d_model)`` (``blocks.{n}.hook_resid_post``)."""
    return _hidden(layer_module(model, layer).output)


def residuals(model: Any, layers: Sequence[int]) -> dict[int, Tensor]:
    """Residuals at several layers, read in forward order (nnsight requires it); ``{layer: (B, T, D)}``."""
    return apply(model, (), read=layers)


def apply(
    model: Any,
    interventions: Sequence[Intervention],
    *,
    read: Sequence[int] = (),
    prompt: bool = True,
    attention_mask: Tensor | None = None,
) -> dict[int, Tensor]:
    """One forward pass: apply each intervention to its layer, then read ``read`` layers (after the edits).

    ``prompt=True`` is the prompt's forward (``positions`` apply, counted in the real tokens of
    ``attention_mask`` when given, else in the columns of the prompt); ``False`` is a generated
    step, where only interventions with ``generated=True`` apply, to the new token. Layers are
    visited in forward order and each module's output is touched once, as nnsight requires.
    """
    where = layout(model)
    reads = {where.check_layer(n) for n in read}
    by_layer: dict[int, list[Intervention]] = {}
    for iv in interventions:
        if iv.applies(prompt):
            by_layer.setdefault(where.check_layer(iv.layer), []).append(iv)
    out: dict[int, Tensor] = {}
    for n in sorted(reads | by_layer.keys()):
        module = layer_module(model, n, where)
        output = module.output
        hidden = _hidden(output)
        if n in by_layer:
            edits = by_layer[n]
            masks = prompt_masks(edits, attention_mask, hidden.shape[-2]) if prompt else [None] * len(edits)
            hidden = edit(hidden, edits, masks, prompt)
            module.output = _with_hidden(output, hidden)
        if n in reads:
            out[n] = hidden
    return out


def generate_steered(
    model: Any,
    tracer: Any,
    interventions: Sequence[Intervention],
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
) -> None:
    """Apply ``interventions`` to a whole ``model.generate(...)``: the prompt's forward, then each step.

    Call it inside ``with tracer.invoke(prompt):`` and read ``tracer.result`` in a separate
    ``with tracer.invoke():``. Pass the invoke's ``attention_mask`` for a padded batch. When
    generation stops early (EOS), the loop's remaining steps are never reached and nnsight skips
    whatever follows them in the same invoke.
    """
    for step in tracer.iter[:max_new_tokens]:
        apply(model, interventions, prompt=step == 0, attention_mask=attention_mask)


def pre_activations(model: Any, rows: EncoderRows) -> Tensor:
    """``W_enc x + b_enc`` of the declared features only, ``(B, T, F)``: no Top-k (that needs every row)."""
    hidden = residual(model, rows.layer)
    return hidden.to(rows.weight.dtype) @ rows.weight.to(hidden.device).T + rows.bias.to(hidden.device)


def encode(model: Any, layer: int, sae: Any) -> Any:
    """Top-k codes of layer ``layer`` with a full SAE, inside a *local* trace.

    Uses ``sae.encode_sparse`` (``TopKCodes``) when the SAE has it, else SAELens ``sae.encode``.
    A remote trace refuses to carry the SAE: save :func:`residual` and encode after download.
    """
    hidden = residual(model, layer)
    fn = getattr(sae, "encode_sparse", None) or sae.encode
    return fn(hidden.to(sae.W_dec.dtype))


def splice(model: Any, layer: int, sae: Any, edit: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Replace layer ``layer``'s output by the SAE reconstruction of edited codes, error term kept.

    Output = ``decode(edit(z)) + (h - decode(z))`` with ``z = sae.encode(h)`` (dense codes), so
    with no edit the model runs unchanged and only the edit's effect passes downstream. Returns
    the unedited codes ``z``. Local traces only: it needs the whole SAE.
    """
    module = layer_module(model, layer)
    output = module.output
    hidden = _hidden(output)
    x = hidden.to(sae.W_dec.dtype)
    codes = sae.encode(x)
    edited = codes if edit is None else edit(codes.clone())
    spliced = sae.decode(edited) + (x - sae.decode(codes))
    module.output = _with_hidden(output, spliced.to(hidden.dtype))
    return codes
