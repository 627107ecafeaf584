"""Miniature of the report's toxicity classifier: an OR rule over a few SAE features.

Documents of both languages, half toxic. Each document's max activation per feature (first token
skipped) is pooled once per layer; features are ranked by the difference of firing frequencies
between toxic and clean documents, and the layer and the number of features K are chosen on the
selection split only. F1 is then measured on the held-out split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..backends import Backend
from ..recipes.capture import pooled_codes
from ..recipes.classifier import FeatureClassifier, fit
from ..recipes.classifier_eval import Evaluation, evaluate
from .corpus import Document

KS = (1, 2, 5, 10)  # the report's K values


@dataclass(frozen=True)
class ToxicityResult:
    classifier: FeatureClassifier
    select_f1: dict[str, float]  # "layer/K" -> F1 on the selection split
    held_out: Evaluation


def _split(acts, docs: Sequence[Document]):
    toxic = np.array([d.toxic for d in docs])
    return acts[np.flatnonzero(toxic)], acts[np.flatnonzero(~toxic)]


def toxicity_classifier(backend: Backend, saes: Mapping[int, object], select: Sequence[Document],
                        held_out: Sequence[Document], *, batch_size: int = 64) -> ToxicityResult:
    """Fit on ``select`` (choosing layer and K there), evaluate on ``held_out``."""
    run = dict(mode="max", batch_size=batch_size)
    acts_select = pooled_codes(backend, saes, [d.text for d in select], **run)
    acts_held = pooled_codes(backend, saes, [d.text for d in held_out], **run)
    scores: dict[str, float] = {}
    best: tuple[float, FeatureClassifier] | None = None
    for n in sorted(saes):
        pos, neg = _split(acts_select[n], select)
        for k in KS:
            clf = fit(pos, neg, top_k=k, layer=n)
            f1 = evaluate(clf, pos, neg, n_boot=0).f1
            scores[f"{n}/{k}"] = f1
            if best is None or f1 > best[0]:
                best = (f1, clf)
    clf = best[1]
    layer = clf.layers[0]
    return ToxicityResult(clf, scores, evaluate(clf, *_split(acts_held[layer], held_out)))
