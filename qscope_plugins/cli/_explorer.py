"""Options shared by the feature-explorer commands (``app``, ``index``, ``dashboard``, ``explain``).

The model and SAE default to the bundled nano model and its SAEs (offline), ``--data demo`` to
documents of the nano build's synthetic corpus, and ``--layers`` takes ``3``, ``0-5``, ``0,2,7`` or
``all``; ``--features`` takes ``L:F`` items such as ``3:459``, ``3:1,4,10-12`` or ``3:all``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ._options import UsageError, id_ranges

NANO = "nano"
DEMO_DATA = "demo"
DEMO_SEED = 310  # documents of the nano build's corpus that neither the build nor the demo uses
DEMO_DOCS = 400


def add_source_arguments(p: argparse.ArgumentParser, *, layers: bool = True) -> None:
    """``--model --sae --k --layers --backend --device --dtype``, in the shared vocabulary (``_options``)."""
    from ._options import BACKENDS, MODEL_DTYPES, add_layers, device_name, positive_int

    p.add_argument("--model", default=NANO, help="model hub id or local directory (default: the bundled nano model)")
    p.add_argument("--sae", default=None, help="SAE repo id, SAELens release or directory (default: the nano SAEs)")
    p.add_argument("--k", type=positive_int, help="Top-k size, when neither the SAE's name nor its files say")
    if layers:
        add_layers(p, default="all", help="decoder layers (default: all)")
    p.add_argument("--backend", choices=BACKENDS, default="hf", help="framework that runs the model")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="float32", help="model dtype (SAE math is float32)")


def parse_ids(spec: str, n: int, what: str) -> list[int]:
    """``"3"``, ``"0-5"``, ``"0,2,7"``, ``"all"`` -> sorted ids in ``[0, n)``."""
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(n))
    out: set[int] = set()
    try:
        for _, start, stop in id_ranges(text):
            for i in range(start, stop + 1):
                if not 0 <= i < n:
                    raise UsageError(f"{what} {i} is out of range: there are {what}s 0..{n - 1}")
                out.add(i)
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(f"bad {what} {err.args[0]!r} in {spec!r}; use e.g. 3, 0-5, 0,2,7 or all") from None
    if not out:
        raise UsageError(f"no {what}s in {spec!r}")
    return sorted(out)


def parse_features(specs: list[str], layers: list[int], d_sae: int) -> list[tuple[int, int]]:
    """``["3:459", "2:1,4,10-12", "3:all"]`` -> ``(layer, feature)`` pairs in the given order."""
    out: list[tuple[int, int]] = []
    for spec in specs:
        layer_text, sep, ids = spec.partition(":")
        if not sep:
            raise UsageError(f"bad feature {spec!r}: use LAYER:FEATURES, e.g. 3:459 or 3:0-9")
        try:
            layer = int(layer_text)
        except ValueError:
            raise UsageError(f"bad layer {layer_text!r} in {spec!r}") from None
        if layer not in layers:
            raise UsageError(f"layer {layer} is not in the index; indexed layers: {layers}")
        out.extend((layer, f) for f in parse_ids(ids, d_sae, "feature") if (layer, f) not in out)
    return out


def resolve_source(args: argparse.Namespace) -> tuple[str, str, int | None]:
    """``(model, sae, k)`` with the nano defaults filled in."""
    from ..demo.assets import ASSETS, MODEL_DIR, SAE_DIR, read_manifest

    model, sae, k = args.model, args.sae, args.k
    if model == NANO:
        model = str(ASSETS / MODEL_DIR)
        if sae is None:
            sae, k = str(ASSETS / SAE_DIR), k or int(read_manifest()["sae"]["k"])
    if sae is None:
        raise UsageError("give --sae (the SAEs of --model); only the nano model has default SAEs")
    return model, sae, k


def load_corpus(data: str | None, model: str) -> tuple[list[str], str]:
    """Texts and a description: ``demo`` (the nano corpus) or a file (one text a line, or .jsonl)."""
    from .steer import read_texts

    if data in (None, DEMO_DATA):
        from ..demo.assets import corpus_generator

        docs = corpus_generator().documents(DEMO_SEED, DEMO_DOCS)
        return [d.text for d in docs], f"nano demo corpus (seed {DEMO_SEED}, {DEMO_DOCS} documents)"
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: no such file")
    return read_texts(path), str(path.resolve())


def neuronpedia_ids(sae: str, layers: list[int]) -> dict[str, str]:
    """``{layer: neuronpedia id}`` where SAELens's registry records one for this source (else empty)."""
    from ..catalog import find_group

    group = find_group(sae)
    release = group.release if group else sae
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        entry = get_pretrained_saes_directory().get(release)
    except Exception:  # an unreadable registry means no link, never a failed index
        return {}
    if entry is None:
        return {}
    ids = entry.neuronpedia_id or {}
    return {str(n): ids[f"layer{n}"] for n in layers if ids.get(f"layer{n}")}


def open_model(args: argparse.Namespace, layers_spec: list[int] | str | None):
    """``(backend, {layer: SAE}, model, sae)`` for the chosen source and layers."""
    from ..backends import load_backend
    from ..sae import load_sae

    from ._options import resolve_device, resolve_layers

    model, sae, k = resolve_source(args)
    args.device = resolve_device(args.device)
    backend = load_backend(model, args.backend, device=args.device, dtype=getattr(torch, args.dtype))
    layers = resolve_layers(layers_spec, backend.n_layers)
    saes = {}
    for n in layers:
        saes[n] = load_sae(sae, n, k=k, device=args.device)
        backend.check_sae(saes[n], n)
    return backend, saes, model, sae
