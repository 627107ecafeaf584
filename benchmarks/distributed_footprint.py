"""The nano footprint job on 1 and 2 CPU processes (``torchrun``, gloo): wall time, ratio, same bytes (issue 21).

    python benchmarks/distributed_footprint.py                   # 256 nano-corpus documents, all tokens
    python benchmarks/distributed_footprint.py --docs 1024 --nproc 2 4

Each configuration runs the real command (``python -m qscope_plugins footprint ...`` alone, then under
``python -m torch.distributed.run --nproc_per_node N``), one thread per process, interleaved over
``--repeats`` (best kept). A one-document run of each configuration measures the fixed cost (Python
start, imports, model load, process group), so the report gives both the whole-command ratio and the
ratio net of that fixed cost. Every store is checked byte-identical to the single-process one. On a
2-core machine expect little gain: the point is correctness; docs/scaling.md turns these figures into
a cost model for GPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=256, help="nano-corpus documents (samples)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="process counts to compare with one")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--position", default="all", choices=("last", "any", "all"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from qscope_plugins.demo.assets import ASSETS, MODEL_DIR, SAE_DIR, corpus_generator

    work = Path(tempfile.mkdtemp(prefix="qscope-dist-bench-"))
    docs = [d.text for d in corpus_generator().documents(4242, args.docs)]
    for name, texts in (("full", docs), ("one", docs[:1])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    from transformers import AutoTokenizer

    n_tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(str(ASSETS / MODEL_DIR))(docs)["input_ids"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}

    def command(nproc: int, data: str, store: Path) -> list[str]:
        job = ["-m", "qscope_plugins", "footprint", "--model", str(ASSETS / MODEL_DIR), "--sae", str(ASSETS / SAE_DIR),
               "--k", "8", "--layers", "0-3", "--benchmark", f"bench={work / (data + '.jsonl')}", "--position",
               args.position, "--batch-size", str(args.batch_size), "--device", "cpu", "--no-progress",
               "--store", str(store)]
        if nproc == 1:
            return [sys.executable, *job]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), *job]

    counts = [1, *args.nproc]
    best = {(n, data): float("inf") for n in counts for data in ("full", "one")}
    stores: dict[int, str] = {}
    for _ in range(args.repeats):
        for n in counts:
            for data in ("one", "full"):
                store = work / f"store{n}{data}"
                shutil.rmtree(store, ignore_errors=True)
                start = time.perf_counter()
                subprocess.run(command(n, data, store), env=env, check=True, capture_output=True)
                best[n, data] = min(best[n, data], time.perf_counter() - start)
                if data == "full":
                    stores[n] = digest(store)
    shutil.rmtree(work, ignore_errors=True)
    single, fixed = best[1, "full"], best[1, "one"]
    report = {
        "device": f"cpu, {os.cpu_count()} cores, one thread per process",
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "job": {"docs": args.docs, "tokens": n_tokens, "layers": 4, "position": args.position,
                "batch_size": args.batch_size},
        "seconds": {str(n): round(best[n, "full"], 2) for n in counts},
        "fixed_seconds": {str(n): round(best[n, "one"], 2) for n in counts},
        "tokens_per_s_net_single": round(n_tokens / max(single - fixed, 1e-9), 1),
        "speedup_whole_command": {str(n): round(single / best[n, "full"], 3) for n in args.nproc},
        "speedup_net_of_fixed_cost": {
            str(n): round((single - fixed) / max(best[n, "full"] - best[n, "one"], 1e-9), 3) for n in args.nproc},
        "stores_identical": len(set(stores.values())) == 1,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
