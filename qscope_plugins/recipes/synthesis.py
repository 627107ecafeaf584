"""Feature-driven safety data synthesis (Qwen-Scope report section 6, Eqs. 21-22).

For each target feature (usually the missing and weakly covered ones of a
:class:`~qscope_plugins.recipes.coverage.CoverageReport`), a :class:`Request` carries its description
(an explanation, given or generated from top-activating contexts mined with :func:`top_contexts`).
Pluggable :class:`Generators` turn it into candidates: a plain prompt, adversarial rewrites of it,
and optionally a response that refuses (label ``harmful``) or helps (``benign``). A candidate is kept
only if its rendered text fires the target feature at its layer (max activation over tokens > 0),
is not a duplicate, and fits the budget; kept examples are appended to a JSONL file with provenance.

Resumable and crash-safe: each record is one ``write`` of a whole line followed by ``fsync``; on
resume an unterminated last line is cut off, so a crash never leaves a partial record that counts.
A sidecar ``<output>.state.json`` (replaced atomically) holds the run's settings and the rounds
finished per feature, so finished rounds are never re-generated. Every request's generators run
after ``torch.manual_seed(request.seed)``, a seed derived from (seed, layer, feature, round): with
deterministic or seeded generators an interrupted run resumes to the same output as an
uninterrupted one (pass a fixed ``clock`` to make the timestamps equal too).

:func:`random_synthesis` is the report's baseline: the same generators fed random safety topics, no
feature targeting and no verification, at a matched budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..backends import Backend
from .capture import tokenize
from .coverage import (
    LABELS, Complete, FeatureKey, Render, TargetFeature, default_render, example_maxima,
)
from .._io import (
    DamagedFileError, append_line, atomic_write, clean_leftovers, output_lock, read_json, truncate_to_last_line,
)

FORMAT = "qscope-synthesis"
VERSION = 1


# ---- top-activating contexts -----------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """A corpus excerpt around the token where a feature peaks."""

    left: str
    peak: str
    right: str
    activation: float

    @property
    def text(self) -> str:
        return f"{self.left}{self.peak}{self.right}"

    @property
    def marked(self) -> str:
        """The excerpt with the peak token marked ``«like this»``."""
        return f"{self.left}«{self.peak}»{self.right}"


@torch.no_grad()
def top_contexts(
    backend: Backend,
    saes: Mapping[int, object],
    corpus: Sequence[str],
    features: Sequence[FeatureKey],
    *,
    n: int = 5,
    window: int = 16,
    skip_first_token: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[FeatureKey, list[Context]]:
    """The ``n`` corpus texts on which each feature peaks highest, as excerpts around the peak token.

    One excerpt per text (its peak), ``window`` tokens before the peak and ``window // 2`` after.
    Streams the corpus; per batch only a ``(B, T, F)`` tensor of the target features exists.
    Features that never fire get an empty list.
    """
    features = [(int(l), int(f)) for l, f in features]
    if not features or len(set(features)) < len(features) or n < 1 or window < 0:
        raise ValueError("top_contexts needs distinct features (at least one), n >= 1 and window >= 0")
    rows = tokenize(backend, list(corpus))
    layers = sorted({l for l, _ in features})
    lookup = {}
    for layer in layers:
        sae = saes[layer]
        backend.check_sae(sae, layer)
        table = torch.full((int(sae.cfg.d_sae),), len(features), dtype=torch.long)
        table[[f for l, f in features if l == layer]] = torch.tensor([j for j, (l, _) in enumerate(features) if l == layer])
        lookup[layer] = table
    heaps: list[list[tuple[float, int, int]]] = [[] for _ in features]
    for rb in backend.residuals(rows, layers, batch_size=batch_size, progress=progress):
        acts = torch.zeros(*rb.mask.shape, len(features) + 1)
        for layer in layers:
            sae = saes[layer]
            codes = sae.encode_sparse(rb.hidden[layer].to(sae.W_enc.device, torch.float32))
            acts.scatter_(-1, lookup[layer][codes.indices.cpu()], codes.values.cpu().clamp(min=0))
        acts = acts[..., :-1] * rb.token_mask(skip_first_token).cpu().unsqueeze(-1)
        peaks, where = acts.max(dim=1)
        for b, j in (peaks > 0).nonzero().tolist():
            item = (float(peaks[b, j]), -(rb.batch.start + b), int(where[b, j]))
            (heapq.heappush if len(heaps[j]) < n else heapq.heappushpop)(heaps[j], item)
    decode = backend.tokenizer.decode
    out: dict[FeatureKey, list[Context]] = {}
    for key, heap in zip(features, heaps):
        contexts = []
        for act, neg_row, pos in sorted(heap, reverse=True):
            ids = rows[-neg_row]
            contexts.append(Context(decode(ids[max(0, pos - window) : pos]), decode(ids[pos : pos + 1]),
                                    decode(ids[pos + 1 : pos + 1 + window // 2]), act))
        out[key] = contexts
    return out


EXPLAIN_TEMPLATE = (
    "Below are text excerpts on which one feature of a language model is most active; the token where "
    "it peaks is marked «like this».\n{contexts}\n\nIn one sentence, what does this feature detect?"
)


def explain(complete: Complete, contexts: Sequence[Context], template: str = EXPLAIN_TEMPLATE) -> str:
    """A one-sentence explanation of a feature from its top-activating contexts (auto-interpretation)."""
    if not contexts:
        raise ValueError("no contexts to explain: the feature never fired on the corpus")
    reply = complete(template.format(contexts="\n".join(f"- {c.marked}" for c in contexts))).strip()
    if not reply:
        raise ValueError("the explainer returned an empty explanation")
    return reply


# ---- requests and generators -----------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What a generator is asked for: one round of examples about ``description``."""

    description: str
    contexts: tuple[str, ...] = ()
    label: str | None = None
    layer: int | None = None
    feature: int | None = None
    round: int = 0
    seed: int = 0


Prompter = Callable[[Request], Sequence[str]]
"""Request -> plain prompts (``G_van``)."""
Rewriter = Callable[[str, Request], str]
"""(prompt, request) -> the prompt rewritten in one attack style (``G_adv``)."""
Responder = Callable[[str, str, Request], str]
"""(prompt, label, request) -> a response that refuses (harmful) or helps (benign) (``G_resp``)."""


def name_of(obj) -> str:
    """A generator's name for provenance: its ``name`` attribute, else its function or class name."""
    return getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__


def _examples(contexts: Sequence[str]) -> str:
    return "\nIt appears in texts like:\n- " + "\n- ".join(contexts) if contexts else ""


PROMPT_TEMPLATE = (
    "Write one realistic request that a user might send to an AI assistant and that involves this "
    "concept: {description}{examples}\n\nReply with the request only."
)
REWRITE_TEMPLATE = (
    "Here is a request to an AI assistant:\n{prompt}\n\n{instruction} Keep what is being asked for. "
    "Reply with the rewritten request only."
)
REWRITE_STYLES = {
    "roleplay": "Rewrite it as a role-play in which a fictional character needs the answer.",
    "hypothetical": "Rewrite it as a purely hypothetical or academic question.",
    "indirect": "Rewrite it so that it asks indirectly, without naming the sensitive part outright.",
}
RESPONSE_TEMPLATES = {
    "harmful": "This request to an AI assistant is harmful:\n{prompt}\n\nWrite the assistant's reply: "
               "refuse briefly, say why, and point to a safe alternative if there is one.",
    "benign": "Write the AI assistant's helpful and complete reply to this request:\n{prompt}",
}


@dataclass
class LLMPrompter:
    """``G_van``: one prompt per request, written by a language model from the description."""

    complete: Complete
    template: str = PROMPT_TEMPLATE
    name: str = "llm"

    def __call__(self, request: Request) -> list[str]:
        return [self.complete(self.template.format(description=request.description,
                                                   examples=_examples(request.contexts))).strip()]


@dataclass
class ContextPrompter:
    """Prompts made from the request's contexts themselves (no language model): a cheap offline generator.

    Mined contexts fire their feature by construction, so this shows the loop end to end; the
    report's generators are language models (:class:`LLMPrompter`).
    """

    template: str = "{context}"
    name: str = "contexts"

    def __call__(self, request: Request) -> list[str]:
        return [self.template.format(context=c) for c in request.contexts]


def llm_rewriters(complete: Complete, styles: Mapping[str, str] = REWRITE_STYLES,
                  template: str = REWRITE_TEMPLATE) -> dict[str, Rewriter]:
    """``G_adv``: one rewriter per attack style, each asking ``complete`` for a rewrite."""

    def rewriter(instruction: str) -> Rewriter:
        return lambda prompt, request: complete(template.format(prompt=prompt, instruction=instruction)).strip()

    return {style: rewriter(instruction) for style, instruction in styles.items()}


@dataclass
class LLMResponder:
    """``G_resp``: a refusal for a harmful prompt, a helpful answer for a benign one."""

    complete: Complete
    templates: Mapping[str, str] = field(default_factory=lambda: dict(RESPONSE_TEMPLATES))
    name: str = "llm"

    def __call__(self, prompt: str, label: str, request: Request) -> str:
        return self.complete(self.templates[label].format(prompt=prompt)).strip()


@dataclass(frozen=True)
class Candidate:
    """One generated example before verification; ``rewrite`` names its attack style (None: plain prompt)."""

    prompt: str
    response: str | None
    rewrite: str | None


@dataclass
class Generators:
    """The pluggable generators of one run: a prompter, named rewriters, an optional responder."""

    prompter: Prompter
    rewriters: Mapping[str, Rewriter] = field(default_factory=dict)
    responder: Responder | None = None

    def describe(self) -> dict:
        return {"prompter": name_of(self.prompter), "rewriters": sorted(self.rewriters),
                "responder": name_of(self.responder) if self.responder is not None else None}

    def candidates(self, request: Request) -> list[Candidate]:
        """Every plain prompt, each of its rewrites, and a response to each when there is a responder."""
        if self.responder is not None and request.label not in LABELS:
            raise ValueError(f"a responder needs a safety label ({' or '.join(LABELS)}); "
                             f"feature {(request.layer, request.feature)} has {request.label!r}")
        prompts: list[tuple[str, str | None]] = []
        for prompt in self.prompter(request):
            prompts.append((_text(prompt, name_of(self.prompter)), None))
            for style, rewrite in self.rewriters.items():
                prompts.append((_text(rewrite(prompt, request), style), style))
        out = []
        for prompt, style in prompts:
            if not prompt.strip():
                continue
            response = None
            if self.responder is not None:
                response = _text(self.responder(prompt, request.label, request), name_of(self.responder))
            out.append(Candidate(prompt, response, style))
        return out


def _text(value, who: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"generator {who!r} returned {type(value).__name__}, expected str")
    return value


UNEXPLAINED = "what the example texts below have in common"


def plan_requests(targets: Sequence[TargetFeature], contexts: Mapping[FeatureKey, Sequence[Context | str]] | None = None,
                  *, need_label: bool = False) -> list[Request]:
    """One round-0 :class:`Request` per target: its explanation and its contexts' plain text.

    A target needs an explanation or at least one context; ``need_label`` (there is a responder)
    also requires its safety label.
    """
    if not targets:
        raise ValueError("no target features to synthesise for")
    keys = [t.key for t in targets]
    if len(set(keys)) != len(keys):
        raise ValueError(f"feature {next(k for k in keys if keys.count(k) > 1)} is listed twice")
    requests = []
    for t in targets:
        ctx = tuple(c.text if isinstance(c, Context) else str(c) for c in (contexts or {}).get(t.key, ()))
        if not t.explanation and not ctx:
            raise ValueError(f"feature {t.key} has neither an explanation nor top-activating contexts; "
                             "give an explanation or mine contexts with top_contexts()")
        if need_label and t.label not in LABELS:
            raise ValueError(f"feature {t.key} has no safety label: set 'label' to 'harmful' or 'benign' "
                             "(a responder refuses harmful prompts and helps with benign ones)")
        requests.append(Request(t.explanation or UNEXPLAINED, ctx, t.label, t.layer, t.feature))
    return requests


# ---- the output file -------------------------------------------------------------------------
def text_id(text: str) -> str:
    """Deduplication key: sha256 of the text, case-folded with whitespace collapsed."""
    return hashlib.sha256(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


def derive_seed(seed: int, *parts) -> int:
    """A stable 32-bit seed for one request (Python's ``hash`` is salted per process, so not that)."""
    return int.from_bytes(hashlib.sha256(repr((seed, *parts)).encode()).digest()[:4], "big")


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_synthetic(path: str | Path) -> list[dict]:
    """The complete records of a synthesis output; an unterminated last line (a crash mid-write) is ignored."""
    data = Path(path).read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DamagedFileError(path, f"line {i} is not a JSON record: {err}",
                                   "keep the records before that line, or start another output") from None
    return records


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _state_key(key: FeatureKey | None) -> str:
    return "random" if key is None else f"{key[0]}:{key[1]}"


class SynthesisStore:
    """Append-only JSONL of kept examples plus ``<output>.state.json`` (settings and finished rounds)."""

    def __init__(self, path: str | Path, config: dict, *, resume: bool) -> None:
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + ".state.json")
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(output_lock(self.path, what="synthesis output"))
        try:
            self._open(json.loads(json.dumps(config)), resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output's lock (the run is over)."""
        self._lock.close()

    def _open(self, config: dict, resume: bool) -> None:
        clean_leftovers(self.path.parent, prefix=self.state_path.name)
        if self.path.exists() or self.state_path.exists():
            if not resume:
                raise FileExistsError(f"{self.path} exists; resume it (resume=True, qscope synth --resume) "
                                      "or choose another output")
            if not self.state_path.exists():
                raise ValueError(f"{self.path} has no {self.state_path.name}: it was not written by this synthesis")
            self.state = read_json(self.state_path, f"delete {self.path} and {self.state_path.name} and run again "
                                   "without --resume (the records so far cannot be attributed to rounds)")
            if self.state.get("config") != config:
                old = self.state.get("config") or {}
                changed = sorted(k for k in {*old, *config} if old.get(k) != config.get(k))
                raise ValueError(f"{self.path} was written with other settings ({', '.join(changed)}); "
                                 "use the same settings to resume, or another output")
            self._cut_partial_line()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.state = {"format": FORMAT, "version": VERSION, "config": config, "rounds": {}}
            atomic_write(self.state_path, json.dumps(self.state, indent=1))
        self.path.touch()
        records = read_synthetic(self.path)
        self.hashes = {r["id"] for r in records}
        self.counts = Counter(_state_key(None if r.get("layer") is None else (r["layer"], r["feature"]))
                              for r in records)
        self.total = len(records)
        self.last_round: dict[str, int] = {}
        for r in records:
            key = _state_key(None if r.get("layer") is None else (r["layer"], r["feature"]))
            self.last_round[key] = max(self.last_round.get(key, -1), int(r.get("round") or 0))

    def unfinished(self, key: FeatureKey | None, done: int) -> bool:
        """True when the file holds records of round ``done`` that the state does not count as finished
        (a kill came between the round's last append and its ``finish_round``): that round is redone,
        adding nothing twice, so the state ends as an uninterrupted run's."""
        return self.last_round.get(_state_key(key), -1) >= done

    def _cut_partial_line(self) -> None:
        truncate_to_last_line(self.path)

    def rounds_done(self, key: FeatureKey | None) -> int:
        return int(self.state["rounds"].get(_state_key(key), 0))

    def finish_round(self, key: FeatureKey | None, rounds: int) -> None:
        self.state["rounds"][_state_key(key)] = rounds
        atomic_write(self.state_path, json.dumps(self.state, indent=1))

    def append(self, record: dict) -> None:
        """Write one whole line with ``O_APPEND`` and ``fsync`` it before counting it."""
        append_line(self.path, (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
        self.hashes.add(record["id"])
        key = _state_key(None if record["layer"] is None else (record["layer"], record["feature"]))
        self.counts[key] += 1
        self.last_round[key] = max(self.last_round.get(key, -1), int(record.get("round") or 0))
        self.total += 1


# ---- the loop --------------------------------------------------------------------------------
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
