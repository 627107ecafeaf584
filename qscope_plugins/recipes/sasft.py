"""SASFT: supervised fine-tuning with an SAE pre-activation penalty against unexpected code-switching.

Qwen-Scope report section 7 (Eqs. 26-27), after Deng et al.'s SASFT. For a language L (say Chinese)
with selected features ``S_L`` at some layers, training examples written in another language j get

    L_reduce = sum_{layers} sum_{t: labels_t != -100} sum_{s in S_L} ReLU(pre_s(h_t) - alpha_{s,j})
               / (n_valid_tokens * |S_L| + 1)

added as ``L = L_CE + lambda * L_reduce``. ``pre_s(h) = W_enc[s] . h + b_enc[s]`` is the raw
pre-activation (no Top-k, no ReLU) of the residual ``h`` output by the decoder layer, and
``alpha_{s,j}`` is its mean over language-j text (first token excluded), which may be negative: the
penalty only pushes the feature back to what is normal for the example's own language. Examples in
L itself are not penalised. The normalisation (all response tokens of the batch, target-language
examples included, times the number of features, plus one) is the official implementation's.

Only the selected features' encoder rows are needed: a ``FeatureSubset`` (``load_feature_subset(...,
features)``) is enough, or the full SAE. :class:`SASFTLoss` reads the decoder layers of the
model being trained through :meth:`Backend.watch <qscope_plugins.backends.Backend.watch>`; :class:`SASFTTrainer` (or :class:`SASFTMixin` over e.g. TRL's ``SFTTrainer``)
adds it in ``compute_loss``. :func:`estimate_alpha` computes the per-language means through any
:class:`~qscope_plugins.backends.Backend`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..backends import Backend, as_backend
from .capture import tokenize
from .._io import write_json

IGNORE_INDEX = -100


def feature_encoder(sae, features: Sequence[int] | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """``(W (F, d_model), b (F,), ids)``: the float32 encoder rows and biases of ``features``.

    ``sae`` is a ``QwenScopeSAE`` (``features`` required) or a ``FeatureSubset`` (default: all of its
    features).
    """
    if not sae.complete:  # a FeatureSubset: only its loaded features have encoder rows
        loaded = [int(i) for i in sae.ids.tolist()]
        ids = loaded if features is None else [int(f) for f in features]
        absent = [f for f in ids if f not in loaded]
        if absent:
            raise ValueError(f"feature {absent[0]} is not in this feature subset (loaded: {loaded})")
    elif features is None:
        raise ValueError("name the features to penalise (a full SAE has d_sae of them)")
    else:
        ids = [int(f) for f in features]
        bad = [f for f in ids if not 0 <= f < sae.d_sae]
        if bad:
            raise ValueError(f"feature {bad[0]} out of range [0, {sae.d_sae})")
    weight, bias = sae.encoder_rows(ids)
    return weight.float(), bias.float(), ids


@dataclass
class LanguageBaselines:
    """``alpha[layer][j, i]``: mean pre-activation of feature ``features[layer][i]`` on language ``languages[j]``."""

    languages: tuple[str, ...]
    features: dict[int, tuple[int, ...]]
    alpha: dict[int, Tensor]

    def index(self, language: str) -> int:
        """The row of ``language``: what a dataset's language column should hold for :class:`SASFTLoss`."""
        if language not in self.languages:
            raise ValueError(f"no baseline for language {language!r}; known: {', '.join(self.languages)}")
        return self.languages.index(language)

    def to_dict(self) -> dict:
        return {"languages": list(self.languages),
                "layers": {str(n): {"features": list(self.features[n]), "alpha": self.alpha[n].tolist()}
                           for n in sorted(self.features)}}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LanguageBaselines:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        layers = {int(n): v for n, v in data["layers"].items()}
        out = cls(tuple(data["languages"]), {n: tuple(v["features"]) for n, v in layers.items()},
                  {n: torch.tensor(v["alpha"], dtype=torch.float32) for n, v in layers.items()})
        for n, alpha in out.alpha.items():
            if tuple(alpha.shape) != (len(out.languages), len(out.features[n])):
                raise ValueError(f"{path}: layer {n} alpha has shape {tuple(alpha.shape)}, expected "
                                 f"({len(out.languages)}, {len(out.features[n])})")
        return out


@torch.no_grad()
def estimate_alpha(
    backend: Backend,
    encoders: Mapping[int, object],
    texts_by_language: Mapping[str, Sequence[str]],
    *,
    features: Mapping[int, Sequence[int]] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> LanguageBaselines:
    """Mean pre-activation of each selected feature per language, over every token but each text's first.

    ``encoders``: ``{layer: FeatureSubset or QwenScopeSAE}``; ``features``: ``{layer: ids}`` (needed
    for full SAEs). Streams: only running sums of size ``F`` per layer are kept.
    """
    if not texts_by_language:
        raise ValueError("no languages given")
    layers = sorted(int(n) for n in encoders)
    rows = {n: feature_encoder(encoders[n], (features or {}).get(n)) for n in layers}
    alpha = {n: torch.zeros(len(texts_by_language), len(rows[n][2]), dtype=torch.float64) for n in layers}
    for j, (language, texts) in enumerate(texts_by_language.items()):
        count = 0
        for rb in backend.residuals(tokenize(backend, list(texts)), layers, batch_size=batch_size, progress=progress):
            mask = rb.token_mask(skip_first=True)
            count += int(mask.sum())
            for n in layers:
                W, b, _ = rows[n]
                pre = rb.hidden[n][mask].to(W.device, torch.float32) @ W.T + b
                alpha[n][j] += pre.sum(0).double().cpu()
        if count == 0:
            raise ValueError(f"language {language!r} has no tokens once each text's first token is dropped")
        for n in layers:
            alpha[n][j] /= count
    return LanguageBaselines(tuple(texts_by_language), {n: tuple(rows[n][2]) for n in layers},
                             {n: a.float() for n, a in alpha.items()})


def sasft_penalty(hidden: Tensor, labels: Tensor, penalised: Tensor, alpha: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """One layer's ``L_reduce``: pure math on its residuals ``hidden`` ``(B, T, d)``.

    ``labels`` ``(B, T)`` mark response tokens (``!= -100``), ``penalised`` ``(B,)`` the examples not
    in the target language, ``alpha`` ``(B, F)`` each example's language baseline, ``W``/``b`` the
    features' encoder rows ``(F, d)`` / ``(F,)``.
    """
    valid = labels != IGNORE_INDEX
    pre = hidden.float() @ W.T + b
    excess = torch.relu(pre - alpha.unsqueeze(1)) * (valid & penalised.unsqueeze(1)).unsqueeze(-1)
    return excess.sum() / (valid.sum() * W.shape[0] + 1)


class SASFTLoss(nn.Module):
    """``lambda * L_reduce`` from hooked decoder-layer outputs of the model being trained.

    ``target_language`` is L: the language whose features are suppressed, and whose own examples
    are not penalised. Use ``with loss.attach(model): ...`` (or :meth:`attach` / :meth:`detach`),
    run the model's forward, then call ``loss(labels, languages)`` with each example's language
    (names, or row indices of ``baselines.languages``).
    """

    def __init__(self, encoders: Mapping[int, object], baselines: LanguageBaselines, *, target_language: str,
                 weight: float) -> None:
        super().__init__()
        self.target = baselines.index(target_language)
        self.languages = baselines.languages
        self.weight = float(weight)
        self.layers = sorted(baselines.features)
        for n in self.layers:
            if n not in encoders:
                raise ValueError(f"no SAE features given for layer {n}")
            W, b, _ = feature_encoder(encoders[n], baselines.features[n])
            self.register_buffer(f"W_{n}", W.detach().clone())
            self.register_buffer(f"b_{n}", b.detach().clone())
            self.register_buffer(f"alpha_{n}", baselines.alpha[n].float().clone())
        self._captured: dict[int, Tensor] = {}
        self._removers: list = []

    def attach(self, model: nn.Module | Backend) -> SASFTLoss:
        """Watch the decoder layers (the SAE's hook point) of ``model`` (a model or its
        :class:`~qscope_plugins.backends.Backend`) in its every forward; move the buffers to its device."""
        self.detach()
        training = model.training if isinstance(model, nn.Module) else None
        backend = as_backend(model)
        if training is not None:  # wrapping it sets eval mode; a model being trained stays in training mode
            model.train(training)
        for n in self.layers:
            if not 0 <= n < backend.n_layers:
                raise ValueError(f"layer {n} is out of range: the model has layers 0..{backend.n_layers - 1}")
            self._removers.append(backend.watch(n, self._capture(n)))
        self.to(backend.device)
        return self

    def _capture(self, n: int):
        def store(hidden: Tensor) -> None:
            self._captured[n] = hidden

        return store

    def detach(self) -> None:
        for remove in self._removers:
            remove()
        self._removers.clear()
        self._captured.clear()

    def __enter__(self) -> SASFTLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def language_rows(self, languages: Tensor | Sequence) -> Tensor:
        """``(B,)`` row indices from language names or indices, validated."""
        rows = languages.reshape(-1).tolist() if isinstance(languages, Tensor) else list(languages)
        for x in rows:
            if isinstance(x, str) and x not in self.languages:
                raise ValueError(f"unknown language {x!r}; known: {', '.join(self.languages)}")
            if not isinstance(x, str) and not 0 <= int(x) < len(self.languages):
                raise ValueError(f"language index {x} out of range: the baselines know {len(self.languages)} languages")
        return torch.tensor([self.languages.index(x) if isinstance(x, str) else int(x) for x in rows], dtype=torch.long)

    def forward(self, labels: Tensor, languages: Tensor | Sequence) -> Tensor:
        """``weight * sum over layers of L_reduce`` for the forward pass just run (then forgotten)."""
        if set(self._captured) != set(self.layers):
            raise RuntimeError("no layer outputs captured: attach() the loss to the model and run its forward first")
        rows = self.language_rows(languages)
        if labels.ndim != 2 or rows.shape[0] != labels.shape[0]:
            raise ValueError(f"labels must be (batch, tokens) with one language per example; got labels "
                             f"{tuple(labels.shape)} and {rows.shape[0]} languages")
        total = labels.new_zeros((), dtype=torch.float32)
        for n in self.layers:
            hidden = self._captured[n]
            if hidden.shape[:2] != labels.shape:
                raise ValueError(f"layer {n} output {tuple(hidden.shape[:2])} does not match labels {tuple(labels.shape)}")
            # each layer on its own device (a model split over GPUs); the buffers are tiny
            W, b, alpha = (getattr(self, f"{name}_{n}").to(hidden.device) for name in ("W", "b", "alpha"))
            here = rows.to(hidden.device)
            penalty = sasft_penalty(hidden, labels.to(hidden.device), here != self.target, alpha[here], W, b)
            total = total + penalty.to(total.device)
        self._captured.clear()
        return self.weight * total


class SASFTMixin:
    """``compute_loss`` = the usual loss + :class:`SASFTLoss`; mix into ``Trainer`` or TRL's ``SFTTrainer``.

    Each batch needs ``labels`` and a language column (``language_key``, default ``"lang"``, ints from
    :meth:`LanguageBaselines.index`), so set ``remove_unused_columns=False``. The column is taken out
    before the model sees the batch. The penalty is normalised per micro-batch as in the official code;
    when transformers already normalised the CE over the whole accumulated batch (and so will not divide
    by the accumulation steps), the penalty is divided by them, so its weight per optimizer step does
    not depend on gradient accumulation.
    """

    def __init__(self, *args, sasft: SASFTLoss, language_key: str = "lang", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sasft = sasft.attach(self.model)
        self.language_key = language_key

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if self.language_key not in inputs or "labels" not in inputs:
            raise ValueError(f"SASFT needs 'labels' and {self.language_key!r} in every batch; "
                             "keep the language column with remove_unused_columns=False")
        languages, labels = inputs.pop(self.language_key), inputs["labels"]
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        penalty = self.sasft(labels, languages)
        if model.training and self._scaled_for_accumulation(num_items_in_batch):
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + penalty.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer will leave the loss undivided by the accumulation steps (its own rule)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)


class SASFTTrainer(SASFTMixin, Trainer):
    """``transformers.Trainer`` with the SASFT penalty: ``SASFTTrainer(model, args, ..., sasft=loss)``."""
