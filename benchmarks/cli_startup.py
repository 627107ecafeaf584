"""Wall time of short ``qscope`` invocations (``--help``, ``--version``, ``catalog``, ``doctor``), fresh processes.

Each command runs ``--repeat`` times in a new interpreter (``python -m qscope_plugins ...``); the median,
min and max wall seconds are printed with the machine, next to ``python -c "import torch"`` and
``python -c "import qscope_plugins"`` as references (targets: ``--help`` and ``catalog`` < 1.5 s).
Also reports which frameworks each command leaves imported.

``--stub-register`` runs the same commands with ``qscope_plugins.register`` replaced by a no-op before
the package is imported: what the command line itself costs once registration is lazy (import-time
registration is measured separately, by ``benchmarks/import_time.py``).

    python benchmarks/cli_startup.py [--repeat 5] [--stub-register] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": ["-c", "import torch"],
    "import qscope_plugins": ["-c", "import qscope_plugins"],
    "qscope --help": ["-m", "qscope_plugins", "--help"],
    "qscope --version": ["-m", "qscope_plugins", "--version"],
    "qscope catalog": ["-m", "qscope_plugins", "catalog"],
    "qscope doctor": ["-m", "qscope_plugins", "doctor"],
}
STUB = ("import sys, types; sys.modules['qscope_plugins._register'] = "
        "types.SimpleNamespace(register=lambda: {}, __name__='qscope_plugins._register')\n")
PROBE = ("import sys, runpy; sys.argv = ['qscope', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('qscope_plugins', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('\\nIMPORTED', sorted({m.split('.')[0] for m in sys.modules} & "
         "{'torch', 'transformers', 'transformer_lens', 'sae_lens', 'nnsight', 'triton'}), file=sys.stderr)")


def stubbed(argv: list[str]) -> list[str]:
    """The same command with registration replaced by a no-op."""
    if argv[0] == "-m":
        return ["-c", STUB + PROBE.replace("print('\\nIMPORTED'", "0 and print(0"), *argv[2:]]
    return ["-c", STUB + argv[1]]


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
    return time.perf_counter() - start


def imported(argv: list[str], env: dict, stub: bool) -> list[str]:
    if argv[0] != "-m":
        return []
    probe = (STUB if stub else "") + PROBE
    proc = subprocess.run([sys.executable, "-c", probe, *argv[2:]], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("IMPORTED")), "IMPORTED []")
    return json.loads(line.split(" ", 1)[1].replace("'", '"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stub-register", action="store_true", help="replace register() by a no-op (see above)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for name, argv in COMMANDS.items():
        run = stubbed(argv) if args.stub_register else argv
        times = [timed(run, env) for _ in range(args.repeat)]
        rows.append({"command": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "frameworks_imported": imported(argv, env, args.stub_register)})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    if args.stub_register:
        machine += "; register() stubbed"
    if args.json:
        print(json.dumps({"machine": machine, "repeat": args.repeat, "rows": rows}, indent=2))
        return
    print(f"machine: {machine}; {args.repeat} runs each, wall seconds")
    for r in rows:
        print(f"{r['command']:<24} median {r['median_s']:6.2f}  min {r['min_s']:6.2f}  max {r['max_s']:6.2f}  "
              f"imports {', '.join(r['frameworks_imported']) or '-'}")


if __name__ == "__main__":
    main()
