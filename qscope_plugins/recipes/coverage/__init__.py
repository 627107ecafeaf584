"""Per-feature coverage of a dataset for safety-relevant SAE features (Qwen-Scope report section 6).

An example *fires* feature f at layer l when its max SAE activation over tokens is > 0 (Eq. 13). A
dataset covers f when at least one example fires it (Eq. 18). A judge scores each feature's relevance
``s_f`` in [0, 1]; the targets are ``T = {(l, f) : s_f >= tau}`` (Eq. 19), the priority targets are
the ones no example fires (``T_miss``, Eq. 20), the weakly covered ones fire on fewer than
``min_support`` examples, and ``Cov(D) = |covered targets| / |T|`` (Eq. 23). The report gives neither
``tau`` nor the support threshold; the defaults here (0.5 and 3) are ours.

Layout: the pure math (:class:`Support`, :func:`coverage_report`) takes example x feature max
activations and knows nothing of models. The plumbing (:func:`example_maxima`,
:func:`collect_support`) streams texts through any :class:`~qscope_plugins.backends.Backend`, Top-k
encodes each batch sparsely and keeps only the target columns, so nothing of size
texts x tokens x d_sae ever exists. Judges are any callable ``TargetFeature -> float``: a JSON table of
scores (:class:`ScoreTable`, the default) or an LLM (:class:`LLMJudge` over a text-generation callable,
e.g. a transformers pipeline wrapped by :func:`pipeline_complete`).

Modules: :mod:`.targets` (keys, labels, the features schema), :mod:`.judges`, :mod:`.render` (example
texts), :mod:`.report` (the math), :mod:`.maxima` (the plumbing).
"""

from .judges import JUDGE_TEMPLATE, LLMJudge, ScoreTable, judge_features, parse_score, pipeline_complete
from .maxima import collect_support, example_maxima
from .render import chat_render, default_render, example_text
from .report import CoverageReport, FeatureCoverage, Support, coverage_report, support_from_maxima
from .targets import LABELS, STATUSES, Complete, FeatureKey, Render, TargetFeature, parse_features, read_features

__all__ = [
    "JUDGE_TEMPLATE", "LABELS", "STATUSES", "Complete", "CoverageReport", "FeatureCoverage", "FeatureKey", "LLMJudge",
    "Render", "ScoreTable", "Support", "TargetFeature", "chat_render", "collect_support", "coverage_report",
    "default_render", "example_maxima", "example_text", "judge_features", "parse_features", "parse_score",
    "pipeline_complete", "read_features", "support_from_maxima",
]
