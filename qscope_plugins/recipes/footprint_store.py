"""A sparse, resumable on-disk store of benchmark feature footprints.

Layout, one directory per benchmark::

    <root>/<benchmark>/meta.json          configuration, provenance, progress, final file hashes
    <root>/<benchmark>/layer{n}.npz       final CSR rows per sample: indptr, indices (+ counts)
    <root>/<benchmark>/partial/           one file per completed batch and layer while running

Each completed batch is written (temporary file + ``os.replace``) before ``meta.json`` records it, so
an interrupted run resumes after the last recorded batch. Archives are written with fixed zip
timestamps and no pickled objects, so a resumed run produces the same bytes as an uninterrupted one
and loading never executes code (``allow_pickle=False``). The full protocol (order of writes, what
marks a batch done, how a resume reconciles leftovers, the lock) is in docs/storage.md.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._io import TMP_SUFFIX, DamagedFileError, atomic_write, clean_leftovers, load_npz, npz_bytes, read_json, remove_tree, write_json

__all__ = ["FootprintConfig", "FootprintStore", "Footprints", "content_hash", "open_stores"]

FORMAT = "qscope-footprints"
VERSION = 1
POSITIONS = ("last", "any", "all")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def content_hash(text: str) -> str:
    """sha256 of a rendered prompt: ties each stored row to the exact text it came from."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _recovery(directory: Path) -> str:
    return (f"recover by rerunning with --overwrite (qscope footprint ... --overwrite, or overwrite=True), "
            f"which recomputes {directory.name} from scratch")


@dataclass(frozen=True)
class FootprintConfig:
    """Everything that determines a benchmark's footprints; a resumed run must match it exactly."""

    benchmark: str
    model: str
    sae_source: str
    sae_revision: str | None
    layers: tuple[int, ...]
    d_sae: int
    sample_ids: tuple[str, ...]
    sample_hashes: tuple[str, ...]
    template: str = "{text}"
    position: str = "last"
    """``last`` (the report's choice), ``any`` (union over tokens) or ``all`` (union with token counts)."""
    skip_first_token: bool = True
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not _NAME.match(self.benchmark):
            raise ValueError(f"benchmark name {self.benchmark!r} must match {_NAME.pattern} (it names a directory)")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be a non-empty list without repeats, got {list(self.layers)}")
        if not self.sample_ids or len(self.sample_ids) != len(self.sample_hashes):
            counts = f"{len(self.sample_ids)} ids and {len(self.sample_hashes)} hashes"
            raise ValueError(f"need one hash per sample id, got {counts}")
        if len(set(self.sample_ids)) != len(self.sample_ids):
            raise ValueError("sample ids must be unique")
        if self.batch_size < 1 or self.d_sae < 1:
            raise ValueError("batch_size and d_sae must be >= 1")
        for name in ("layers", "sample_ids", "sample_hashes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def n_batches(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def batch_slice(self, batch: int) -> slice:
        return slice(batch * self.batch_size, min((batch + 1) * self.batch_size, self.n_samples))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> FootprintConfig:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise ValueError(f"footprint metadata lacks fields: {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Footprints:
    """One benchmark's footprints at one layer, as CSR rows (sample i -> ``indices[indptr[i]:indptr[i+1]]``)."""

    config: FootprintConfig
    layer: int
    indptr: np.ndarray
    indices: np.ndarray
    counts: np.ndarray | None
    """Tokens at which each feature was active (``position="all"`` only)."""

    def sets(self) -> list[np.ndarray]:
        """Per-sample feature-id arrays: the input of :mod:`qscope_plugins.recipes.redundancy`."""
        return np.split(self.indices, self.indptr[1:-1])

    def matrix(self) -> sp.csr_array:
        """``samples x d_sae``: token counts for ``position="all"``, else 1 where active."""
        data = self.counts if self.counts is not None else np.ones(self.indices.size, dtype=np.int32)
        return sp.csr_array((data, self.indices, self.indptr), shape=(self.config.n_samples, self.config.d_sae))


class FootprintStore:
    """Writes one benchmark's footprints batch by batch, resumably; also the reader of finished ones."""

    def __init__(self, root: str | Path, config: FootprintConfig, overwrite: bool = False) -> None:
        self.config = config
        self.directory = Path(root) / config.benchmark
        if overwrite and self.directory.exists():
            remove_tree(self.directory)
        self.meta_path = self.directory / "meta.json"
        if self.meta_path.exists():
            meta = self._read_meta(self.meta_path)
            try:
                stored = FootprintConfig.from_dict(meta["config"])
            except (KeyError, TypeError, ValueError) as err:
                raise DamagedFileError(self.meta_path, f"bad configuration: {err}", _recovery(self.directory)) from None
            if stored != config:
                changed = [f.name for f in fields(config) if getattr(stored, f.name) != getattr(config, f.name)]
                raise ValueError(
                    f"{self.directory} holds footprints computed with a different {', '.join(changed)}; "
                    "use another directory or overwrite it"
                )
            self.completed = int(meta["completed_batches"])
            self.complete = bool(meta["complete"])
        else:
            partial = self.directory / "partial"
            if partial.exists():  # stale batches of a killed --overwrite: never mix them in
                remove_tree(partial)
            partial.mkdir(parents=True, exist_ok=True)
            self.completed, self.complete = 0, False
            self._write_meta({})

    def reconcile(self) -> list[Path]:
        """Before resuming: remove what a killed run left. Call while holding the store's lock
        (:func:`qscope_plugins._io.output_lock` on ``self.directory``); returns what was removed.

        Temporary files (and a ``partial/`` being removed) are dropped; a complete store loses a
        leftover ``partial/``; an incomplete one gets its ``partial/`` back if it went missing.
        """
        partial = self.directory / "partial"
        aside = re.compile(rf"^\.{re.escape(self.directory.name)}\.\d+\.[0-9a-f]+{re.escape(TMP_SUFFIX)}$")
        removed = clean_leftovers(self.directory.parent, prefix=None, extra=aside)  # a killed --overwrite's
        removed += clean_leftovers(self.directory) + clean_leftovers(partial)
        if self.complete and partial.exists():
            remove_tree(partial)
            removed.append(partial)
        elif not self.complete:
            partial.mkdir(parents=True, exist_ok=True)
        return removed

    # ---- writing -------------------------------------------------------------------------------
    def pending(self) -> range:
        """Batch numbers still to compute, in order."""
        return range(self.completed, self.config.n_batches)

    def _batch_path(self, batch: int, layer: int) -> Path:
        return self.directory / "partial" / f"batch{batch:06d}.layer{layer}.npz"

    def write_batch(self, batch: int, rows: Mapping[int, sp.sparray]) -> None:
        """Record batch ``batch``: ``rows[layer]`` is a (batch rows x d_sae) sparse matrix, non-zero where a
        feature is active (values are token counts for ``position="all"``, otherwise ignored)."""
        if batch != self.completed:
            raise ValueError(f"expected batch {self.completed} next, got batch {batch}")
        self.write_batch_files(batch, rows)
        self.completed += 1
        self._write_meta({})

    def write_batch_files(self, batch: int, rows: Mapping[int, sp.sparray]) -> None:
        """Batch ``batch``'s layer files only (atomic; ``meta.json`` untouched). A data-parallel rank
        writes its batches so; such a batch is done once every layer file exists (:meth:`batch_done`)."""
        span = self.config.batch_slice(batch)
        if set(rows) != set(self.config.layers):
            raise ValueError(f"batch {batch} has layers {sorted(rows)}, expected {sorted(self.config.layers)}")
        for layer in self.config.layers:
            matrix = sp.csr_array(rows[layer])
            if matrix.shape != (span.stop - span.start, self.config.d_sae):
                raise ValueError(
                    f"batch {batch} layer {layer} has shape {matrix.shape}, "
                    f"expected {(span.stop - span.start, self.config.d_sae)}"
                )
            atomic_write(self._batch_path(batch, layer), npz_bytes(self._arrays(matrix)), sweep=False)

    # ---- data-parallel runs (qscope_plugins.distributed) ------------------------------------------
    @classmethod
    def attach(cls, root: str | Path, config: FootprintConfig) -> FootprintStore:
        """The store another rank set up, for writing batch files only (reads and writes nothing now)."""
        store = cls.__new__(cls)
        store.config, store.directory = config, Path(root) / config.benchmark
        store.meta_path = store.directory / "meta.json"
        store.completed, store.complete = 0, False
        return store

    def batch_done(self, batch: int) -> bool:
        """Counted in ``meta.json``, or every layer file of the batch is in ``partial/`` (atomic writes:
        a file that exists is whole)."""
        return batch < self.completed or all(self._batch_path(batch, n).is_file() for n in self.config.layers)

    def undone(self) -> list[int]:
        """Batches still to compute, in order (a finished store has none)."""
        return [] if self.complete else [b for b in self.pending() if not self.batch_done(b)]

    def count_done(self) -> None:
        """Count the leading batches whose files exist as completed (in memory; the next ``meta.json``
        write records them), so a run resumes after batches another run's ranks wrote."""
        while not self.complete and self.completed < self.config.n_batches and self.batch_done(self.completed):
            self.completed += 1

    def _arrays(self, matrix: sp.csr_array) -> dict[str, np.ndarray]:
        matrix = matrix.copy()
        matrix.eliminate_zeros()
        matrix.sort_indices()
        arrays = {"indptr": matrix.indptr.astype(np.int64), "indices": matrix.indices.astype(np.int32)}
        if self.config.position == "all":
            arrays["counts"] = np.rint(matrix.data).astype(np.int32)
        return arrays

    def finalize(self) -> dict[int, str]:
        """Join the batches into one ``layer{n}.npz`` per layer, record their sha256 and drop the partial files."""
        if self.complete:
            return self._read_meta(self.meta_path)["files"]
        if self.completed != self.config.n_batches:
            raise ValueError(f"only {self.completed} of {self.config.n_batches} batches are done")
        hashes = {}
        for layer in self.config.layers:
            parts = [load_npz(self._batch_path(b, layer), _recovery(self.directory)) for b in range(self.config.n_batches)]
            offsets = np.cumsum([0] + [p["indptr"][-1] for p in parts[:-1]])
            joined = {
                "indptr": np.concatenate([[0]] + [p["indptr"][1:] + o for p, o in zip(parts, offsets)]).astype(np.int64),
                **{k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "indptr"},
            }
            data = npz_bytes(joined)
            atomic_write(self.directory / f"layer{layer}.npz", data, sweep=False)
            hashes[str(layer)] = hashlib.sha256(data).hexdigest()
        self.complete = True
        self._write_meta(hashes)
        remove_tree(self.directory / "partial")
        return hashes

    def _write_meta(self, files: Mapping[str, str]) -> None:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config.to_dict(),
            "completed_batches": self.completed,
            "complete": self.complete,
            "files": dict(files),
        }
        write_json(self.meta_path, meta, sort_keys=True, sweep=False)

    # ---- reading -------------------------------------------------------------------------------
    @staticmethod
    def _read_meta(path: Path) -> dict:
        recovery = _recovery(path.parent)
        meta = read_json(path, recovery)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path} is not a version-{VERSION} footprint store")
        for key, kind in (("config", dict), ("completed_batches", int), ("complete", bool), ("files", dict)):
            if not isinstance(meta.get(key), kind):
                raise DamagedFileError(path, f"field {key!r} is missing or not a {kind.__name__}", recovery)
        return meta

    @classmethod
    def open(cls, root: str | Path, benchmark: str) -> FootprintStore:
        """A finished store, for reading."""
        path = Path(root) / benchmark / "meta.json"
        if not path.exists():
            raise FileNotFoundError(f"no footprint store at {path.parent}")
        meta = cls._read_meta(path)
        if not meta["complete"]:
            done = meta["completed_batches"]
            raise ValueError(f"footprints in {path.parent} are incomplete ({done} batches done); resume the run")
        return cls(root, FootprintConfig.from_dict(meta["config"]))

    def footprints(self, layer: int) -> Footprints:
        """The stored footprints at ``layer``, checked against the recorded hash and shape."""
        if layer not in self.config.layers:
            raise ValueError(f"layer {layer} is not stored; stored layers: {list(self.config.layers)}")
        path = self.directory / f"layer{layer}.npz"
        expected = self._read_meta(self.meta_path)["files"].get(str(layer))
        if not path.exists():
            raise DamagedFileError(path, "missing", _recovery(self.directory))
        if expected is None or hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise DamagedFileError(path, "it does not match the sha256 recorded in meta.json", _recovery(self.directory))
        arrays = load_npz(path, _recovery(self.directory))
        indptr, indices = arrays["indptr"], arrays["indices"]
        if indptr.size != self.config.n_samples + 1 or indptr[-1] != indices.size:
            raise ValueError(f"{path} is inconsistent with {self.config.n_samples} samples")
        return Footprints(self.config, layer, indptr, indices, arrays.get("counts"))


def open_stores(root: str | Path, benchmarks: Sequence[str] | None = None) -> dict[str, FootprintStore]:
    """Every finished benchmark store under ``root`` (or the named ones), by benchmark name."""
    root = Path(root)
    names = benchmarks if benchmarks is not None else sorted(p.parent.name for p in root.glob("*/meta.json"))
    if not names:
        raise FileNotFoundError(f"no footprint stores under {root}")
    return {name: FootprintStore.open(root, name) for name in names}
