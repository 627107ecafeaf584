"""Run several ``qscope`` commands in one ``torchrun`` launch (one process group serves them all).

``python -m torch.distributed.run ... tests/_distributed_driver.py SPEC.json``: SPEC holds ``jobs`` (each
``{"argv": [...], "crash": {"rank": r, "at": n}}``, crash optional) and ``out`` (a directory). Each rank
records every job's exit status and stderr in ``out/rank{r}.json`` as it goes; a job with ``crash``
SIGKILLs rank ``r`` right after its ``n``-th crash point (``qscope_plugins._io.arm_crash``).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qscope_plugins import _io
from qscope_plugins.cli import main


def run(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, results = dist.get_rank(), []
    try:
        for job in spec["jobs"]:
            crash = job.get("crash")
            _io.arm_crash(crash["at"] if crash and crash["rank"] == rank else 0)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                status = main(job["argv"])
            results.append({"rc": status, "stderr": err.getvalue()})
            _io.atomic_write(Path(spec["out"]) / f"rank{rank}.json", json.dumps(results))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1])
