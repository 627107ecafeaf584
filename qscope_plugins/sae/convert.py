"""Convert released layer files to safetensors + a JSON sidecar, resumably and atomically.

Output per layer: ``DST/layer{n}/sae_weights.safetensors`` and ``DST/layer{n}/cfg.json``, the
layout ``SAE.load_from_disk`` reads natively (SAELens orientation: ``W_enc (d_in, d_sae)``,
``W_dec (d_sae, d_in)``). The sidecar records k, dtype, shapes, hook names, the source repo, its
revision and the sha256 of the source file and of the written weights. A layer counts as done
only when its sidecar exists, both hashes still match and it was written with the requested dtype
and k (otherwise it is converted again); each layer is built in a temporary directory and swapped
into place, so a crash never leaves a half-written layer that looks done, and a resume removes the
temporary directories a killed run left. One run at a time per ``DST`` (an advisory lock). Protocol:
docs/storage.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._io import atomic_write_with, clean_leftovers, make_temp_dir, output_lock, replace_dir, write_json
from .loading import CONVERTED_CONFIG, CONVERTED_WEIGHTS, load_sae, resolve

FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_layers(spec: str) -> list[int]:
    """``"0-5"``, ``"3"``, ``"0,2,4-6"`` -> sorted layer list."""
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad layer range {part!r}: use forms like 3, 0-5 or 0,2,4-6")
        start, stop = int(lo), int(hi or lo)
        if stop < start:
            raise ValueError(f"bad layer range {part!r}: end before start")
        layers.update(range(start, stop + 1))
    return sorted(layers)


#: Temporary layer directories of this module (``.layer3.<pid>.<hex>.qscope-tmp``) and of earlier
#: releases (``tempfile.mkdtemp(prefix=".layer3.")``): leftovers of a killed run.
_LEFTOVER = re.compile(r"^\.layer\d+\.")


def _settings(dtype: torch.dtype, k: int | None) -> dict:
    return {"dtype": str(dtype).removeprefix("torch."), **({} if k is None else {"k": k})}


def is_converted(layer_dir: Path, source_sha: str | None = None, settings: dict | None = None) -> bool:
    """True when ``layer_dir`` holds a complete conversion (of ``source_sha`` with ``settings``, if given)."""
    try:
        sidecar = json.loads((layer_dir / CONVERTED_CONFIG).read_text())
        info = sidecar["qscope"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if source_sha is not None and info.get("source_sha256") != source_sha:
        return False
    if settings and any(info.get(key) != value for key, value in settings.items()):
        return False
    weights = layer_dir / CONVERTED_WEIGHTS
    return weights.exists() and sha256_file(weights) == info.get("weights_sha256")


def convert_layer(source: str, layer: int, dst: Path, *, dtype: torch.dtype = torch.float32,
                  revision: str | None = None, k: int | None = None) -> bool:
    """Convert one layer; returns False when it was already converted (same source, dtype, k) and verified."""
    dst = Path(dst)
    with output_lock(dst, what="conversion output"):
        clean_leftovers(dst, extra=_LEFTOVER)
        return _convert_layer(source, layer, dst, dtype=dtype, revision=revision, k=k)


def _convert_layer(source, layer, dst: Path, *, dtype, revision, k) -> bool:
    resolved = resolve(source, layer, revision)
    source_sha = sha256_file(resolved.path)
    final = dst / f"layer{layer}"
    wanted_k = k if k is not None else (resolved.name_hint[1] if resolved.name_hint else None)
    if is_converted(final, source_sha, _settings(dtype, wanted_k)):
        return False
    sae = load_sae(source, layer, dtype=dtype, revision=revision, k=k)
    dst.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dst, f"layer{layer}")
    try:
        state = {"W_enc": sae.W_enc.data.contiguous(), "W_dec": sae.W_dec.data.contiguous(),
                 "b_enc": sae.b_enc.data.contiguous(), "b_dec": sae.b_dec.data.contiguous()}
        atomic_write_with(tmp / CONVERTED_WEIGHTS, lambda path: save_file(state, str(path)))
        cfg = sae.cfg.to_dict()
        cfg["qscope"] = {
            "format_version": FORMAT_VERSION,
            "layer": layer,
            "k": sae.cfg.k,
            "dtype": str(dtype).removeprefix("torch."),
            "d_model": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "hook_name": sae.cfg.metadata.hook_name,
            "hf_hook_name": sae.cfg.metadata.hf_hook_name,
            "source_repo": resolved.repo_id,
            "source_file": resolved.path.name,
            "revision": resolved.revision,
            "source_sha256": source_sha,
            "weights_sha256": sha256_file(tmp / CONVERTED_WEIGHTS),
        }
        write_json(tmp / CONVERTED_CONFIG, cfg, indent=2, default=str)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def convert(source: str, dst: str | Path, layers: Iterable[int], *, dtype: torch.dtype = torch.float32,
            revision: str | None = None, k: int | None = None, progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> list[int]:
    """Convert ``layers`` of ``source`` into ``dst``; returns the layers actually written.

    A layer already converted from the same source file with the same dtype and k is skipped; one
    converted with other settings is converted again (the run's settings always win).
    """
    dst = Path(dst)
    layers = list(layers)
    written = []
    with output_lock(dst, what="conversion output"):
        clean_leftovers(dst, extra=_LEFTOVER)
        for layer in progress(layers) if progress else layers:
            if _convert_layer(source, layer, dst, dtype=dtype, revision=revision, k=k):
                written.append(layer)
    return written
