"""Every notebook in tutorials/ runs headless, offline, top to bottom, without a cell error.

The tutorials are the README's promise that each recipe works on the shipped nano model in minutes on a
CPU, so CI executes them as a user would: a fresh ``python3`` kernel of this interpreter, the repository root
importable, and the Hugging Face hub switched off. Outputs are discarded; the notebooks assert their own
results (framework parity, round-trips) in their cells.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def kernel_of_this_interpreter(jupyter_dir: Path) -> Path:
    """A ``python3`` kernelspec running ``sys.executable``; put first on ``JUPYTER_PATH`` it shadows any
    user-wide ``python3`` kernel of another interpreter."""
    spec = jupyter_dir / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    return jupyter_dir


def test_tutorials_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "steering.ipynb", "benchmark_redundancy.ipynb", "toxicity_classifier.ipynb"} <= names


def test_notebooks_are_saved_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_of_this_interpreter(tmp_path / "jupyter")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders plots headless
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing may come from the hub
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory: files land here
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:  # the message holds the cell and its traceback
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
