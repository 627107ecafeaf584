"""Everything that runs inside an nnsight trace, locally or on NDIF. Imports torch and stdlib only.

Why a separate module: an NDIF server can import only what it has installed (torch,
transformers, nnsight, ...; not sae_lens, not transformer_lens, not this package). This module is
registered with ``nnsight.register`` (see :mod:`qscope_plugins.integrations.nnsight`), so its
source travels with each remote request and is rebuilt there; it must therefore never import
anything else from ``qscope_plugins``.

What travels is small on purpose. Requests carry :class:`Steering` (one ``d_model`` vector, the
sum of the chosen decoder columns) and :class:`EncoderRows` (the encoder rows of a declared
feature subset), never a full SAE: a W128K layer is about 2 GiB in fp32 and would ride along with
every request. Top-k codes need every encoder row, so they are computed locally, on residuals
downloaded from a remote trace (or inside a local trace, see :func:`encode`).

Functions taking ``model`` accept an nnsight model (``TransformersModel`` / ``LanguageModel``)
inside a trace; :func:`layout` and :func:`layer_module` also accept a plain HF model.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Where decoder layers live, relative to the causal LM: Qwen3 / Qwen3-MoE / Qwen3.5 text models,
# the published Qwen3.5 multimodal layout (`Qwen3_5ForConditionalGeneration`), then a bare
# multimodal or text base model.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.layers",
    "layers",
)


class LayoutError(ValueError):
    """The decoder layers of a model could not be found, or do not match its config."""


class LayerRangeError(ValueError):
    """A layer index names no decoder layer of the model."""


@dataclass(frozen=True)
class Layout:
    """Where a model keeps its decoder layers, how many there are and the residual width."""

    path: str
    n_layers: int
    d_model: int

    def check_layer(self, layer: int) -> int:
        """``layer`` as an int if it names a decoder layer, else a :class:`LayerRangeError`."""
        try:
            index = operator.index(layer)
        except TypeError:
            index = -1
        if isinstance(layer, bool) or not 0 <= index < self.n_layers:
            raise LayerRangeError(
                f"layer {layer!r} is out of range: this model has decoder layers 0..{self.n_layers - 1} "
                f"(at {self.path}); Qwen-Scope file layer{{n}}.sae.pt reads the output of layer n, "
                f"so pick an SAE and a layer in that range"
            )
        return index

    def check_vector(self, vector: Tensor, what: str) -> None:
        if vector.shape[-1] != self.d_model:
            raise LayoutError(
                f"{what} has width {vector.shape[-1]} but this model's residual stream has d_model "
                f"{self.d_model}: the SAE was trained on another backbone; use one made for this model"
            )


@dataclass(frozen=True)
class Steering:
    """Edit the output ``h`` of decoder layer ``layer``: ``h + vector``, or ``fn(h)``.

    ``positions`` selects prompt tokens on the prompt's forward pass: ``None`` every token,
    ``()`` none, a tuple of column indices (negative ones count from the end), or a ``(B, T)``
    bool mask (what a padded batch needs). ``generated`` edits every generated token too.
    ``fn`` (any ``(..., d_model) -> (..., d_model)`` map, e.g. an SAE clamp) runs only in local
    traces; a remote request carries ``vector`` only.
    """

    layer: int
    vector: Tensor | None = None
    positions: tuple[int, ...] | Tensor | None = None
    generated: bool = True
    fn: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if (self.vector is None) == (self.fn is None):
            raise ValueError("a Steering needs exactly one of `vector` and `fn`")


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
    """``obj.a.b.c`` for ``path="a.b.c"``, or ``None`` where a step is missing."""
    for part in path.split("."):
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


def layer_module(model: Any, layer: int, where: Layout | None = None) -> Any:
    """The module (an nnsight Envoy inside a trace) of decoder layer ``layer``."""
    where = where or layout(model)
    return walk(model, where.path)[where.check_layer(layer)]


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


def _mask(positions: tuple[int, ...] | Tensor, hidden: Tensor) -> Tensor:
    """``(B, T, 1)`` (or ``(1, T, 1)``) float mask of the selected prompt positions."""
    if isinstance(positions, Tensor):
        return positions.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
    width = hidden.shape[-2]
    mask = torch.zeros(width, dtype=torch.bool, device=hidden.device)
    for p in positions:
        if not -width <= p < width:
            raise IndexError(f"steering position {p} is outside the prompt (length {width})")
        mask[p] = True
    return mask.view(1, width, 1).to(hidden.dtype)


def _steer(hidden: Tensor, steering: Steering, prompt: bool) -> Tensor:
    where = None if not prompt or steering.positions is None else _mask(steering.positions, hidden)
    if steering.fn is not None:
        edited = steering.fn(hidden)
        return edited if where is None else torch.where(where.bool(), edited, hidden)
    vector = steering.vector.to(hidden.device, hidden.dtype)
    return hidden + vector if where is None else hidden + where * vector


def _applies(steering: Steering, prompt: bool) -> bool:
    if prompt:
        return not (isinstance(steering.positions, tuple) and len(steering.positions) == 0)
    return steering.generated


def apply(
    model: Any, steerings: Sequence[Steering], *, read: Sequence[int] = (), prompt: bool = True
) -> dict[int, Tensor]:
    """One forward pass: add each steering to its layer, then read ``read`` layers (after the edits).

    ``prompt=True`` is the prompt's forward (``positions`` apply); ``False`` is a generated step,
    where only steerings with ``generated=True`` apply, to the new token. Layers are visited in
    forward order and each module's output is touched once, as nnsight requires.
    """
    where = layout(model)
    reads = {where.check_layer(n) for n in read}
    by_layer: dict[int, list[Steering]] = {}
    for s in steerings:
        if _applies(s, prompt):
            by_layer.setdefault(where.check_layer(s.layer), []).append(s)
    out: dict[int, Tensor] = {}
    for n in sorted(reads | by_layer.keys()):
        module = layer_module(model, n, where)
        output = module.output
        hidden = _hidden(output)
        if n in by_layer:
            for s in by_layer[n]:
                hidden = _steer(hidden, s, prompt)
            module.output = _with_hidden(output, hidden)
        if n in reads:
            out[n] = hidden
    return out


def generate_steered(model: Any, tracer: Any, steerings: Sequence[Steering], max_new_tokens: int) -> None:
    """Steer a whole ``model.generate(...)``: the prompt's forward, then each generated step.

    Call it inside ``with tracer.invoke(prompt):`` and read ``tracer.result`` in a separate
    ``with tracer.invoke():``. When generation stops early (EOS), the loop's remaining steps are
    never reached and nnsight skips whatever follows them in the same invoke.
    """
    for step in tracer.iter[:max_new_tokens]:
        apply(model, steerings, prompt=step == 0)


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
