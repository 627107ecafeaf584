"""Reading and checking what the feature commands take: text files, the model, the SAE.

Cheap checks (paths, hub ids in the cache, text files) run before the model loads, so a wrong
command line fails in well under a second with one line that names the fix.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .._io import jsonl_values
from ._options import UsageError, as_usage_errors, check_text, input_file, looks_like_path, resolve_device


# ---- texts --------------------------------------------------------------------------------------
def read_texts(path: str | os.PathLike, flag: str = "file") -> list[str]:
    """Texts from a file: one per line, or for ``.jsonl`` one JSON string / ``{"text"|"prompt": ...}`` per line.

    Blank lines are skipped; a file with no text, a line that is not a string or such an object,
    and text with NUL bytes are usage errors naming the file and line.
    """
    path = input_file(path, flag)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    numbered = [(i, line) for i, line in enumerate(raw.splitlines(), 1) if line.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for i, item in jsonl_values(path, raw, error=UsageError):
            text = item if isinstance(item, str) else item.get("text", item.get("prompt")) if isinstance(item, dict) else None
            if not isinstance(text, str):
                raise UsageError(f"{path}:{i}: expected a JSON string or an object with 'text' or 'prompt', "
                                 f"got {type(item).__name__}")
            texts.append((i, text))
        numbered = texts
    if not numbered:
        raise UsageError(f"{path} holds no texts")
    for i, text in numbered:
        check_text(text, f"{path}:{i}")
    return [text for _, text in numbered]


# ---- hub ----------------------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout`` (no request is made)."""
    if _offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def cached(repo_id: str, filename: str, repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)
    except Exception:  # an id the hub library rejects (bad characters): not cached
        return False


def require_hub(repo_id: str, filename: str, flag: str, repo_type: str = "model") -> None:
    """Fail fast when ``repo_id`` is neither cached nor downloadable, with the command that fixes it."""
    if cached(repo_id, filename, repo_type) or hub_reachable():
        return
    why = "HF_HUB_OFFLINE=1" if _offline() else "the hub cannot be reached"
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    raise UsageError(f"{flag} {repo_id}: not in the local Hugging Face cache and {why}; "
                     f"download it first with: hf download{kind} {repo_id}")


# ---- model and SAE ------------------------------------------------------------------------------
def check_model_source(model: str, flag: str = "--model") -> None:
    """A local checkpoint directory with ``config.json``, or a hub id that is cached or downloadable."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {model}: not a model checkpoint directory (no config.json in it)")
        return
    if path.exists():
        raise UsageError(f"{flag} {model}: is a file; give a hub id or a checkpoint directory")
    if looks_like_path(model):
        raise UsageError(f"{flag} {model}: no such directory (and not a hub id of the form org/name)")
    require_hub(model, "config.json", flag)


def check_sae_source(sae: str, layers: list[int]) -> None:
    """A hub id / release that is cached or downloadable, or an existing path (the loader checks its contents)."""
    from ..catalog import LAYER_FILE, find_group, parse_repo_name

    group = find_group(sae)
    if group is not None:
        for layer in layers:
            if layer >= group.n_layers:
                raise UsageError(f"layer {layer} out of range for {group.repo_id} (layers 0-{group.n_layers - 1})")
        if layers:
            require_hub(group.repo_id, group.filename(layers[0]), "--sae")
        return
    if Path(sae).expanduser().exists():
        return
    if not looks_like_path(sae) and parse_repo_name(sae):
        if layers:
            require_hub(sae, LAYER_FILE.format(layer=layers[0]), "--sae")
        return
    raise UsageError(f"--sae {sae}: no such file or directory, and not a known Qwen-Scope repo id or SAELens "
                     "release (see `qscope catalog`)")


def check_sources(args: argparse.Namespace, layers: list[int] | None = None) -> None:
    """Every cheap check on ``--model``, ``--sae`` and ``--device`` (no model is loaded)."""
    check_model_source(args.model)
    check_sae_source(args.sae, layers if isinstance(layers, list) else [])
    args.device = resolve_device(args.device)


def open_backend(args: argparse.Namespace, model: str | None = None):
    """Load ``--model`` (or ``model``) with ``--backend``; a load failure is one line naming the model."""
    import torch

    from ..backends import load_backend

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its weight-loading bar too
    name = model or args.model
    args.device = resolve_device(args.device)
    try:
        return load_backend(name, args.backend, device=args.device, dtype=getattr(torch, args.dtype))
    except OSError as err:  # transformers: unreadable checkpoint, missing weights, bad config
        raise RuntimeError(f"cannot load model {name}: {str(err).splitlines()[0]}") from err


def open_saes(args: argparse.Namespace, backend, layers: list[int], features: list[int] | None = None) -> dict:
    """``{layer: SAE}`` checked against ``backend`` (only ``features`` are read when given).

    A layer, feature id, k or width that does not fit is a usage error; a malformed file is not.
    """
    from ..sae import load_feature_subset, load_sae

    saes = {}
    for layer in layers:
        with as_usage_errors():
            backend.check_layer(layer)
            if features is None:
                sae = load_sae(args.sae, layer, k=args.k, device=args.device)
            else:
                sae = load_feature_subset(args.sae, layer, features, k=args.k, device=args.device)
            backend.check_sae(sae, layer)
        saes[layer] = sae
    return saes
