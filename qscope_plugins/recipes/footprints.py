"""Benchmark feature footprints through any backend, streamed into a resumable :class:`FootprintStore`.

A sample's footprint is the set of SAE features active at its last token (report Eq. 2; options:
any token, or all tokens with counts). Samples are rendered through a ``str.format`` template over
their fields, so ``"Question: {question}\\nAnswer:"`` works on JSONL records or a loaded HF dataset.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .._io import jsonl_values, output_lock
from ..backends import Backend
from ..distributed import SINGLE, World
from .capture import pooled_batches, sae_widths, tokenize
from .footprint_store import FootprintConfig, FootprintStore, content_hash

_MODE = {"last": "last", "any": "max", "all": "count"}


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file (one JSON object per non-blank line)."""
    path = Path(path)
    records = []
    for number, record in jsonl_values(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def render(
    samples: Iterable[Mapping | str], template: str = "{text}", id_field: str | None = None
) -> tuple[list[str], list[str]]:
    """``(sample ids, prompts)``: each sample (a record, or a string seen as ``{"text": s}``) formatted
    with ``template``. Ids come from ``id_field`` when given, else the sample's position."""
    ids, prompts = [], []
    for i, sample in enumerate(samples):
        record = {"text": sample} if isinstance(sample, str) else sample
        try:
            prompts.append(template.format(**record))
        except KeyError as err:
            raise ValueError(f"sample {i} has no field {err.args[0]!r} used by the template") from None
        if id_field is not None and id_field not in record:
            raise ValueError(f"sample {i} has no id field {id_field!r}")
        ids.append(str(record[id_field]) if id_field is not None else str(i))
    if not prompts:
        raise ValueError("no samples given")
    return ids, prompts


def _provenance(saes: Mapping[int, object]) -> tuple[str, str | None]:
    metadata = getattr(next(iter(saes.values())).cfg, "metadata", None)
    return str(getattr(metadata, "sae_source", None) or "unknown"), getattr(metadata, "sae_revision", None)


def extract_footprints(
    backend: Backend,
    saes: Mapping[int, object],
    samples: Sequence[Mapping | str],
    root: str | Path,
    benchmark: str,
    *,
    template: str = "{text}",
    id_field: str | None = None,
    position: str = "last",
    skip_first_token: bool = True,
    batch_size: int = 8,
    progress: bool = False,
    overwrite: bool = False,
    model: str | None = None,
    sae_source: str | None = None,
    sae_revision: str | None = None,
    world: World = SINGLE,
) -> FootprintStore:
    """Compute (or resume) ``benchmark``'s footprints at every layer of ``saes`` and return the finished store.

    All layers come from one forward pass per batch. Provenance defaults to the backend's model name and
    the SAEs' recorded source and revision. A run stopped at any point resumes from its last completed
    batch when called again with the same arguments, and ends with the same bytes on disk.

    With a data-parallel ``world`` (:mod:`qscope_plugins.distributed`) every rank calls this with the same
    arguments: rank 0 sets the store up and merges it, each rank computes its share of the batches (the
    same bytes as a single process, whatever the number of ranks; see docs/scaling.md).
    """
    if position not in _MODE:
        raise ValueError(f"position must be one of {', '.join(_MODE)}, got {position!r}")
    widths = sae_widths(backend, saes)
    if len(set(widths.values())) != 1:
        raise ValueError(f"all SAEs must have the same width, got {widths}")
    sample_ids, prompts = render(samples, template, id_field)
    recorded_source, recorded_revision = _provenance(saes)
    config = FootprintConfig(
        benchmark=benchmark,
        model=model or backend.model_name or "unknown",
        sae_source=sae_source or recorded_source,
        sae_revision=sae_revision or recorded_revision,
        layers=tuple(sorted(saes)),
        d_sae=next(iter(widths.values())),
        sample_ids=tuple(sample_ids),
        sample_hashes=tuple(content_hash(p) for p in prompts),
        template=template,
        position=position,
        skip_first_token=skip_first_token,
        batch_size=batch_size,
    )
    if world.parallel:
        return _extract_sharded(world, config, backend, saes, prompts, root, overwrite, progress)
    with output_lock(Path(root) / benchmark, what="footprint store"):
        store = FootprintStore(root, config, overwrite=overwrite)
        store.reconcile()
        store.count_done()
        _fill(store, backend, saes, prompts, position, skip_first_token, batch_size, progress, benchmark)
        store.finalize()
    return store


def _extract_sharded(world: World, config: FootprintConfig, backend, saes, prompts, root, overwrite, progress):
    """The data-parallel run: rank 0 holds the lock and sets up; every rank writes its batches' files;
    rank 0 checks that every batch is done and merges (the single-process finish, so the same bytes)."""
    world.agree("footprint", {**config.to_dict(), "overwrite": overwrite})
    with contextlib.ExitStack() as stack:

        def setup() -> list[int]:
            stack.enter_context(output_lock(Path(root) / config.benchmark, what="footprint store"))
            store = FootprintStore(root, config, overwrite=overwrite)
            store.reconcile()
            return store.undone()

        undone = world.main_first(setup)
        store = FootprintStore.attach(root, config)
        error = None
        try:
            mine = world.share(undone)
            rows = tokenize(backend, prompts)
            for batch, pooled in zip(mine, _batches_of(backend, saes, rows, mine, config, progress and world.is_main)):
                store.write_batch_files(batch, pooled)
        except Exception as err:
            error = err
        world.all_ok(error)

        def merge() -> None:
            merged = FootprintStore(root, config)
            merged.count_done()
            missing = merged.undone()
            if missing:
                raise RuntimeError(f"batches {missing[:5]} of {config.benchmark} were not written; rerun the command")
            merged.finalize()

        world.main_first(merge)
    return FootprintStore.open(root, config.benchmark)


def _batches_of(backend, saes, rows, batches, config: FootprintConfig, progress: bool):
    """Pooled codes of the given batches, each computed exactly as in a single-process run (same rows per
    forward pass): the batches' rows are streamed in order, and only the last batch may be short."""
    chosen = [i for b in batches for i in range(*config.batch_slice(b).indices(config.n_samples))]
    return pooled_batches(backend, saes, [rows[i] for i in chosen], mode=_MODE[config.position],
                          skip_first_token=config.skip_first_token, batch_size=config.batch_size,
                          progress=progress, desc=config.benchmark)


def _fill(store, backend, saes, prompts, position, skip_first_token, batch_size, progress, benchmark) -> None:
    config = store.config
    pending = store.pending()
    if pending:
        rows = tokenize(backend, prompts)[config.batch_slice(pending.start).start :]
        batches = pooled_batches(
            backend,
            saes,
            rows,
            mode=_MODE[position],
            skip_first_token=skip_first_token,
            batch_size=batch_size,
            progress=progress,
            desc=benchmark,
        )
        for batch, pooled in zip(pending, batches):
            store.write_batch(batch, pooled)


def read_scores(path: str | Path, sample_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``(models, models x samples matrix)`` of per-sample scores, aligned to ``sample_ids``.

    ``.json``: ``{model: [score per sample, in benchmark order]}`` or ``{model: {sample_id: score}}``.
    ``.csv``: long format with a header naming ``model``, ``sample_id`` and ``score`` columns.
    Every model needs a score for every sample.
    """
    path = Path(path)
    if path.suffix == ".json":
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object mapping model names to scores")
        short = sorted(m for m, v in raw.items() if not isinstance(v, dict) and len(v) != len(sample_ids))
        if short:
            raise ValueError(f"{path}: models {short} do not have one score per sample ({len(sample_ids)})")
        table = {m: v if isinstance(v, dict) else dict(zip(sample_ids, v)) for m, v in raw.items()}
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"model", "sample_id", "score"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            table = {}
            for row in reader:
                table.setdefault(row["model"], {})[row["sample_id"]] = float(row["score"])
    else:
        raise ValueError(f"{path}: scores must be a .json or .csv file")
    models = sorted(table)
    matrix = np.full((len(models), len(sample_ids)), np.nan)
    for i, model in enumerate(models):
        scores = {str(k): v for k, v in table[model].items()}
        absent = [s for s in sample_ids if s not in scores]
        if absent:
            raise ValueError(f"{path}: model {model!r} has no score for {len(absent)} samples (first: {absent[0]!r})")
        matrix[i] = [float(scores[s]) for s in sample_ids]
    return models, matrix
