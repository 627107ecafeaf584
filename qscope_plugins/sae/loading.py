"""``load_sae`` / ``load_feature_subset``: hub ids, SAELens release names, directories and files.

Where a fact can come from the catalog (shape, k, backbone) it does, and the file is checked
against it; otherwise k and width come from a Qwen-Scope-style name or a converted sidecar.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..catalog import LAYER_FILE, SAEGroup, find_group, parse_repo_name
from ._mmap import cast, check_layout, materialize
from .features import FeatureSubset, subset_from_rows
from .format import SAEFormatError, as_index, check_finite, check_shapes, read_layer_file
from .topk import SAELENS_METADATA, QwenScopeSAE, make_config

CONVERTED_WEIGHTS = "sae_weights.safetensors"
CONVERTED_CONFIG = "cfg.json"


@dataclass
class ResolvedSource:
    """Where one layer's weights live and what is known about them before reading."""

    path: Path
    layer: int
    converted: bool
    group: SAEGroup | None = None
    repo_id: str | None = None
    revision: str | None = None
    name_hint: tuple[int, int] | None = None  # (d_sae, k) from a Qwen-Scope-style name
    sidecar: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.repo_id}/{self.path.name}" if self.repo_id else str(self.path)


def hub_file(repo_id: str, filename: str, revision: str | None = None, force_download: bool = False) -> Path:
    """Path of ``filename`` in the hub cache, downloading it unless ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, force_download=force_download))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id}: {filename} is not in the local Hugging Face cache and cannot be downloaded "
            f"(offline or unreachable hub). Download it first with: hf download {repo_id} {filename}"
        ) from None


def _snapshot_revision(path: Path) -> str | None:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _check_layer(group: SAEGroup | None, layer: int) -> int:
    layer = as_index(layer, "layer")
    if layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    if group is not None and layer >= group.n_layers:
        raise ValueError(f"layer {layer} out of range for {group.repo_id} (layers 0-{group.n_layers - 1})")
    return layer


def resolve(source: str | os.PathLike, layer: int, revision: str | None = None) -> ResolvedSource:
    """Find the file for ``layer`` of ``source`` (see :func:`load_sae`)."""
    text = os.fspath(source)
    group = find_group(text)
    layer = _check_layer(group, layer)
    if group is not None:
        path = hub_file(group.repo_id, group.filename(layer), revision)
        return ResolvedSource(path, layer, False, group, group.repo_id, _snapshot_revision(path), (group.d_sae, group.k))
    local = Path(text).expanduser()
    if local.is_dir() and (local / CONVERTED_CONFIG).exists():
        return _local(local, layer, True, text)
    if local.is_dir():
        for candidate, converted in ((local / LAYER_FILE.format(layer=layer), False), (local / f"layer{layer}", True)):
            if candidate.exists():
                return _local(candidate, layer, converted, text)
        raise FileNotFoundError(
            f"{local}: no {LAYER_FILE.format(layer=layer)} (released format) or layer{layer}/ (converted) in this directory"
        )
    if local.is_file():
        return _local(local, layer, local.suffix == ".safetensors", text)
    if text.count("/") == 1 and parse_repo_name(text) and not text.startswith((".", "/", "~")):
        path = hub_file(text, LAYER_FILE.format(layer=layer), revision)
        return ResolvedSource(path, layer, False, None, text, _snapshot_revision(path), parse_repo_name(text))
    raise FileNotFoundError(
        f"{text!r} is neither a known Qwen-Scope repo id / SAELens release (see `qscope catalog`) nor an existing path"
    )


def _local(path: Path, layer: int, converted: bool, text: str) -> ResolvedSource:
    if converted:
        directory = path if path.is_dir() else path.parent
        sidecar = _read_sidecar(directory)
        info = sidecar.get("qscope", {})
        group = find_group(info.get("source_repo") or "")
        return ResolvedSource(directory / CONVERTED_WEIGHTS, layer, True, group, info.get("source_repo"),
                              info.get("revision"), (sidecar["d_sae"], sidecar["k"]), sidecar)
    hint = parse_repo_name(str(path.resolve())) or parse_repo_name(text)
    # A hub-cache path (models--Qwen--SAE-Res-...) names its repo; use the catalog row if it is one.
    repo = next((g for g in _groups_named_in(str(path.resolve()))), None)
    return ResolvedSource(path, layer, False, repo, repo.repo_id if repo else None, _snapshot_revision(path), hint)


def _groups_named_in(path: str):
    from ..catalog import GROUPS

    return (g for g in GROUPS if g.repo_id.replace("/", "--") in path or g.repo_id.split("/")[1] in path.split(os.sep))


def _read_sidecar(directory: Path) -> dict:
    cfg_path = directory / CONVERTED_CONFIG
    try:
        sidecar = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: converted SAE directory without {CONVERTED_CONFIG}") from None
    except json.JSONDecodeError as err:
        raise SAEFormatError(f"{cfg_path}: not valid JSON: {err}") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise SAEFormatError(f"{cfg_path}: not a JSON text file: {err}") from None
    return check_sidecar(sidecar, cfg_path)


def check_sidecar(sidecar, cfg_path) -> dict:
    """The converted sidecar's fields: an object with positive int ``d_in``, ``d_sae``, ``k <= d_sae``, and a
    ``qscope`` section (when present) that agrees with them."""
    if not isinstance(sidecar, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object, got {type(sidecar).__name__}")
    missing = [key for key in ("d_in", "d_sae", "k") if key not in sidecar]
    if missing:
        raise SAEFormatError(f"{cfg_path}: missing key {missing[0]!r}")
    for key in ("d_in", "d_sae", "k"):
        value = sidecar[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SAEFormatError(f"{cfg_path}: key {key!r} must be a positive integer, got {value!r}")
    if sidecar["k"] > sidecar["d_sae"]:
        raise SAEFormatError(f"{cfg_path}: k={sidecar['k']} is larger than d_sae={sidecar['d_sae']}")
    info = sidecar.get("qscope", {})
    if not isinstance(info, dict):
        raise SAEFormatError(f"{cfg_path}: key 'qscope' must be an object, got {type(info).__name__}")
    for key, top in (("d_model", "d_in"), ("d_sae", "d_sae"), ("k", "k")):
        if key in info and info[key] != sidecar[top]:
            raise SAEFormatError(f"{cfg_path}: qscope.{key}={info[key]!r} disagrees with {top}={sidecar[top]!r}")
    recorded = info.get("weights_sha256")
    if recorded is not None and not (isinstance(recorded, str) and len(recorded) == 64):
        raise SAEFormatError(f"{cfg_path}: qscope.weights_sha256 must be a hex sha256 string, got {recorded!r}")
    if "metadata" in sidecar and not isinstance(sidecar["metadata"], dict):
        raise SAEFormatError(f"{cfg_path}: key 'metadata' must be an object")
    return sidecar


def _pick_k(resolved: ResolvedSource, k: int | None, d_sae: int) -> int:
    if k is not None:
        k = as_index(k, "k")
    if k is None:
        if resolved.name_hint is None:
            raise ValueError(
                f"{resolved.describe()}: k (the Top-k size) is not in the file; pass k=... "
                "(Qwen-Scope names carry it as L0_{k}, e.g. SAE-Res-Qwen3-1.7B-Base-W32K-L0_50)"
            )
        k = resolved.name_hint[1]
    if not 0 < k <= d_sae:
        raise ValueError(f"{resolved.describe()}: k={k} must be in [1, d_sae={d_sae}]")
    return k


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accepts torch dtypes and names like ``"bf16"``, ``"float16"``, ``"torch.float32"``."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = dtype.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16 (bf16), float16 (fp16)")
    return _DTYPES[name]


def load_sae(
    source: str | os.PathLike,
    layer: int,
    *,
    k: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    relu: bool = True,
    revision: str | None = None,
) -> QwenScopeSAE:
    """Load one layer's Qwen-Scope SAE.

    ``source``: an HF repo id (``"Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"``), a SAELens
    release name (``"qwen-scope-3-1.7b-base-w32k-l50"``), a directory holding
    ``layer{n}.sae.pt`` or converted ``layer{n}/`` folders, or a single file. ``dtype``
    defaults to the stored precision (float32 for released files). For a few features only, see
    :func:`load_feature_subset`.

    Arguments are checked before any file is read: ``layer`` and ``k`` are ints (NumPy integers
    pass; bools and floats raise ``TypeError``). Every tensor read is checked finite. A converted
    sidecar must agree with itself and with the weights' shapes, and the weights' sha256 is checked
    against the sidecar's record (once per file version and process).
    """
    return _load(source, layer, k=k, device=device, dtype=dtype, relu=relu, features=None, revision=revision)


def load_feature_subset(
    source: str | os.PathLike,
    layer: int,
    features,
    *,
    k: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
) -> FeatureSubset:
    """Load only ``features``' encoder rows, decoder columns and biases of one layer's SAE.

    ``source``, ``k``, ``dtype`` and ``revision`` as for :func:`load_sae`. ``features`` is a
    non-empty flat list of int ids (repeats are dropped with a warning, first occurrence kept);
    only their rows are read and checked finite, with both biases. A :class:`FeatureSubset` cannot
    Top-k encode (that needs the full encoder).
    """
    return _load(source, layer, k=k, device=device, dtype=dtype, relu=True, features=features, revision=revision)


def _load(source, layer, *, k, device, dtype, relu, features, revision):
    if k is not None:
        k = as_index(k, "k")
        if k < 1:
            raise ValueError(f"k must be a positive int, got {k}")
    ids = None if features is None else feature_ids(features)
    resolved = resolve(source, layer, revision)
    layer = resolved.layer
    device = torch.device(device)
    target = parse_dtype(dtype) if dtype is not None else None
    if resolved.converted:
        return _load_converted(resolved, k=k, device=device, dtype=target, relu=relu, ids=ids)
    state = read_layer_file(resolved.path)
    check_layout(state, resolved.path)
    expect = resolved.group
    d_model, d_sae = check_shapes(
        state, str(resolved.path),
        d_model=expect.d_model if expect else None,
        d_sae=expect.d_sae if expect else (resolved.name_hint[0] if resolved.name_hint else None),
    )
    k = _pick_k(resolved, k, d_sae)
    target = target or state["W_enc"].dtype
    if ids is not None:
        ids = _feature_ids(ids, d_sae, resolved)
        rows_enc = _validated_rows(state["W_enc"], ids, d_sae, resolved, "W_enc")
        rows_dec = _validated_rows(state["W_dec"].T, ids, d_sae, resolved, "W_dec")
        b_enc, b_dec = state["b_enc"][ids], state["b_dec"]
        check_finite(b_enc, str(resolved.path), "b_enc")
        check_finite(b_dec, str(resolved.path), "b_dec")
        parts = _cast_all({"W_enc": rows_enc, "W_dec": rows_dec, "b_enc": b_enc, "b_dec": b_dec},
                          target, str(resolved.path))
        return subset_from_rows(ids, parts["W_enc"], parts["W_dec"], parts["b_enc"], parts["b_dec"],
                                _metadata(resolved), d_sae=d_sae, k=k, device=device, dtype=target)
    name = str(resolved.path)
    W_enc_rows = materialize(state["W_enc"], device=device, dtype=target, transpose=False, source=name, key="W_enc")
    W_dec_rows = materialize(state["W_dec"], device=device, dtype=target, transpose=True, source=name, key="W_dec")
    biases = {}
    for key in ("b_enc", "b_dec"):
        check_finite(state[key], name, key)
        biases[key] = cast(state[key], device=device, dtype=target, source=name, key=key)
    cfg = make_config(d_model, d_sae, k, layer=layer, relu=relu, dtype=target, device=device,
                      model_name=expect.model if expect else None,
                      hf_hook_name=expect.hf_hook_name(layer) if expect else f"model.layers.{layer}",
                      metadata=_metadata(resolved))
    return QwenScopeSAE.from_parts(cfg, W_enc_rows, W_dec_rows, biases["b_enc"], biases["b_dec"])


def _feature_ids(features, d_sae: int, resolved: ResolvedSource) -> torch.Tensor:
    """The requested feature ids, range-checked against ``d_sae`` and de-duplicated (first occurrence kept)
    before any weight is read, so a long list costs at most ``d_sae`` row reads."""
    ids = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    bad = ids[(ids < 0) | (ids >= d_sae)]
    if bad.numel():
        raise ValueError(f"feature id {int(bad[0])} out of range [0, {d_sae}) for {resolved.describe()}")
    unique, inverse = torch.unique(ids, return_inverse=True)
    if unique.numel() == ids.numel():
        return ids
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(ids.numel()), reduce="amin")
    kept = ids[first.sort().values]
    warnings.warn(f"features: {ids.numel() - kept.numel()} repeated ids dropped ({kept.numel()} distinct kept, "
                  "in first-seen order)", stacklevel=4)
    return kept


def _cast_all(tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> dict[str, torch.Tensor]:
    """Each tensor in ``dtype`` (on its device), refused when the cast overflows."""
    return {key: cast(value, device=value.device, dtype=dtype, source=source, key=key) for key, value in tensors.items()}


def feature_ids(features) -> torch.Tensor:
    """``features`` (a non-empty flat list of ints: Python, NumPy or an integer tensor) as a long tensor."""
    if isinstance(features, torch.Tensor):
        if features.is_floating_point() or features.dtype == torch.bool or features.is_complex():
            raise TypeError(f"features must hold integer ids, got a {features.dtype} tensor")
        if features.ndim != 1:
            raise ValueError(f"features must be a flat list of ids, got a tensor of shape {tuple(features.shape)}")
        items = features.tolist()
    elif isinstance(features, (str, bytes)) or not hasattr(features, "__iter__"):
        raise TypeError(f"features must be a list of int feature ids, got {type(features).__name__}")
    else:
        items = [as_index(f, "feature id") if not isinstance(f, (list, tuple)) else _nested(f) for f in features]
    if not items:
        raise ValueError("features is empty: pass at least one feature id (or load_sae for the full SAE)")
    return torch.tensor(items, dtype=torch.long)  # range and repeats are checked against d_sae (_feature_ids)


def _nested(value):
    raise TypeError(f"features must be a flat list of ids, got a nested {type(value).__name__} {value!r}")


def _validated_rows(matrix: torch.Tensor, ids: torch.Tensor, d_sae: int, resolved: ResolvedSource, key: str) -> torch.Tensor:
    bad = ids[(ids < 0) | (ids >= d_sae)]
    if bad.numel():
        raise ValueError(f"feature id {int(bad[0])} out of range [0, {d_sae}) for {resolved.describe()}")
    rows = matrix[ids].clone()
    check_finite(rows, str(resolved.path), key)
    return rows


def _metadata(resolved: ResolvedSource) -> dict:
    return {
        "sae_source": resolved.repo_id or str(resolved.path),
        "sae_revision": resolved.revision,
        "qwen_scope_group": resolved.group.release if resolved.group else None,
    }


def _open_safetensors(name: str):
    from safetensors import safe_open

    try:
        return safe_open(name, framework="pt")
    except Exception as err:  # SafetensorError (corrupt header, truncated file) is not an OSError subclass
        raise SAEFormatError(f"{name}: not a readable safetensors file (corrupt or truncated?): {err}") from None


_VERIFIED: dict[tuple, str] = {}


def check_weights_hash(resolved: ResolvedSource) -> None:
    """The weights file must still hash to the sidecar's ``qscope.weights_sha256`` (once per file version)."""
    recorded = resolved.sidecar.get("qscope", {}).get("weights_sha256")
    if recorded is None:
        return
    import hashlib

    stat = resolved.path.stat()
    key = (str(resolved.path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(resolved.path, "rb") as handle:
            while block := handle.read(16 << 20):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    if _VERIFIED[key] != recorded:
        raise SAEFormatError(
            f"{resolved.path}: sha256 {_VERIFIED[key][:12]}... does not match the {CONVERTED_CONFIG} record "
            f"{recorded[:12]}... (the weights changed after conversion; re-run qscope convert)"
        )


def _load_converted(resolved, *, k, device, dtype, relu, ids):
    sidecar = resolved.sidecar
    d_model, d_sae = sidecar["d_in"], sidecar["d_sae"]
    k = _pick_k(resolved, k, d_sae)
    name = str(resolved.path)
    if not resolved.path.exists():
        raise FileNotFoundError(f"{resolved.path.parent}: converted SAE directory without {CONVERTED_WEIGHTS}")
    if ids is None:  # a full load reads every byte anyway; a feature subset reads a few rows and is not hashed
        check_weights_hash(resolved)
    with _open_safetensors(name) as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        want = {"W_enc": (d_model, d_sae), "W_dec": (d_sae, d_model), "b_enc": (d_sae,), "b_dec": (d_model,)}
        for key, shape in want.items():
            if shapes.get(key) != shape:
                raise SAEFormatError(f"{name}: key {key!r} has shape {shapes.get(key)}, expected {shape}")
        if ids is not None:
            ids = _feature_ids(ids, d_sae, resolved)
            enc, dec = handle.get_slice("W_enc"), handle.get_slice("W_dec")
            rows_enc = torch.stack([enc[:, j] for j in ids.tolist()]) if len(ids) else torch.empty(0, d_model)
            rows_dec = torch.cat([dec[j : j + 1] for j in ids.tolist()]) if len(ids) else torch.empty(0, d_model)
            b_enc = handle.get_slice("b_enc")[:][ids]
            b_dec = handle.get_tensor("b_dec")
            dtype = dtype or rows_enc.dtype
            for key, value in (("W_enc", rows_enc), ("W_dec", rows_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
                check_finite(value, name, key)
            parts = _cast_all({"W_enc": rows_enc, "W_dec": rows_dec, "b_enc": b_enc, "b_dec": handle.get_tensor("b_dec")},
                              dtype, name)
            return subset_from_rows(ids, parts["W_enc"], parts["W_dec"], parts["b_enc"], parts["b_dec"],
                                    _metadata(resolved), d_sae=d_sae, k=k, device=device, dtype=dtype)
        tensors = {key: handle.get_tensor(key) for key in want}
    dtype = dtype or tensors["W_enc"].dtype
    for key, value in tensors.items():
        check_finite(value, name, key)
    # Sidecars written before SAELENS_METADATA existed carry None there: keep the defaults.
    stored = {key: value for key, value in sidecar.get("metadata", {}).items()
              if value is not None or key not in SAELENS_METADATA}
    meta = {**stored, **_metadata(resolved)}
    cfg = make_config(d_model, d_sae, k, layer=resolved.layer, relu=relu, dtype=dtype, device=device,
                      model_name=meta.get("model_name"), hf_hook_name=meta.get("hf_hook_name"),
                      metadata={key: value for key, value in meta.items()
                                if key not in ("model_name", "hook_name", "hf_hook_name")})
    moved = {key: cast(value, device=device, dtype=dtype, source=name, key=key) for key, value in tensors.items()}
    return QwenScopeSAE.from_parts(cfg, moved["W_enc"].T, moved["W_dec"], moved["b_enc"], moved["b_dec"])
