"""``qscope doctor``: what this installation is made of, for bug reports.

Versions of the frameworks and whether each lies in the tested window, what registered with each
(and which of their names were patched, where a framework has no extension point),
CUDA and Triton, the Hugging Face cache and the Qwen-Scope repos and backbones in it, then a
one-line verdict. ``--json`` prints the same as one JSON object. Exit status 0 when the verdict is
OK, 1 when something needs attention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from ._options import add_json

PACKAGES = ("torch", "transformers", "transformer-lens", "sae-lens", "nnsight", "triton")
REQUIRED = ("torch", "transformers")  # the rest are optional integrations


def package_rows() -> list[dict]:
    """Installed version and tested-window status of each package (metadata only: nothing is imported)."""
    from .._versions import WINDOWS, installed, in_window

    rows = []
    for name in PACKAGES:
        version = installed(name)
        window = WINDOWS.get(name)
        rows.append({
            "package": name,
            "version": version,
            "window": str(window) if window else None,
            "in_window": (in_window(name, version) if version else False) if window else None,
        })
    return rows


def registration_status() -> dict[str, dict]:
    """Per framework: ``qscope_plugins.registration_status()`` as plain dicts, after registering everything.

    ``register()`` imports every installed framework (seconds), so that doctor reports what each one
    really got; a failure inside it is reported, doctor itself does not fail.
    """
    import dataclasses

    import qscope_plugins

    try:
        qscope_plugins.register()
    except Exception as err:  # report it; doctor itself must not fail
        return {"*": {"state": "failed", "registered": [], "patched": [], "error": f"{type(err).__name__}: {err}"}}
    out = {}
    for name, status in qscope_plugins.registration_status().items():
        value = dataclasses.asdict(status)
        for key in ("registered", "patched"):
            value[key] = [item for items in value[key].values() for item in items]
        out[name] = value
    return out


def accelerators() -> dict:
    info: dict = {"cuda_available": False, "cuda_version": None, "devices": [], "triton_usable": False}
    try:
        import torch
    except ImportError as err:
        info["error"] = f"torch cannot be imported: {err}"
        return info
    info["cuda_version"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    if info["cuda_available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    import importlib.util

    info["triton_installed"] = importlib.util.find_spec("triton") is not None  # found, not imported (slow)
    info["triton_usable"] = bool(info["triton_installed"] and info["cuda_available"])
    return info


def hub_cache_dir() -> Path:
    """The hub cache, resolved the way ``huggingface_hub`` does (``HF_HUB_CACHE``, ``HF_HOME``, default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_repos(cache: Path) -> dict:
    """Which catalog SAE repos (with how many layer files) and which backbones are in ``cache``."""
    from ..catalog import GROUPS

    def snapshot_files(repo_id: str, pattern: str) -> int | None:
        root = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        if not root.is_dir():
            return None
        return max((len(list(s.glob(pattern))) for s in root.iterdir() if s.is_dir()), default=0)

    saes = {}
    for group in GROUPS:
        n = snapshot_files(group.repo_id, "layer*.sae.pt")
        if n is not None:
            saes[group.repo_id] = {"layer_files": n, "n_layers": group.n_layers}
    backbones = {}
    for model in sorted({g.model for g in GROUPS}):
        n = snapshot_files(model, "*.safetensors")
        if n is not None:
            backbones[model] = {"weight_files": n}
    return {"path": str(cache), "exists": cache.is_dir(), "qwen_scope_saes": saes, "backbones": backbones}


def verdict(report: dict) -> tuple[bool, str]:
    problems = []
    for row in report["packages"]:
        if row["package"] in REQUIRED and row["version"] is None:
            problems.append(f"{row['package']} is not installed")
        elif row["version"] is not None and row["in_window"] is False:
            problems.append(f"{row['package']} {row['version']} is outside the tested window {row['window']}")
    for name, value in report["registrations"].items():
        if value.get("error"):
            problems.append(f"registration with {name} failed: {value['error']}")
    if "error" in report["accelerators"]:
        problems.append(report["accelerators"]["error"])
    if problems:
        return False, "PROBLEM: " + "; ".join(problems)
    return True, "OK: every installed framework is inside the tested window and registered cleanly"


def collect() -> dict:
    from .. import __version__

    report = {
        "qscope_plugins": {"version": __version__, "path": str(Path(__file__).resolve().parents[1])},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_rows(),
        "registrations": registration_status(),
        "accelerators": accelerators(),
        "hub_cache": cached_repos(hub_cache_dir()),
        "offline": os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
    }
    ok, line = verdict(report)
    report["ok"], report["verdict"] = ok, line
    return report


def _text(report: dict) -> str:
    q = report["qscope_plugins"]
    lines = [f"qscope-plugins {q['version']} at {q['path']}", f"python {report['python']} on {report['platform']}", ""]
    lines.append("package            version      tested window    status")
    for row in report["packages"]:
        status = ("not installed" if row["version"] is None else "no window (optional)" if row["window"] is None
                  else "ok" if row["in_window"] else "OUTSIDE WINDOW")
        lines.append(f"{row['package']:<18} {row['version'] or '-':<12} {row['window'] or '-':<16} {status}")
    lines.append("")
    lines.append("registrations:")
    for name, value in report["registrations"].items():
        what = ", ".join(value["registered"]) or "nothing registered"
        state = value.get("state", "")
        lines.append(f"  {name} ({state}): " + (f"ERROR {value['error']}" if value.get("error") else what))
        if value.get("patched"):
            lines.append("    patched (no extension point; qscope_plugins.unregister() restores): "
                         + ", ".join(value["patched"]))
    acc = report["accelerators"]
    lines.append("")
    lines.append(f"CUDA: {'available' if acc['cuda_available'] else 'not available'}"
                 f" (torch built with CUDA {acc['cuda_version'] or 'none'})"
                 + (f"; devices: {', '.join(acc['devices'])}" if acc["devices"] else ""))
    triton = ("usable (CUDA present)" if acc["triton_usable"] else "installed, unused without CUDA"
              if acc.get("triton_installed") else "not installed")
    lines.append(f"Triton: {triton}")
    cache = report["hub_cache"]
    lines.append("")
    lines.append(f"hub cache: {cache['path']}{'' if cache['exists'] else ' (does not exist)'}"
                 f"{' [HF_HUB_OFFLINE]' if report['offline'] else ''}")
    for repo, info in cache["qwen_scope_saes"].items():
        lines.append(f"  SAE      {repo}: {info['layer_files']}/{info['n_layers']} layer files")
    for repo, info in cache["backbones"].items():
        lines.append(f"  backbone {repo}: {info['weight_files']} weight file(s)")
    if not cache["qwen_scope_saes"] and not cache["backbones"]:
        lines.append("  no Qwen-Scope SAE or backbone cached")
    lines += ["", report["verdict"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 0 if report["ok"] else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("doctor", help="versions, tested window, registrations, CUDA/Triton, cached repos: "
                                           "for bug reports", description=__doc__.split("\n\n")[0])
    add_json(parser, "print the report as one JSON object on stdout")
    parser.set_defaults(func=run)
