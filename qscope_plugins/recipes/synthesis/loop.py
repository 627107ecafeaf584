"""The synthesis loop: feature-targeted rounds verified by the target feature, and the random baseline."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ...backends import Backend
from ..coverage import LABELS, FeatureKey, Render, TargetFeature, default_render, example_maxima
from .contexts import Context
from .generators import Candidate, Generators, Request, plan_requests
from .store import FORMAT, VERSION, SynthesisStore, _digest, _state_key, _utc_now, derive_seed, text_id

@dataclass
class SynthesisResult:
    """What a (possibly resumed) run did; the JSONL at ``path`` holds ``total`` examples."""

    path: Path
    total: int
    added: int = 0
    generated: int = 0
    fired: int = 0
    per_feature: dict[FeatureKey, int] = field(default_factory=dict)
    unfilled: list[FeatureKey] = field(default_factory=list)
    """Targets whose rounds ran out before they got ``per_feature`` examples."""
    budget_reached: bool = False


@dataclass
class _Loop:
    store: SynthesisStore
    generators: Generators
    render: Render
    budget: int
    clock: Callable[[], str]
    exclude: set[str]
    result: SynthesisResult
    bar: object

    def run_round(self, request: Request, verify: Callable[[list[str]], np.ndarray] | None,
                  min_activation: float, quota: int) -> bool:
        """Generate, verify and keep one request's candidates; False when the budget cut it short."""
        torch.manual_seed(request.seed)
        unique: dict[str, tuple[Candidate, str]] = {}  # within-round duplicates dropped, first kept
        for cand in self.generators.candidates(request):
            text = self.render(cand.prompt, cand.response)
            unique.setdefault(text_id(text), (cand, text))
        self.result.generated += len(unique)
        texts = [text for _, text in unique.values()]
        acts = verify(texts) if verify is not None and texts else [None] * len(texts)
        key = None if request.layer is None else (request.layer, request.feature)
        names = self.generators.describe()
        for (uid, (cand, _)), act in zip(unique.items(), acts):
            if act is not None:
                if not act > min_activation:
                    continue
                self.result.fired += 1
            if uid in self.store.hashes or uid in self.exclude or self.store.counts[_state_key(key)] >= quota:
                continue
            if self.store.total >= self.budget:
                return False
            self.store.append({
                "id": uid, "prompt": cand.prompt, "response": cand.response, "label": request.label,
                "layer": request.layer, "feature": request.feature, "description": request.description,
                "generator": names["prompter"], "rewrite": cand.rewrite, "responder": names["responder"],
                "activation": None if act is None else float(act), "round": request.round, "time": self.clock(),
            })
            self.result.added += 1
            self.bar.update(1)
        return True


def _open_loop(output, config: dict, generators: Generators, *, budget: int, render: Render, exclude: Iterable[str],
               resume: bool, progress: bool, clock: Callable[[], str] | None) -> _Loop:
    from tqdm.auto import tqdm

    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    excluded = {text_id(t) for t in exclude}
    config = {"format": FORMAT, "version": VERSION, **config, "generators": generators.describe(),
              "exclude": _digest(sorted(excluded))}
    store = SynthesisStore(output, config, resume=resume)
    bar = tqdm(total=budget, initial=min(store.total, budget), unit="ex", desc="synthesis", disable=not progress)
    return _Loop(store, generators, render, budget, clock or _utc_now, excluded, SynthesisResult(store.path, store.total), bar)


def synthesize(
    backend: Backend,
    saes: Mapping[int, object],
    targets: Sequence[TargetFeature],
    output: str | Path,
    generators: Generators,
    *,
    budget: int,
    per_feature: int = 1,
    max_rounds: int = 3,
    contexts: Mapping[FeatureKey, Sequence[Context | str]] | None = None,
    render: Render = default_render,
    seed: int = 0,
    min_activation: float = 0.0,
    exclude: Iterable[str] = (),
    skip_first_token: bool = True,
    batch_size: int = 8,
    resume: bool = False,
    progress: bool = False,
    clock: Callable[[], str] | None = None,
) -> SynthesisResult:
    """Synthesise until every target has ``per_feature`` verified examples, its rounds run out, or the file holds ``budget``.

    Targets are served in the given order (put the missing ones first: see
    :func:`priority_targets`). A candidate is kept when its rendered text's max activation of the
    target at its layer is > ``min_activation``, its text is new (not in the file, not in
    ``exclude``, e.g. the seed set) and the budget allows. ``saes``: ``{layer: full SAE}``.
    """
    if per_feature < 1 or max_rounds < 1:
        raise ValueError("per_feature and max_rounds must be >= 1")
    requests = plan_requests(targets, contexts, need_label=generators.responder is not None)
    for layer in sorted({r.layer for r in requests}):
        if layer not in saes:
            raise ValueError(f"no SAE given for layer {layer}")
        backend.check_sae(saes[layer], layer)
    config = {"mode": "features", "per_feature": per_feature, "max_rounds": max_rounds, "seed": seed,
              "min_activation": min_activation, "skip_first_token": skip_first_token,
              "requests": _digest([[r.layer, r.feature, r.label, r.description, list(r.contexts)] for r in requests])}
    loop = _open_loop(output, config, generators, budget=budget, render=render, exclude=exclude,
                      resume=resume, progress=progress, clock=clock)
    store, result = loop.store, loop.result
    try:
        for request in requests:
            key = (request.layer, request.feature)

            def verify(texts: list[str], key=key) -> np.ndarray:
                blocks = example_maxima(backend, saes, texts, [key], skip_first_token=skip_first_token,
                                        batch_size=batch_size)
                return np.concatenate(list(blocks))[:, 0]

            done = store.rounds_done(key)
            while done < max_rounds and (store.counts[_state_key(key)] < per_feature and store.total < budget
                                         or store.unfinished(key, done)):
                this = replace(request, round=done, seed=derive_seed(seed, *key, done))
                if not loop.run_round(this, verify, min_activation, per_feature):
                    break
                done += 1
                store.finish_round(key, done)
            result.per_feature[key] = store.counts[_state_key(key)]
            if result.per_feature[key] < per_feature and done >= max_rounds:
                result.unfilled.append(key)
    finally:
        loop.bar.close()
        store.close()
    result.total, result.budget_reached = store.total, store.total >= budget
    return result


DEFAULT_TOPICS: tuple[tuple[str, str], ...] = (
    ("making weapons or explosives", "harmful"),
    ("hacking into someone else's accounts or devices", "harmful"),
    ("scams and financial fraud", "harmful"),
    ("harassing or threatening a person", "harmful"),
    ("self-harm", "harmful"),
    ("buying or making illegal drugs", "harmful"),
    ("spreading hateful content about a group", "harmful"),
    ("tracking someone's location without consent", "harmful"),
    ("how locks and home security systems work", "benign"),
    ("the history of chemical weapons treaties", "benign"),
    ("protecting yourself from online scams", "benign"),
    ("supporting a friend who is struggling emotionally", "benign"),
    ("the effects of drugs on the body, for a health class", "benign"),
    ("writing a crime novel's plot", "benign"),
)
"""Safety-related topics for the random baseline, with the label a response follows."""


def random_synthesis(
    output: str | Path,
    generators: Generators,
    *,
    budget: int,
    topics: Sequence[tuple[str, str]] = DEFAULT_TOPICS,
    contexts: Sequence[str] = (),
    max_rounds: int | None = None,
    render: Render = default_render,
    seed: int = 0,
    exclude: Iterable[str] = (),
    resume: bool = False,
    progress: bool = False,
    clock: Callable[[], str] | None = None,
) -> SynthesisResult:
    """The random-synthesis baseline: ``budget`` examples about random ``(topic, label)`` pairs, unverified.

    Each round draws a topic (and one of ``contexts``, when given, for context-based prompters)
    from a generator seeded by ``(seed, round)``, so it resumes like :func:`synthesize`.
    ``max_rounds`` (default ``10 * budget``) stops generators that only repeat themselves.
    """
    topics, pool = [(str(d), str(l)) for d, l in topics], list(contexts)
    if not topics:
        raise ValueError("no topics given")
    bad = [l for _, l in topics if l not in LABELS]
    if bad:
        raise ValueError(f"topic label {bad[0]!r} is not one of {', '.join(LABELS)}")
    max_rounds = 10 * budget if max_rounds is None else max_rounds
    # budget and max_rounds only say when to stop, so a resumed baseline may raise them
    config = {"mode": "random", "seed": seed, "topics": _digest(topics), "contexts": _digest(pool)}
    loop = _open_loop(output, config, generators, budget=budget, render=render, exclude=exclude,
                      resume=resume, progress=progress, clock=clock)
    store, result = loop.store, loop.result
    done = store.rounds_done(None)
    try:
        while done < max_rounds and (store.total < budget or store.unfinished(None, done)):
            rng = random.Random(derive_seed(seed, "random", done))
            description, label = rng.choice(topics)
            ctx = (rng.choice(pool),) if pool else ()
            request = Request(description, ctx, label, None, None, done, derive_seed(seed, "random", done))
            if not loop.run_round(request, None, 0.0, budget):
                break
            done += 1
            store.finish_round(None, done)
    finally:
        loop.bar.close()
        store.close()
    result.total, result.budget_reached = store.total, store.total >= budget
    return result


def priority_targets(report, targets: Sequence[TargetFeature], *, include_weak: bool = True) -> list[TargetFeature]:
    """The report's missing targets, then (``include_weak``) its weak ones: the order to synthesise in."""
    by_key = {t.key: t for t in targets}
    keys = report.missing + (report.weak if include_weak else [])
    absent = [k for k in keys if k not in by_key]
    if absent:
        raise ValueError(f"feature {absent[0]} of the report is not among the targets given")
    return [by_key[k] for k in keys]
