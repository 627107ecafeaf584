"""Requests and the pluggable generators that turn one into candidates (``G_van``, ``G_adv``, ``G_resp``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..coverage import LABELS, Complete, FeatureKey, TargetFeature
from .contexts import Context

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
