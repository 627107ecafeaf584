"""Where the shipped nano artifacts live, and how to open them safely.

``qscope_plugins/assets/nano/`` holds ``model/`` (a ``Qwen3ForCausalLM`` checkpoint with its
tokenizer), ``sae/layer{n}.sae.pt`` (the released Qwen-Scope layout), ``sae_safetensors/layer{n}/``
(the converted SAELens layout) and ``manifest.json`` (configuration, its hash, file hashes and
measured quality). Held-out text is not shipped: it is regenerated from the seeds in the
configuration with :func:`corpus_generator`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import BuildConfig
from .corpus import CorpusGenerator
from .lexicon import build_lexicon

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "nano"
MODEL_DIR, SAE_DIR, SAFETENSORS_DIR, MANIFEST = "model", "sae", "sae_safetensors", "manifest.json"
REBUILD = "python -m qscope_plugins.demo.build --out {path}"


def corpus_generator(cfg: BuildConfig | None = None) -> CorpusGenerator:
    """The corpus generator of a build (the demo regenerates its held-out sets from it)."""
    cfg = cfg or BuildConfig()
    return CorpusGenerator(build_lexicon(cfg.corpus.lexicon_seed), cfg.corpus)


def read_manifest(root: Path = ASSETS) -> dict:
    """The manifest of the artifacts in ``root``, checked against the code's configuration.

    Raises ``FileNotFoundError`` when there is no build there and ``ValueError`` when it was
    built from another configuration than :class:`BuildConfig`'s defaults (stale artifacts).
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no nano build here (missing {MANIFEST}); build one with "
                                + REBUILD.format(path=root))
    manifest = json.loads(path.read_text())
    expected = BuildConfig().hash()
    if manifest.get("config_hash") != expected:
        raise ValueError(f"{root}: artifacts were built from configuration {manifest.get('config_hash')} but the "
                         f"code's configuration is {expected}; rebuild with " + REBUILD.format(path=root))
    return manifest
