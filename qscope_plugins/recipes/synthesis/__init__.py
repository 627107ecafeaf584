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

Modules: :mod:`.contexts` (top-activating contexts, explanations), :mod:`.generators` (requests and
generators), :mod:`.store` (the JSONL output and its state), :mod:`.loop` (:func:`synthesize`,
:func:`random_synthesis`).
"""

from .contexts import EXPLAIN_TEMPLATE, Context, explain, top_contexts
from .generators import (
    PROMPT_TEMPLATE, RESPONSE_TEMPLATES, REWRITE_STYLES, REWRITE_TEMPLATE, UNEXPLAINED, Candidate, ContextPrompter,
    Generators, LLMPrompter, LLMResponder, Prompter, Request, Responder, Rewriter, llm_rewriters, name_of,
    plan_requests,
)
from .loop import DEFAULT_TOPICS, SynthesisResult, priority_targets, random_synthesis, synthesize
from .store import FORMAT, VERSION, SynthesisStore, derive_seed, read_synthetic, text_id

__all__ = [
    "DEFAULT_TOPICS", "EXPLAIN_TEMPLATE", "FORMAT", "PROMPT_TEMPLATE", "RESPONSE_TEMPLATES", "REWRITE_STYLES",
    "REWRITE_TEMPLATE", "UNEXPLAINED", "VERSION", "Candidate", "Context", "ContextPrompter", "Generators",
    "LLMPrompter", "LLMResponder", "Prompter", "Request", "Responder", "Rewriter", "SynthesisResult",
    "SynthesisStore", "derive_seed", "explain", "llm_rewriters", "name_of", "plan_requests", "priority_targets",
    "random_synthesis", "read_synthetic", "synthesize", "text_id", "top_contexts",
]
