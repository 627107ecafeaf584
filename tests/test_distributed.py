"""Data-parallel runs (``torchrun``, gloo on CPU) give what one process gives, byte for byte, and resume.

On the bundled nano model: the footprint store, the feature index, ``eval-sae``'s metrics and a
``classify fit`` classifier from 2 and 3 ranks equal a single-process run of the same command (files
compared byte by byte, metrics as JSON text, so floats bit for bit). A rank SIGKILLed mid-run leaves
nothing counted as done; a rerun with another number of ranks (or one process) ends identical. Ranks
given different command lines, and a resume with other settings, are refused naming the keys.
Launches are few (each costs a Python start and a model load): one per scenario below.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qscope_plugins import distributed
from qscope_plugins.cli import main
from qscope_plugins.demo.assets import ASSETS, MODEL_DIR, SAE_DIR, corpus_generator

ROOT = Path(__file__).resolve().parents[1]
NANO = ["--model", str(ASSETS / MODEL_DIR), "--sae", str(ASSETS / SAE_DIR), "--k", "8", "--device", "cpu",
        "--no-progress"]
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun on POSIX only here")


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "QSCOPE_CRASH_AT")}
    return {**out, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def torchrun(n: int, *args: str, timeout: int = 600, **extra) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *args]
    return subprocess.run(command, env=env(**extra), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def drive(n: int, jobs: list[dict], out: Path) -> list[list[dict]]:
    """Run ``jobs`` (argv lists, optional crash) under one torchrun launch of ``n`` ranks; per rank, per job:
    exit status and stderr."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(out)}))
    done = torchrun(n, str(ROOT / "tests" / "_distributed_driver.py"), str(spec))
    ranks = [json.loads(p.read_text()) if (p := out / f"rank{r}.json").exists() else [] for r in range(n)]
    if not any(j.get("crash") for j in jobs):
        assert done.returncode == 0, done.stderr[-3000:]
    return ranks


# ---- the jobs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    gen = corpus_generator()
    docs = [d.text for d in gen.documents(310, 14)]
    (root / "bench.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    (root / "texts.txt").write_text("\n".join(docs) + "\n")
    (root / "pos.txt").write_text("\n".join(d.text for d in gen.documents(911, 7, lang="B")) + "\n")
    (root / "neg.txt").write_text("\n".join(d.text for d in gen.documents(912, 7, lang="A")) + "\n")
    return root


def jobs(inputs: Path, out: Path) -> dict[str, list[str]]:
    """Each job's command line, writing under ``out`` (7 batches of 2 texts, or 4 of 4 for classify)."""
    return {
        "footprint": ["footprint", *NANO, "--layers", "2,3", "--benchmark", f"bench={inputs / 'bench.jsonl'}",
                      "--id-field", "id", "--position", "all", "--batch-size", "2", "--store", str(out / "store")],
        "index": ["index", "--layers", "2,3", "--data", str(inputs / "texts.txt"), "--output-dir", str(out / "index"),
                  "--batch-size", "2", "--device", "cpu", "--no-progress"],
        "eval-sae": ["eval-sae", *NANO, "--layers", "2,3", "--data", str(inputs / "texts.txt"), "--batch-size", "2",
                     "--output", str(out / "eval.json")],
        "classify": ["classify", "fit", *NANO, "--layers", "2,3", "--pos", str(inputs / "pos.txt"), "--neg",
                     str(inputs / "neg.txt"), "--batch-size", "4", "--top", "2", "--output", str(out / "clf.json")],
    }


def swap(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def outputs(out: Path) -> dict[str, object]:
    return {"footprint": tree(out / "store"), "index": tree(out / "index"),
            "eval-sae": (out / "eval.json").read_bytes(), "classify": (out / "clf.json").read_bytes()}


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    """Every job run by one plain process (no launcher), the reference."""
    out = tmp_path_factory.mktemp("single")
    for argv in jobs(inputs, out).values():
        assert main(argv) == 0
    return outputs(out)


# ---- 1 vs 2 vs 3 ranks, kills, resumes ----------------------------------------------------------------
def test_two_ranks_equal_one_process_and_a_killed_rank_resumes_in_one_process(inputs, single, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "two"
    argv = jobs(inputs, out)
    changed = swap(argv["footprint"], "--position", "last")
    listed = [{"argv": argv[name]} for name in ("footprint", "eval-sae", "classify")]
    listed += [{"argv": changed},  # a resume with other settings: refused on every rank, nothing changed
               {"argv": argv["index"], "crash": {"rank": 0, "at": 4 * 4 + 2}}]  # rank 0 dies inside its first batch
    ranks = drive(2, listed, tmp_path / "driver")
    for rank in ranks:
        assert [r["rc"] for r in rank[:4]] == [0, 0, 0, 1], rank
        assert rank[3]["stderr"].strip().endswith(
            "holds footprints computed with a different position; use another directory or overwrite it")
    assert len(ranks[0]) == 4  # rank 0 died in the index job
    got = {name: value for name, value in outputs_without_index(out).items()}
    assert got == {name: single[name] for name in got}
    # the killed index: no batch counted, leftovers only; one process resumes it to the same bytes
    meta = json.loads((out / "index" / "meta.json").read_text())
    assert meta["completed_batches"] == 0 and not meta["complete"]
    assert main(argv["index"]) == 0
    assert tree(out / "index") == single["index"]


def outputs_without_index(out: Path) -> dict[str, object]:
    return {"footprint": tree(out / "store"), "eval-sae": (out / "eval.json").read_bytes(),
            "classify": (out / "clf.json").read_bytes()}


def test_a_rank_killed_mid_footprint_then_three_ranks_resume_to_the_same_bytes(inputs, single, tmp_path):
    out = tmp_path / "three"
    argv = jobs(inputs, out)
    # QSCOPE_CRASH_RANK keeps the env crash point on rank 1 only: it dies writing its second batch file
    killed = torchrun(2, "-m", "qscope_plugins", *argv["footprint"], QSCOPE_CRASH_AT="5", QSCOPE_CRASH_RANK="1")
    assert killed.returncode != 0
    assert f"exitcode  : {-signal.SIGKILL}" in killed.stderr and "rank      : 1" in killed.stderr
    store = out / "store" / "bench"
    meta = json.loads((store / "meta.json").read_text())
    assert meta["completed_batches"] == 0 and not meta["complete"]
    assert not (store / "partial" / "batch000001.layer3.npz").exists()  # rank 1's first batch was cut short
    ranks = drive(3, [{"argv": argv[name]} for name in ("footprint", "index", "eval-sae", "classify")],
                  tmp_path / "driver")
    assert all(r["rc"] == 0 for rank in ranks for r in rank), ranks
    assert outputs(out) == single


def test_ranks_given_different_command_lines_are_refused_naming_the_options(inputs, tmp_path):
    argv = jobs(inputs, tmp_path)["footprint"]
    port = str(free_port())
    procs = []
    for rank, position in enumerate(("all", "any")):
        mine = swap(argv, "--position", position)
        rank_env = env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "qscope_plugins", *mine], env=rank_env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2, err
        assert err.strip().splitlines()[-1] == (
            "qscope footprint: error: the ranks of this run disagree on the footprint command-line settings "
            "position (rank 1 differs from rank 0); launch every rank with the same command and inputs")
    assert not (tmp_path / "store").exists()


# ---- the plumbing, without a launcher ---------------------------------------------------------------
def test_world_from_the_environment_and_the_shares(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.read_world() == distributed.SINGLE and not distributed.SINGLE.parallel
    with distributed.launched() as world:
        assert world is distributed.SINGLE and world.gather(3) == [3] and world.broadcast("x") == "x"
        assert world.main_first(lambda: 7) == 7
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "6")
    with pytest.raises(ValueError, match="inconsistent launcher environment: WORLD_SIZE=4, RANK=6"):
        distributed.read_world()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    world = distributed.read_world()
    assert (world.rank, world.size, world.local_rank, world.local_size) == (2, 4, 0, 2)
    assert world.share(list(range(10))) == [2, 6]
    shares = [distributed.World(rank=r, size=3).share(list(range(7))) for r in range(3)]
    assert sorted(b for s in shares for b in s) == list(range(7)) and shares[0] == [0, 3, 6]


def test_each_rank_gets_its_own_device_and_gpus(monkeypatch):
    import torch

    world = distributed.World(rank=5, size=8, local_rank=1, local_size=4)
    assert distributed.rank_device("cpu", world) == "cpu" and distributed.rank_device("cuda:3", world) == "cuda:3"
    assert distributed.rank_device("auto", distributed.SINGLE) == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.rank_device("auto", world) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.rank_device("auto", world) == "cuda:1" and distributed.rank_device("cuda", world) == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"LOCAL_RANK 1 has no GPU of its own: 1 CUDA device\(s\) are visible; "
                                         r"launch at most 1 processes per node"):
        distributed.rank_device("auto", world)
    assert distributed.rank_gpus(world, 2, 8) == [2, 3]
    with pytest.raises(ValueError, match="needs GPUs 6..7, but 6 are visible; launch at most 3 processes per node"):
        distributed.rank_gpus(distributed.World(rank=3, size=4, local_rank=3, local_size=4), 2, 6)


def test_errors_cross_ranks_as_one_line_of_the_same_kind():
    from qscope_plugins.cli._options import UsageError

    usage = distributed._rebuilt(distributed._portable(UsageError("bad --layers")), 0)
    assert type(usage) is UsageError and str(usage) == "bad --layers"
    damaged = distributed._rebuilt(distributed._portable(distributed.RankFailed("x")), 2)
    assert str(damaged) == "rank 2 failed: RankFailed: x"
    from qscope_plugins._io import DamagedFileError

    value = distributed._rebuilt(distributed._portable(DamagedFileError("/m.json", "truncated", "rerun")), 1)
    assert type(value) is ValueError and str(value) == "/m.json is damaged (truncated); rerun"
