"""A sparse, resumable on-disk index of SAE activations over a corpus: the input of feature pages.

One pass over the corpus stores every non-zero Top-k activation (token, feature, value) per layer,
never a tokens x d_sae tensor; the finished index is feature-major (CSC), so the activations of
one feature are a contiguous slice and a page for any feature is cheap. Layout::

    <out>/meta.json            configuration, provenance, progress, final file hashes
    <out>/tokens.npz           corpus token ids (``tokens``) and document offsets (``offsets``)
    <out>/vocab.json           the raw bytes (hex) of every token id
    <out>/effects.npz          per layer: logit effects and nearest features by decoder cosine
    <out>/layer{n}.npz         per feature ``f``: ``token[indptr[f]:indptr[f+1]]`` and ``value[...]``
    <out>/partial/             one file per completed batch while running

It keeps the footprint store's conventions (:mod:`.footprint_store`): everything is validated before
the first write, each completed batch is written atomically before ``meta.json`` records it (an
interrupted run resumes after the last recorded batch and a resumed run writes the same bytes),
archives hold no pickled objects and each final file's sha256 is checked on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..backends import Backend
from ..distributed import SINGLE, World
from .capture import context_limit, sae_widths
from .._io import atomic_write, clean_leftovers, load_npz, npz_bytes, output_lock, remove_tree, write_json

FORMAT = "qscope-feature-index"
VERSION = 1
N_EFFECTS = 10  # tokens per logit-effect list, neighbours per feature


@dataclass(frozen=True)
class IndexConfig:
    """Everything that determines an index; a resumed run must match it exactly."""

    model: str
    sae_source: str
    layers: tuple[int, ...]
    d_sae: int
    k: int
    n_docs: int
    n_tokens: int
    data_hash: str
    """sha256 of the corpus token ids and document offsets."""
    skip_first_token: bool = True
    """Position 0 of every document is not indexed (its residual norm is extreme)."""
    max_tokens: int = 256
    """Documents are cut to this many tokens."""
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be a non-empty list without repeats, got {list(self.layers)}")
        if self.batch_size < 1 or self.max_tokens < 2 or self.n_docs < 1:
            raise ValueError("batch_size must be >= 1, max_tokens >= 2 and the corpus non-empty")
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))

    @property
    def n_batches(self) -> int:
        return -(-self.n_docs // self.batch_size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> IndexConfig:
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise ValueError(f"index metadata lacks fields: {', '.join(missing)}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def tokenize_corpus(backend: Backend, texts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tokens, offsets, n_cut)``: every text's ids (cut to ``max_tokens``) concatenated, doc starts."""
    limit = min(max_tokens, context_limit(backend) or max_tokens)
    rows = backend.encode(list(texts))
    cut = sum(len(r) > limit for r in rows)
    rows = [r[:limit] for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1])), offsets, cut


def _data_hash(tokens: np.ndarray, offsets: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    digest.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    return digest.hexdigest()


def vocab_hex(tokenizer) -> list[str]:
    """Every token's raw bytes, hex-encoded: contexts render byte-exactly without the tokenizer."""
    from .token_text import token_bytes

    return [b.hex() for b in token_bytes(tokenizer, len(tokenizer))]


@torch.no_grad()
def feature_effects(sae, head, n: int = N_EFFECTS, budget: int = 2**25) -> dict[str, np.ndarray]:
    """Per feature: the ``n`` tokens whose logits its decoder direction raises / lowers most (through the
    model's final norm and unembedding, ``head``), and its ``n`` nearest features by decoder cosine.

    Features are taken in chunks of at most ``budget`` logits or cosines at once (128 MiB in float32)."""
    W = sae.W_dec.detach().float()  # (d_sae, d_model): row j is feature j's direction
    unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    vocab = head(W[:1].unsqueeze(0)).shape[-1]
    chunk = max(1, min(1024, budget // max(vocab, W.shape[0])))
    out: dict[str, list[np.ndarray]] = {key: [] for key in ("up_ids", "up", "down_ids", "down", "nbr_ids", "nbr_cos")}
    for start in range(0, W.shape[0], chunk):
        rows = W[start : start + chunk]
        logits = head(rows.unsqueeze(0)).squeeze(0).float()
        logits = logits - logits.mean(-1, keepdim=True)  # a shift common to every token is no effect
        up, down = logits.topk(n, dim=-1), (-logits).topk(n, dim=-1)
        cos = unit[start : start + chunk] @ unit.T
        cos[torch.arange(rows.shape[0]), torch.arange(start, start + rows.shape[0])] = -2.0  # not itself
        near = cos.topk(min(n, W.shape[0] - 1), dim=-1)
        for key, value in (("up_ids", up.indices), ("up", up.values), ("down_ids", down.indices),
                           ("down", -down.values), ("nbr_ids", near.indices), ("nbr_cos", near.values)):
            out[key].append(value.cpu().numpy())
    return {key: np.concatenate(parts).astype(np.int32 if key.endswith("ids") else np.float32)
            for key, parts in out.items()}


class FeatureIndex:
    """A finished (or, for resuming, partial) index on disk; :func:`build_index` writes one."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.meta_path = self.directory / "meta.json"
        meta = self._read_meta()
        self.config = IndexConfig.from_dict(meta["config"])
        self.meta = meta
        self._layers: dict[int, dict[str, np.ndarray]] = {}
        self._effects: dict[str, np.ndarray] | None = None
        self._tokens: dict[str, np.ndarray] | None = None
        self._vocab: list[bytes] | None = None

    # ---- reading -------------------------------------------------------------------------------
    def _read_meta(self) -> dict:
        if not self.meta_path.is_file():
            raise FileNotFoundError(f"no feature index at {self.directory} (missing meta.json); build one with qscope index")
        meta = json.loads(self.meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{self.meta_path} is not a version-{VERSION} feature index")
        return meta

    @classmethod
    def open(cls, directory: str | Path) -> FeatureIndex:
        """A finished index, for reading."""
        index = cls(directory)
        if not index.meta["complete"]:
            done, total = index.meta["completed_batches"], index.config.n_batches
            raise ValueError(f"the index in {directory} is incomplete ({done} of {total} batches); resume qscope index")
        return index

    def _checked(self, name: str) -> dict[str, np.ndarray]:
        path = self.directory / name
        expected = self.meta["files"].get(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the index")
        if expected is None or hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise ValueError(f"{path} does not match the hash recorded in meta.json")
        return load_npz(path, _recovery(self.directory))

    def layer(self, layer: int) -> dict[str, np.ndarray]:
        """``indptr`` (d_sae + 1), ``token`` and ``value``: feature f's activations are a slice."""
        if layer not in self.config.layers:
            raise ValueError(f"layer {layer} is not in the index; indexed layers: {list(self.config.layers)}")
        if layer not in self._layers:
            arrays = self._checked(f"layer{layer}.npz")
            if arrays["indptr"].size != self.config.d_sae + 1 or arrays["indptr"][-1] != arrays["token"].size:
                raise ValueError(f"layer{layer}.npz is inconsistent with d_sae={self.config.d_sae}")
            self._layers[layer] = arrays
        return self._layers[layer]

    @property
    def tokens(self) -> np.ndarray:
        return self._corpus()["tokens"]

    @property
    def offsets(self) -> np.ndarray:
        return self._corpus()["offsets"]

    def _corpus(self) -> dict[str, np.ndarray]:
        if self._tokens is None:
            self._tokens = self._checked("tokens.npz")
        return self._tokens

    @property
    def effects(self) -> dict[str, np.ndarray]:
        if self._effects is None:
            self._effects = self._checked("effects.npz")
        return self._effects

    @property
    def vocab(self) -> list[bytes]:
        """Each token id's raw bytes (see :mod:`.token_text`)."""
        if self._vocab is None:
            path = self.directory / "vocab.json"
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != self.meta["files"].get("vocab.json"):
                raise ValueError(f"{path} does not match the hash recorded in meta.json")
            self._vocab = [bytes.fromhex(h) for h in json.loads(data)]
        return self._vocab

    @property
    def indexed_tokens(self) -> int:
        """Tokens whose activations were recorded (the first token of each document is not, by default)."""
        return self.config.n_tokens - (self.config.n_docs if self.config.skip_first_token else 0)

    def activations(self, layer: int, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """Feature ``feature``'s non-zero activations: global token positions (sorted) and values."""
        if not 0 <= feature < self.config.d_sae:
            raise ValueError(f"feature {feature} out of range [0, {self.config.d_sae})")
        arrays = self.layer(layer)
        lo, hi = int(arrays["indptr"][feature]), int(arrays["indptr"][feature + 1])
        return arrays["token"][lo:hi], arrays["value"][lo:hi]

    def explanation_path(self, layer: int, feature: int) -> Path:
        return self.directory / "explanations" / f"layer{layer}" / f"{feature}.json"

    def explanation(self, layer: int, feature: int) -> dict | None:
        path = self.explanation_path(layer, feature)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---- building ----------------------------------------------------------------------------------
def _write_meta(directory: Path, config: IndexConfig, completed: int, complete: bool, files: Mapping, extra: Mapping):
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "completed_batches": completed,
            "complete": complete, "files": dict(files), **extra}
    write_json(directory / "meta.json", meta, sort_keys=True)


def _write_npz(directory: Path, name: str, arrays: Mapping[str, np.ndarray], files: dict) -> None:
    data = npz_bytes(arrays)
    atomic_write(directory / name, data)
    files[name] = hashlib.sha256(data).hexdigest()


def build_index(
    backend: Backend,
    saes: Mapping[int, object],
    texts: Sequence[str],
    out: str | Path,
    *,
    model: str,
    sae_source: str,
    skip_first_token: bool = True,
    max_tokens: int = 256,
    batch_size: int = 16,
    extra: Mapping | None = None,
    progress: bool = False,
    world: World = SINGLE,
) -> FeatureIndex:
    """Index ``texts`` at every layer of ``saes`` (``{layer: QwenScopeSAE}``) into ``out``; resumes.

    ``extra`` is provenance stored in ``meta.json`` (e.g. the data source, Neuronpedia ids). An
    existing index in ``out`` built from another configuration is an error, never overwritten. With a
    data-parallel ``world`` every rank calls this alike and the batches are shared out
    (:mod:`qscope_plugins.distributed`); the index has the same bytes whatever the number of ranks.
    """
    widths = sae_widths(backend, saes)
    if len(set(widths.values())) != 1:
        raise ValueError(f"every layer's SAE must have the same width, got {widths}")
    texts = list(texts)
    if not texts:
        raise ValueError("the corpus holds no texts")
    tokens, offsets, n_cut = tokenize_corpus(backend, texts, max_tokens)
    layers = sorted(saes)
    config = IndexConfig(model, str(sae_source), tuple(layers), next(iter(widths.values())),
                         int(next(iter(saes.values())).cfg.k), len(texts), int(tokens.size),
                         _data_hash(tokens, offsets), skip_first_token, max_tokens, batch_size)
    directory = Path(out)
    extra = {"provenance": dict(extra or {}), "truncated_docs": n_cut}
    rows = [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))]
    if world.parallel:
        return _build_sharded(world, backend, saes, rows, tokens, offsets, config, directory, extra, progress)
    with output_lock(directory, what="feature index"):
        state = _prepare(backend, saes, tokens, offsets, config, directory, extra)
        if state is None:
            return FeatureIndex.open(directory)
        completed, files = state
        while completed < config.n_batches and _batch_path(directory, completed).is_file():
            completed += 1  # written by the ranks of a data-parallel run: done (atomic files), counted below
        from tqdm.auto import tqdm

        for b in tqdm(range(completed, config.n_batches), desc="indexing", unit="batch", disable=not progress):
            _index_batch(backend, saes, rows, offsets, config, b, directory)
            _write_meta(directory, config, b + 1, False, files, extra)
        _finish(directory, config, files, extra)
        return FeatureIndex.open(directory)


def _prepare(backend, saes, tokens, offsets, config: IndexConfig, directory: Path, extra: Mapping):
    """Under the lock: clean up, check or start the index; ``(completed batches, files)`` or ``None``
    when the index is already complete."""
    clean_leftovers(directory)
    clean_leftovers(directory / "partial")
    if (directory / "meta.json").exists():
        stored = FeatureIndex(directory)
        if stored.config != config:
            changed = [f.name for f in fields(config) if getattr(stored.config, f.name) != getattr(config, f.name)]
            raise ValueError(f"{directory} holds an index built with a different {', '.join(changed)}; "
                             "use another --output-dir")
        if stored.meta["complete"]:
            remove_tree(directory / "partial")  # a run killed after its last meta write
            return None
        return int(stored.meta["completed_batches"]), dict(stored.meta["files"])
    if directory.exists() and (not directory.is_dir() or not _only_first_writes(directory)):
        raise ValueError(f"{directory} exists and is not a feature index; use an empty or new --output-dir")
    for leftover in directory.iterdir() if directory.is_dir() else ():  # a run killed before its first meta.json
        remove_tree(leftover) if leftover.is_dir() else leftover.unlink()
    layers = config.layers
    # computed before anything is written: a failure leaves no output
    effects = {f"l{n}_{key}": value for n in layers for key, value in feature_effects(saes[n], backend.logits).items()}
    vocab = json.dumps(vocab_hex(backend.tokenizer))
    (directory / "partial").mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    _write_npz(directory, "tokens.npz", {"tokens": tokens, "offsets": offsets}, files)
    atomic_write(directory / "vocab.json", vocab)
    files["vocab.json"] = hashlib.sha256(vocab.encode()).hexdigest()
    _write_npz(directory, "effects.npz", effects, files)
    _write_meta(directory, config, 0, False, files, extra)
    return 0, files


def _finish(directory: Path, config: IndexConfig, files: dict, extra: Mapping) -> None:
    for n in config.layers:
        _write_npz(directory, f"layer{n}.npz", _join_layer(directory, config, n), files)
    _write_meta(directory, config, config.n_batches, True, files, extra)
    remove_tree(directory / "partial")


def _batch_path(directory: Path, b: int) -> Path:
    return directory / "partial" / f"batch{b:06d}.npz"


def _build_sharded(world: World, backend, saes, rows, tokens, offsets, config: IndexConfig, directory: Path,
                   extra: Mapping, progress: bool) -> FeatureIndex:
    """The data-parallel build: rank 0 holds the lock, checks or starts the index; every rank writes
    its share of the batch files (a batch is done once its file exists); rank 0 merges as a single
    process finishes, so the index has the same bytes whatever the number of ranks."""
    world.agree("index", {**config.to_dict(), **extra})
    with contextlib.ExitStack() as stack:

        def setup():
            stack.enter_context(output_lock(directory, what="feature index"))
            state = _prepare(backend, saes, tokens, offsets, config, directory, extra)
            if state is None:
                return None
            return [b for b in range(state[0], config.n_batches) if not _batch_path(directory, b).is_file()]

        undone = world.main_first(setup)
        error = None
        try:
            from tqdm.auto import tqdm

            for b in tqdm(world.share(undone or []), desc="indexing", unit="batch", disable=not (progress and world.is_main)):
                _index_batch(backend, saes, rows, offsets, config, b, directory)
        except Exception as err:
            error = err
        world.all_ok(error)

        def merge() -> None:
            if undone is None:
                return
            meta = FeatureIndex(directory).meta
            missing = [b for b in range(meta["completed_batches"], config.n_batches) if not _batch_path(directory, b).is_file()]
            if missing:
                raise RuntimeError(f"batches {missing[:5]} of the index were not written; rerun the command")
            _finish(directory, config, dict(meta["files"]), extra)

        world.main_first(merge)
    return FeatureIndex.open(directory)


@torch.no_grad()
def _index_batch(backend, saes, rows, offsets, config: IndexConfig, b: int, directory: Path) -> None:
    start = b * config.batch_size
    chunk = rows[start : start + config.batch_size]
    arrays = {}
    for rb in backend.residuals(chunk, config.layers, batch_size=len(chunk)):
        mask = rb.token_mask(config.skip_first_token)
        # global token position of every kept (row, column): document offset + column
        cols = torch.arange(mask.shape[1]).expand_as(mask)
        starts = torch.as_tensor(offsets[start : start + len(chunk)], dtype=torch.long).unsqueeze(1)
        where = (starts + cols)[mask.cpu()]
        for n in config.layers:
            sae = saes[n]
            codes = sae.encode_sparse(rb.hidden[n][mask].to(sae.W_enc.device, torch.float32))
            values, ids = codes.values.cpu(), codes.indices.cpu()
            keep = values > 0
            arrays[f"l{n}_token"] = where.unsqueeze(1).expand_as(ids)[keep].numpy().astype(np.int64)
            arrays[f"l{n}_feature"] = ids[keep].numpy().astype(np.int32)
            arrays[f"l{n}_value"] = values[keep].numpy().astype(np.float32)
    atomic_write(_batch_path(directory, b), npz_bytes(arrays), sweep=False)  # ranks share partial/


_FIRST_WRITES = {"partial", "tokens.npz", "vocab.json", "effects.npz"}


def _only_first_writes(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but what a build writes before its first ``meta.json``."""
    return all(entry.name in _FIRST_WRITES for entry in directory.iterdir())


def _recovery(directory: Path) -> str:
    return f"recover by deleting {directory} and rerunning qscope index (or index into a new --output-dir)"


def _join_layer(directory: Path, config: IndexConfig, layer: int) -> dict[str, np.ndarray]:
    """All batches of one layer, sorted feature-major (then by token): the CSC arrays."""
    parts = [load_npz(directory / "partial" / f"batch{b:06d}.npz", _recovery(directory)) for b in range(config.n_batches)]
    token = np.concatenate([p[f"l{layer}_token"] for p in parts])
    feature = np.concatenate([p[f"l{layer}_feature"] for p in parts])
    value = np.concatenate([p[f"l{layer}_value"] for p in parts])
    order = np.lexsort((token, feature))
    counts = np.bincount(feature, minlength=config.d_sae)
    indptr = np.zeros(config.d_sae + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(counts)
    token_dtype = np.int32 if config.n_tokens < 2**31 else np.int64
    return {"indptr": indptr, "token": token[order].astype(token_dtype), "value": value[order]}
