"""Shared, built-once fixtures of the explorer tests: the nano model, its SAEs and a small index."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from qscope_plugins.demo.assets import ASSETS, MODEL_DIR, SAE_DIR, corpus_generator, read_manifest

LANGUAGE_FEATURE = (3, 459)  # the nano build's planted B-language feature (docs/demo.md)
N_DOCS = 120


@functools.cache
def nano():
    """``(backend, {layer: SAE}, k)`` of the bundled nano model."""
    from qscope_plugins.backends import load_backend
    from qscope_plugins.sae import load_sae

    k = int(read_manifest()["sae"]["k"])
    backend = load_backend(str(ASSETS / MODEL_DIR))
    return backend, {n: load_sae(ASSETS / SAE_DIR, n, k=k) for n in range(4)}, k


@functools.cache
def corpus() -> list[str]:
    return [d.text for d in corpus_generator().documents(310, N_DOCS)]


@functools.cache
def index_dir() -> Path:
    """A finished index of layers 2 and 3 over :func:`corpus` (built once per test session)."""
    from qscope_plugins.recipes.feature_index import build_index

    root = Path(tempfile.mkdtemp(prefix="qscope-index-"))
    atexit.register(shutil.rmtree, root, True)
    backend, saes, _ = nano()
    build_index(backend, {n: saes[n] for n in (2, 3)}, corpus(), root / "index", model="nano", sae_source="nano",
                batch_size=32)
    return root / "index"


def b_text() -> str:
    """A language-B document on which the language feature ranks first at layer 3."""
    return corpus_generator().documents(900, 2, lang="B", toxic=False, cues=False)[1].text


def a_text() -> str:
    return corpus_generator().documents(901, 1, lang="A", toxic=False, cues=False)[0].text


def switch_prompt() -> str:
    """Language-A text ending in a cue: greedy decoding switches into B, unless the feature is clamped."""
    return corpus_generator().switch_prompts(902, 1)[0][0]
