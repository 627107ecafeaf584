"""The footprint store: round trip, byte-identical resume after interruption, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from qscope_plugins.recipes.footprint_store import FootprintConfig, FootprintStore, content_hash, open_stores

D_SAE = 500
N = 23


def make_config(**overrides) -> FootprintConfig:
    texts = [f"question {i}" for i in range(N)]
    base = dict(
        benchmark="gsm8k",
        model="tiny/qwen3",
        sae_source="tiny/sae",
        sae_revision="r1",
        layers=(1, 3),
        d_sae=D_SAE,
        sample_ids=tuple(f"id{i}" for i in range(N)),
        sample_hashes=tuple(content_hash(t) for t in texts),
        template="Q: {text}\nA:",
        batch_size=5,
    )
    return FootprintConfig(**{**base, **overrides})


def planted_rows(config: FootprintConfig, seed: int = 0) -> dict[int, sp.csr_array]:
    """Deterministic per-layer footprints (random active sets with token counts)."""
    rng = np.random.default_rng(seed)
    return {
        layer: sp.csr_array(np.where(rng.random((N, D_SAE)) < 0.02, rng.integers(1, 9, (N, D_SAE)), 0))
        for layer in config.layers
    }


def run(root: Path, config: FootprintConfig, rows, stop_after: int | None = None) -> FootprintStore:
    store = FootprintStore(root, config)
    for batch in store.pending():
        if stop_after is not None and batch == stop_after:
            return store
        span = config.batch_slice(batch)
        store.write_batch(batch, {layer: m[span] for layer, m in rows.items()})
    store.finalize()
    return store


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("position", ["last", "all"])
def test_round_trip(tmp_path, position):
    config = make_config(position=position)
    rows = planted_rows(config)
    run(tmp_path, config, rows)
    store = FootprintStore.open(tmp_path, "gsm8k")
    assert store.config == config
    for layer in config.layers:
        prints = store.footprints(layer)
        expected = rows[layer]
        assert [s.tolist() for s in prints.sets()] == [expected[[i]].indices.tolist() for i in range(N)]
        if position == "all":
            np.testing.assert_array_equal(prints.matrix().toarray(), expected.toarray())
        else:
            assert prints.counts is None
    assert sorted(p.name for p in (tmp_path / "gsm8k").iterdir()) == ["layer1.npz", "layer3.npz", "meta.json"]
    with np.load(tmp_path / "gsm8k" / "layer1.npz", allow_pickle=False) as archive:
        assert archive["indices"].dtype == np.int32


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, monkeypatch):
    config = make_config(position="all")
    rows = planted_rows(config)
    run(tmp_path / "straight", config, rows)

    interrupted = tmp_path / "interrupted"
    first = run(interrupted, config, rows, stop_after=2)
    assert first.completed == 2 and not (interrupted / "gsm8k" / "layer1.npz").exists()

    # Crash after a batch's files are written but before meta.json records it.
    def crash(self, files):
        raise KeyboardInterrupt

    second = FootprintStore(interrupted, config)
    assert list(second.pending()) == [2, 3, 4]
    monkeypatch.setattr(FootprintStore, "_write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        second.write_batch(2, {layer: m[config.batch_slice(2)] for layer, m in rows.items()})
    monkeypatch.undo()
    assert json.loads((interrupted / "gsm8k" / "meta.json").read_text())["completed_batches"] == 2

    resumed = run(interrupted, config, rows)
    assert resumed.complete
    assert tree_bytes(interrupted / "gsm8k") == tree_bytes(tmp_path / "straight" / "gsm8k")
    assert run(interrupted, config, rows).finalize() == resumed.finalize()  # finished: nothing left to do


def test_mismatched_resume_and_bad_batches(tmp_path):
    config = make_config()
    rows = planted_rows(config)
    run(tmp_path, config, rows, stop_after=1)
    with pytest.raises(ValueError, match="holds footprints computed with a different sae_revision, template; "):
        FootprintStore(tmp_path, make_config(template="{text}", sae_revision="r2"))
    store = FootprintStore(tmp_path, config)
    with pytest.raises(ValueError, match="^expected batch 1 next, got batch 3$"):
        store.write_batch(3, rows)
    with pytest.raises(ValueError, match=r"^batch 1 layer 1 has shape \(23, 500\), expected \(5, 500\)$"):
        store.write_batch(1, rows)
    with pytest.raises(ValueError, match=r"^batch 1 has layers \[1\], expected \[1, 3\]$"):
        store.write_batch(1, {1: rows[1][5:10]})
    with pytest.raises(ValueError, match="^only 1 of 5 batches are done$"):
        store.finalize()
    with pytest.raises(ValueError, match=r"are incomplete \(1 batches done\); resume the run$"):
        FootprintStore.open(tmp_path, "gsm8k")
    fresh = FootprintStore(tmp_path, make_config(template="{text}"), overwrite=True)
    assert list(fresh.pending()) == [0, 1, 2, 3, 4]


def test_tampered_file_and_bad_config(tmp_path):
    config = make_config()
    run(tmp_path, config, planted_rows(config))
    stores = open_stores(tmp_path)
    assert list(stores) == ["gsm8k"]
    path = tmp_path / "gsm8k" / "layer3.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"layer3.npz is damaged \(it does not match the sha256 recorded in meta.json\); recover by rerunning with --overwrite"):
        stores["gsm8k"].footprints(3)
    with pytest.raises(ValueError, match=r"^layer 2 is not stored; stored layers: \[1, 3\]$"):
        stores["gsm8k"].footprints(2)
    with pytest.raises(ValueError, match=r"^benchmark name '\.\./x' must match"):
        make_config(benchmark="../x")
    with pytest.raises(ValueError, match="^position must be one of last, any, all, got 'first'$"):
        make_config(position="first")
    with pytest.raises(FileNotFoundError, match="^no footprint stores under"):
        open_stores(tmp_path / "empty")
