"""The nano build's whole configuration, and the hash that ties shipped artifacts to it.

Every number that shapes the shipped model, tokenizer, SAEs and benchmark suite lives in
:class:`BuildConfig`; its hash is written into the manifest next to the artifacts, and a test
recomputes it from the defaults here, so changing a default without rebuilding fails CI. ``version`` is bumped when the
generator *code* changes what a configuration produces.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .benchmarks import BenchmarkConfig
from .corpus import CorpusConfig
from .lm import ModelConfig
from .sae_train import SAEConfig


@dataclass(frozen=True)
class EvalSeeds:
    """Seeds of the held-out sets the demo regenerates (nothing of them is shipped as text).

    Not part of :class:`BuildConfig`: they do not change the artifacts, only what the demo
    measures them on. Every set has its own seed, and the build's own seeds are different.
    """

    contrast: int = 301  # A documents for finding the language feature
    switch_select: int = 302  # cue-final prompts for choosing the clamp
    switch_prompts: int = 303  # cue-final prompts for the reported code-switch rate
    agreement: int = 304  # prompts whose greedy continuations must agree across backends
    monolingual_select: int = 305  # language-A text for choosing the clamp
    monolingual: int = 306  # language-A text for the reported perplexity ratio
    toxicity_select: int = 307  # feature selection split of the classifier
    toxicity_eval: int = 308  # its held-out evaluation split


@dataclass(frozen=True)
class BuildConfig:
    version: int = 1
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    vocab_size: int = 1024
    tokenizer_docs: int = 10_000
    tokenizer_seed: int = 100
    lm_seed: int = 101  # stream of training documents
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    sae_seed: int = 102  # documents whose residuals train the SAEs
    sae_train_rows: int = 1600  # rows of model.seq_len tokens
    sae_heldout_seed: int = 300  # documents for the SAEs' explained variance in the manifest
    sae_heldout_rows: int = 200
    benchmarks: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        """sha256 of the canonical JSON of every field."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
