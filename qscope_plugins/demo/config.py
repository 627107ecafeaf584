"""The nano build's whole configuration, and the hash that ties shipped artifacts to it.

Every number that shapes the shipped model, tokenizer and SAEs lives in :class:`BuildConfig`;
its hash is written into the manifest next to the artifacts, and a test recomputes it from the
defaults here, so changing a default without rebuilding fails CI. ``version`` is bumped when the
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
    """Seeds of the held-out sets the demo regenerates (nothing of them is shipped as text)."""

    sae_heldout: int = 300  # documents for the SAEs' explained variance
    contrast: int = 301  # mixed documents for finding the language feature
    switch_prompts: int = 302  # cue-final prompts for the code-switch rate
    monolingual: int = 303  # language-A text for the perplexity ratio
    toxicity_select: int = 304  # feature selection split of the classifier
    toxicity_eval: int = 305  # its held-out evaluation split


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
    sae_heldout_rows: int = 200
    benchmarks: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    eval: EvalSeeds = field(default_factory=EvalSeeds)

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        """sha256 of the canonical JSON of every field."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
