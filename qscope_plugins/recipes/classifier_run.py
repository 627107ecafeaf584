"""Running SAE-feature classifiers on a model: discovery from texts, ``apply``, and a generation monitor.

Model plumbing only; the math is in :mod:`qscope_plugins.recipes.classifier`. Every layer's features
come from one forward pass per batch, and texts are pooled into sparse example-level max activations
as they stream by (never a texts x tokens x d_sae tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..backends import Backend, Intervention, Sampling
from ..distributed import SINGLE, World
from .capture import pooled_batches, pooled_codes, sae_widths, tokenize
from .classifier import FeatureClassifier
from .pooling import pool_codes


def example_activations(
    backend: Backend,
    saes: Mapping[int, object],
    texts: Sequence[str],
    *,
    skip_first_token: bool = True,
    batch_size: int = 8,
    progress: bool = False,
    world: World = SINGLE,
) -> dict[int, sp.csr_array]:
    """``{layer: texts x d_sae}`` max activation of each feature over each text's tokens (Eq. 13's input).

    With a data-parallel ``world`` (:mod:`qscope_plugins.distributed`) each rank encodes its share of the
    batches (the same rows per forward pass as one process) and every rank gets the whole, identical result.
    """
    options = dict(mode="max", skip_first_token=skip_first_token, batch_size=batch_size)
    if not world.parallel:
        return pooled_codes(backend, saes, texts, progress=progress, **options)
    rows = tokenize(backend, texts)
    starts = list(range(0, len(rows), batch_size))
    error, mine = None, {}
    try:
        for start in world.share(starts):
            mine[start] = next(pooled_batches(backend, saes, rows[start : start + batch_size], **options))
    except Exception as err:
        error = err
    world.all_ok(error)
    parts = {start: pooled for shard in world.gather(mine) for start, pooled in shard.items()}
    return {layer: sp.vstack([parts[s][layer] for s in starts], format="csr") for layer in saes}


def _saes_for(backend: Backend, classifier: FeatureClassifier, saes: Mapping[int, object]) -> dict[int, object]:
    if None in classifier.layers:
        raise ValueError("this classifier was fit without a layer; refit it with layer= to run it on a model")
    missing = sorted(set(classifier.layers) - set(saes))
    if missing:
        raise ValueError(f"no SAE given for the classifier's layers {missing}")
    chosen = {layer: saes[layer] for layer in set(classifier.layers)}
    widths = sae_widths(backend, chosen)
    if any(w != classifier.d_sae for w in widths.values()):
        raise ValueError(f"SAE widths {widths} do not match the classifier's d_sae={classifier.d_sae}")
    return chosen


@dataclass(frozen=True)
class Applied:
    """A classifier's output on texts."""

    scores: np.ndarray
    predictions: np.ndarray


def apply(
    backend: Backend,
    classifier: FeatureClassifier,
    saes: Mapping[int, object],
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> Applied:
    """Score and flag each text with ``classifier`` (its features read by ``saes[layer]``)."""
    acts = example_activations(
        backend,
        _saes_for(backend, classifier, saes),
        texts,
        skip_first_token=classifier.skip_first_token,
        batch_size=batch_size,
        progress=progress,
    )
    return Applied(classifier.score(acts), classifier.predict(acts))


@dataclass(frozen=True)
class MonitorResult:
    """One monitored generation."""

    prompt: str
    text: str
    prompt_flagged: bool
    generation_flagged: bool
    first_flagged_token: int | None
    """Index (among the generated tokens) of the first token after which the classifier flags the text."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Recorder:
    """An identity edit that encodes each decode step's new token and keeps its pooled codes."""

    def __init__(self, sae, d_sae: int) -> None:
        self.sae, self.d_sae, self.steps = sae, d_sae, []

    def __call__(self, hidden):
        codes = self.sae.encode_sparse(hidden[:, -1])
        self.steps.append(pool_codes(codes.values, codes.indices, self.d_sae))
        return hidden


def monitor(
    backend: Backend,
    classifier: FeatureClassifier,
    saes: Mapping[int, object],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
) -> list[MonitorResult]:
    """Generate for each prompt while the classifier watches every generated token.

    The SAE codes of each new token are taken inside the decode step (an identity edit at the
    classifier's layers), so a flag is known as soon as the token is produced; the running max over the
    generated tokens is what the classifier scores. The last generated token is never fed back through
    the model, so it is not seen. Needs a backend that runs Python functions next to the model.
    """
    chosen = _saes_for(backend, classifier, saes)
    flags = apply(backend, classifier, chosen, prompts, batch_size=batch_size).predictions
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        recorders = {layer: _Recorder(sae, classifier.d_sae) for layer, sae in chosen.items()}
        edits = [Intervention(layer, fn=rec, positions=(), generated=True) for layer, rec in recorders.items()]
        generations = backend.generate(
            chunk, max_new_tokens=max_new_tokens, interventions=edits, sampling=sampling, batch_size=len(chunk)
        )
        running = {layer: sp.csr_array((len(chunk), classifier.d_sae), dtype=np.float32) for layer in recorders}
        first: list[int | None] = [None] * len(chunk)
        lengths = [len(g.token_ids) for g in generations]
        for step in range(len(next(iter(recorders.values())).steps)):
            for layer, rec in recorders.items():
                running[layer] = running[layer].maximum(rec.steps[step]).tocsr()
            flagged = classifier.predict(running)
            for row in np.flatnonzero(flagged):
                if first[row] is None and step < lengths[row]:
                    first[row] = step
        for i, generation in enumerate(generations):
            results.append(MonitorResult(chunk[i], generation.text, bool(flags[start + i]), first[i] is not None, first[i]))
    return results
