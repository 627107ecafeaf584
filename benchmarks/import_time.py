"""Import cost of ``qscope_plugins`` and of the ``qscope`` command, side by side with ``import torch``.

Every case runs in a fresh interpreter, ``--runs`` times; the table shows medians of the time the
statement itself took (measured inside the child), of the whole process (interpreter start
included, measured by the parent) and of the child's peak RSS (``wait4``). Cases:

- ``python -c pass``: interpreter start, for reference;
- ``import torch``: the peer every target is stated against;
- ``import qscope_plugins``: must not import any framework (target: <= 1.5x ``import torch``);
- ``import sae_lens`` alone, and ``import qscope_plugins; import sae_lens``: what registration,
  now done when SAELens is first imported, adds to that import;
- ``qscope --help`` and ``qscope catalog`` (``python -m qscope_plugins``, what the console
  script runs; target: < 1.5 s each).

Usage: python benchmarks/import_time.py [--runs 5] [--json out.json]
The children import this checkout (``PYTHONPATH``); nothing is downloaded (``HF_HUB_OFFLINE=1``).
Peak RSS is the child's ``ru_maxrss``, which on Linux includes what it inherited at fork: the
parent imports nothing beyond the standard library, so that floor is the ``python -c pass`` row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each child prints the seconds its statement took; the parent times the process and reads its rusage.
TIMED = "import time as _t; _s = _t.perf_counter(); {stmt}; print(_t.perf_counter() - _s)"
CASES: list[tuple[str, list[str]]] = [
    ("python -c pass", ["-c", TIMED.format(stmt="pass")]),
    ("import torch", ["-c", TIMED.format(stmt="import torch")]),
    ("import qscope_plugins", ["-c", TIMED.format(stmt="import qscope_plugins")]),
    ("import sae_lens", ["-c", TIMED.format(stmt="import sae_lens")]),
    ("import qscope_plugins; import sae_lens", ["-c", TIMED.format(stmt="import qscope_plugins; import sae_lens")]),
    ("qscope --help", ["-m", "qscope_plugins", "--help"]),
    ("qscope catalog", ["-m", "qscope_plugins", "catalog"]),
]


def run_once(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:  # no pipe to fill up
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out_file, stderr=err_file)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read().decode(), err_file.read().decode()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({child.returncode}):\n{err}")
    statement = float(out.strip().splitlines()[-1]) if args[0] == "-c" else None
    return {"statement_s": statement, "process_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; {platform.system()}"


def versions() -> str:
    # Read metadata, import nothing: a child's peak RSS counts what it inherited at fork, so this
    # parent stays as small as `python -c pass`.
    from importlib import metadata

    found = []
    for package in ("torch", "transformers", "transformer-lens", "sae-lens", "nnsight"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} absent")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per case (median reported)")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(f"runs per case: {args.runs} (cases interleaved, medians)\n")
    samples: dict[str, list[dict]] = {name: [] for name, _ in CASES}
    for _ in range(args.runs):  # interleaved, so a busy moment on a shared machine hits every case alike
        for name, case in CASES:
            samples[name].append(run_once(case))

    rows = {}
    for name, runs in samples.items():
        row = {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None for key in runs[0]}
        rows[name] = row
    torch_s, torch_p = rows["import torch"]["statement_s"], rows["import torch"]["process_s"]
    print(f"{'case':<40} {'statement s':>11} {'process s':>10} {'x torch':>8} {'peak RSS MB':>12}")
    for name, row in rows.items():
        statement = f"{row['statement_s']:.3f}" if row["statement_s"] is not None else "-"
        ratio = (row["statement_s"] / torch_s) if row["statement_s"] is not None else row["process_s"] / torch_p
        print(f"{name:<40} {statement:>11} {row['process_s']:>10.3f} {ratio:>8.2f} {row['peak_rss_mb']:>12.0f}")
    added = rows["import qscope_plugins; import sae_lens"]["statement_s"] - rows["import sae_lens"]["statement_s"]
    print(f"\nregistration with SAELens + TransformerLens, paid at `import sae_lens`: {added:+.3f} s "
          f"({rows['import qscope_plugins; import sae_lens']['peak_rss_mb'] - rows['import sae_lens']['peak_rss_mb']:+.0f}"
          " MB peak RSS)")
    print("targets: import qscope_plugins <= 1.5x import torch (statement); qscope --help / catalog < 1.5 s (process)")
    print("x torch: statement / import torch's statement; for the qscope rows, process / import torch's process")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "versions": versions(), "runs": args.runs,
                                         "medians": rows}, indent=2))


if __name__ == "__main__":
    main()
