"""Every resumable job survives a SIGKILL after any of its durable steps, and two runs never share an output.

The kill-at-every-step harness: a job first runs uninterrupted while ``qscope_plugins._io`` counts its
crash points (each write, fsync, rename and removal; N in all). Then, for every n in 1..N, a forked
child runs the job on a fresh output armed to SIGKILL itself right after step n; the parent checks the
child really died by SIGKILL, resumes the job on what was left, and compares every file under the
output's parent (names and bytes, hidden files included, so leftover temporary files, ``partial/``
directories and lock files all count as differences) with the uninterrupted run. Forking after the
imports keeps each kill at a few milliseconds. Protocols: docs/storage.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from qscope_plugins import QwenScopeSAE, _io
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.recipes.classifier import FeatureClassifier
from qscope_plugins.recipes.footprint_store import FootprintStore
from qscope_plugins.recipes.footprints import extract_footprints
from qscope_plugins.recipes.synthesis import Generators, Request, random_synthesis
from qscope_plugins.sae import convert as convert_module
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill harness forks")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (directories as None, files as their bytes)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def killed_after(step: int, job, out: Path) -> None:
    """Run ``job(out)`` in a forked child that SIGKILLs itself right after crash point ``step``."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            torch.set_num_threads(1)
            _io.arm_crash(step)
            job(out)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"step {step} was not reached"


def kill_at_every_step(job, tmp_path: Path) -> int:
    """The harness; returns the number of kill points (steps) covered. Every run uses the same path
    (outputs may record their own location), emptied in between."""
    root = tmp_path / "run"
    root.mkdir()
    _io.arm_crash(10**9)  # count only
    try:
        job(root / "out")
        steps = _io.steps_taken()
    finally:
        _io.arm_crash(0)
    expected = tree(root)
    assert steps > 0
    for step in range(1, steps + 1):
        shutil.rmtree(root)
        root.mkdir()
        killed_after(step, job, root / "out")
        job(root / "out")  # resume, unarmed
        assert tree(root) == expected, f"resume after a kill at step {step} of {steps} differs"
    return steps


# ---- the jobs, each tiny ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    backend = HFBackend(tiny_model("Qwen3ForCausalLM"), tiny_tokenizer())
    saes = {n: QwenScopeSAE.from_weights(**random_sae_state(64, 128, seed=n), k=8, layer=n) for n in (1, 3)}
    return backend, saes


def test_footprint_store_resumes_to_identical_bytes_after_a_kill_at_every_step(world, tmp_path):
    backend, saes = world
    samples = [f"sample number {i} about foxes" for i in range(5)]

    def job(out: Path) -> None:
        extract_footprints(backend, saes, samples, out, "bench", batch_size=3, position="all", model="tiny")

    steps = kill_at_every_step(job, tmp_path)
    # 4 steps per atomic file: meta, 2 x (2 batch files + meta), 2 layer files + meta, then partial/ removed (2)
    assert steps == 4 + 2 * (2 + 1) * 4 + (2 + 1) * 4 + 2


def test_convert_resumes_to_identical_bytes_after_a_kill_at_every_step(tmp_path):
    src = tmp_path / "SAE-Res-Tiny-W1K-L0_8"
    for n in (0, 1):
        write_released_layer(src, n, random_sae_state(16, 1024, seed=n))

    def job(out: Path) -> None:
        convert_module.convert(str(src), out, [0, 1], dtype=torch.bfloat16)

    (tmp_path / "runs").mkdir()
    assert kill_at_every_step(job, tmp_path / "runs") == 22  # per layer: 2 atomic files + the directory swap


def test_convert_applies_changed_settings_instead_of_keeping_the_old_ones(tmp_path, capsys):
    from qscope_plugins.cli import main

    src = tmp_path / "SAE-Res-Tiny-W1K-L0_8"
    write_released_layer(src, 0, random_sae_state(16, 1024, seed=0))
    assert main(["convert", str(src), str(tmp_path / "a"), "--layers", "0"]) == 0
    assert main(["convert", str(src), str(tmp_path / "a"), "--layers", "0", "--dtype", "bf16", "--k", "4"]) == 0
    assert "converted 1 layer(s)" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "b"), "--layers", "0", "--dtype", "bf16", "--k", "4"]) == 0
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert main(["convert", str(src), str(tmp_path / "a"), "--layers", "0", "--dtype", "bf16", "--k", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("a; already done: 0")


def test_convert_removes_temporary_directories_of_a_killed_run(tmp_path):
    src = tmp_path / "SAE-Res-Tiny-W1K-L0_8"
    write_released_layer(src, 0, random_sae_state(16, 1024, seed=0))
    out = tmp_path / "out"
    (out / ".layer0.abc123").mkdir(parents=True)  # what tempfile.mkdtemp left in earlier releases
    (out / ".layer0.abc123" / "sae_weights.safetensors").write_bytes(b"half")
    assert convert_module.convert(str(src), out, [0]) == [0]
    assert sorted(p.name for p in out.iterdir()) == ["layer0"]


def _prompter(request: Request) -> list[str]:
    return random.Random(request.seed).sample([f"question {i}?" for i in range(12)], 2)


def _responder(prompt: str, label: str, request: Request) -> str:
    return "no." if label == "harmful" else f"yes: {prompt}"


def test_synthesis_resumes_to_identical_bytes_after_a_kill_at_every_step(tmp_path):
    generators = Generators(_prompter, {}, _responder)

    def job(out: Path) -> None:
        out.mkdir(exist_ok=True)
        path = out / "synthetic.jsonl"
        resume = path.exists() or (out / "synthetic.jsonl.state.json").exists()
        random_synthesis(path, generators, budget=4, seed=3, resume=resume, clock=lambda: "2026-01-01T00:00:00+00:00")

    assert kill_at_every_step(job, tmp_path) == 4 + 4 * 2 + 2 * 4  # the state file, 4 records, 2 rounds


def test_sae_export_and_classifier_save_resume_to_identical_bytes(tmp_path):
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from qscope_plugins.recipes.sae_train import export_qwen_scope

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=64, k=5))
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))

    def export(out: Path) -> None:
        export_qwen_scope(sae, out / "SAE-Res-Tiny-W64-L0_5", 2)

    (tmp_path / "export").mkdir()
    assert kill_at_every_step(export, tmp_path / "export") == 4 + 11  # the layer file, then its conversion

    classifier = FeatureClassifier(features=(3, 9), deltas=(0.5, 0.25), layers=(1, 1), d_sae=64)

    def save(out: Path) -> None:
        out.mkdir(exist_ok=True)
        classifier.save(out / "classifier.json")

    (tmp_path / "classifier").mkdir()
    assert kill_at_every_step(save, tmp_path / "classifier") == 4


def test_damaged_files_say_damaged_name_themselves_and_give_the_recovery(world, tmp_path):
    backend, saes = world
    extract_footprints(backend, saes, ["a fox", "two foxes"], tmp_path, "bench", model="tiny")
    meta = tmp_path / "bench" / "meta.json"
    meta.write_bytes(meta.read_bytes()[:40])  # truncated
    with pytest.raises(_io.DamagedFileError) as err:
        extract_footprints(backend, saes, ["a fox", "two foxes"], tmp_path, "bench", model="tiny")
    assert str(err.value).startswith(f"{meta} is damaged (not valid JSON: ")
    assert str(err.value).endswith("; recover by rerunning with --overwrite (qscope footprint ... --overwrite, "
                                   "or overwrite=True), which recomputes bench from scratch")
    with pytest.raises(_io.DamagedFileError, match="meta.json is damaged"):
        FootprintStore.open(tmp_path, "bench")
    store = extract_footprints(backend, saes, ["a fox", "two foxes"], tmp_path, "bench", model="tiny", overwrite=True)
    assert store.footprints(1).indptr.size == 3


def test_a_killed_overwrite_leaves_nothing_behind(world, tmp_path):
    backend, saes = world
    extract_footprints(backend, saes, ["a fox"], tmp_path, "bench", model="tiny")
    alone = tree(tmp_path)
    aside = tmp_path / ".bench.999999.0badc0de.qscope-tmp"  # remove_tree renamed it, then the run was killed
    (aside / "partial").mkdir(parents=True)
    (tmp_path / ".bench2.1.0badc0de.qscope-tmp").mkdir()  # another benchmark's: not ours to remove
    extract_footprints(backend, saes, ["a fox"], tmp_path, "bench", model="tiny")
    assert not aside.exists() and (tmp_path / ".bench2.1.0badc0de.qscope-tmp").exists()
    (tmp_path / ".bench2.1.0badc0de.qscope-tmp").rmdir()
    assert tree(tmp_path) == alone


def test_changed_footprint_settings_are_refused_with_the_keys_named(world, tmp_path):
    backend, saes = world
    extract_footprints(backend, saes, ["a fox", "two foxes"], tmp_path, "bench", model="tiny")
    with pytest.raises(ValueError, match=r"holds footprints computed with a different position, batch_size; use another "
                                         "directory or overwrite it"):
        extract_footprints(backend, saes, ["a fox", "two foxes"], tmp_path, "bench", model="tiny", position="any",
                           batch_size=1)


# ---- two processes, one output --------------------------------------------------------------------
def forked(body) -> tuple[int, int]:
    """Run ``body(write)`` in a forked child; ``write(text)`` sends a line back. Returns (pid, read fd)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            torch.set_num_threads(1)
            body(lambda text: os.write(write, (text + "\n").encode()))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def lines(fd: int) -> list[str]:
    with os.fdopen(fd) as stream:
        return stream.read().splitlines()


def hold(output: Path, seconds: float):
    def body(say):
        with _io.output_lock(output, what="footprint store"):
            say("locked")
            time.sleep(seconds)
            say(f"released {time.time()}")
    pid, fd = forked(body)
    stream = os.fdopen(fd)
    assert stream.readline() == "locked\n"
    return pid, stream


def test_a_second_run_on_the_same_output_fails_fast_naming_the_holder(world, tmp_path):
    backend, saes = world
    pid, stream = hold(tmp_path / "bench", 30)
    try:
        start = time.monotonic()
        with pytest.raises(_io.OutputLocked) as err:
            extract_footprints(backend, saes, ["a fox"], tmp_path, "bench", model="tiny")
        assert time.monotonic() - start < 5
        assert str(err.value).startswith(
            f"{tmp_path / 'bench'} is in use by another run (pid {pid} on host {socket.gethostname()} (since ")
        assert str(err.value).endswith("wait for it to finish or stop it; two runs must not write the same footprint store")
        assert not (tmp_path / "bench").exists()  # nothing was written
        with pytest.raises(_io.OutputLocked):
            with _io.output_lock(tmp_path / "bench", wait=0.3):
                pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        stream.close()
    # the holder died by SIGKILL: its lock file stays, with its pid, and is taken over
    stale = json.loads(_io.lock_path(tmp_path / "bench").read_text())
    assert stale["pid"] == pid
    with _io.output_lock(tmp_path / "bench") as previous:
        assert previous["pid"] == pid
    assert not _io.lock_path(tmp_path / "bench").exists()
    store = extract_footprints(backend, saes, ["a fox"], tmp_path, "bench", model="tiny")
    assert store.complete


def test_a_waiting_run_proceeds_once_the_holder_is_done(tmp_path):
    pid, stream = hold(tmp_path / "out", 0.5)
    try:
        with _io.output_lock(tmp_path / "out", wait=30):
            acquired = time.time()
        released = float(stream.readline().split()[1])
        assert acquired >= released
    finally:
        os.waitpid(pid, 0)
        stream.close()


def test_two_concurrent_footprint_runs_one_writes_the_other_is_refused(world, tmp_path):
    backend, saes = world
    samples = [f"sample number {i} about foxes" for i in range(40)]
    go_read, go_write = os.pipe()

    def body(say):
        os.read(go_read, 1)  # both start together
        try:
            extract_footprints(backend, saes, samples, tmp_path / "store", "bench", batch_size=1, model="tiny")
            say("done")
        except _io.OutputLocked:
            say("locked")

    children = [forked(body) for _ in range(2)]
    os.write(go_write, b"xx")
    outcomes = sorted(line for pid, fd in children for line in lines(fd))
    for pid, _ in children:
        os.waitpid(pid, 0)
    assert outcomes == ["done", "locked"]
    extract_footprints(backend, saes, samples, tmp_path / "alone", "bench", batch_size=1, model="tiny")
    assert tree(tmp_path / "store") == tree(tmp_path / "alone")


def test_the_environment_variable_arms_the_crash_point_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    script = ("import sys; from qscope_plugins import _io; "
              "_io.atomic_write(sys.argv[1], b'first'); _io.atomic_write(sys.argv[1], b'second')")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "QSCOPE_CRASH_AT": "6"}
    target = tmp_path / "file.txt"
    done = subprocess.run([sys.executable, "-c", script, str(target)], env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"first"  # killed after the second write's fsync (4 + 2 steps), before its rename
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(_io.TMP_SUFFIX)]
    assert len(leftovers) == 1
    _io.atomic_write(target, b"third")  # the dead writer's temporary file is swept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_feature_index_resumes_to_identical_bytes_after_a_kill_at_every_step(world, tmp_path):
    from qscope_plugins.recipes.feature_index import build_index

    backend, saes = world
    texts = [f"text number {i} about owls and foxes" for i in range(5)]

    def job(out: Path) -> None:
        build_index(backend, saes, texts, out, model="tiny", sae_source="random", batch_size=3)

    steps = kill_at_every_step(job, tmp_path)
    # tokens, vocab, effects, meta; 2 x (batch file + meta); 2 layer files + meta; partial/ removed
    assert steps == 4 * 4 + 2 * 2 * 4 + 3 * 4 + 2
