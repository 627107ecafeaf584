"""Convert released layer files to safetensors + a JSON sidecar, resumably and atomically.

Output per layer: ``DST/layer{n}/sae_weights.safetensors`` and ``DST/layer{n}/cfg.json``, the
layout ``SAE.load_from_disk`` reads natively (SAELens orientation: ``W_enc (d_in, d_sae)``,
``W_dec (d_sae, d_in)``). The sidecar records k, shapes, hook names, the source repo, its
revision and the sha256 of the source file and of the written weights. A layer counts as done
only when its sidecar exists and both hashes still match; each layer is written to a temporary
directory and renamed into place, so a crash never leaves a half-written layer that looks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def is_converted(layer_dir: Path, source_sha: str | None = None) -> bool:
    """True when ``layer_dir`` holds a complete conversion (of ``source_sha``, if given)."""
    try:
        sidecar = json.loads((layer_dir / CONVERTED_CONFIG).read_text())
        info = sidecar["qscope"]
    except (OSError, ValueError, KeyError):
        return False
    if source_sha is not None and info.get("source_sha256") != source_sha:
        return False
    weights = layer_dir / CONVERTED_WEIGHTS
    return weights.exists() and sha256_file(weights) == info.get("weights_sha256")


def convert_layer(source: str, layer: int, dst: Path, *, dtype: torch.dtype = torch.float32,
                  revision: str | None = None, k: int | None = None) -> bool:
    """Convert one layer; returns False when it was already converted and verified."""
    resolved = resolve(source, layer, revision)
    source_sha = sha256_file(resolved.path)
    dst = Path(dst)
    final = dst / f"layer{layer}"
    if is_converted(final, source_sha):
        return False
    sae = load_sae(source, layer, dtype=dtype, revision=revision, k=k)
    dst.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".layer{layer}.", dir=dst))
    try:
        state = {"W_enc": sae.W_enc.data.contiguous(), "W_dec": sae.W_dec.data.contiguous(),
                 "b_enc": sae.b_enc.data.contiguous(), "b_dec": sae.b_dec.data.contiguous()}
        save_file(state, str(tmp / CONVERTED_WEIGHTS))
        cfg = sae.cfg.to_dict()
        cfg["qscope"] = {
            "format_version": FORMAT_VERSION,
            "layer": layer,
            "k": sae.cfg.k,
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
        (tmp / CONVERTED_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def convert(source: str, dst: str | Path, layers: Iterable[int], *, dtype: torch.dtype = torch.float32,
            revision: str | None = None, k: int | None = None, progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> list[int]:
    """Convert ``layers`` of ``source`` into ``dst``; returns the layers actually written."""
    dst = Path(dst)
    layers = list(layers)
    written = []
    for layer in progress(layers) if progress else layers:
        if convert_layer(source, layer, dst, dtype=dtype, revision=revision, k=k):
            written.append(layer)
    return written
