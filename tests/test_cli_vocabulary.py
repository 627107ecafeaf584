"""One option vocabulary: the same flag means the same thing in every ``qscope`` subcommand.

Also: only the subcommand being run is imported, ``--version`` works, and ``qscope doctor`` reports.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import qscope_plugins.cli as cli
from qscope_plugins.cli import COMMANDS, _options, build_parser, main

RETIRED = {"--out", "--out-dir", "--save", "--keep-first", "--top-n", "--top-k"}  # hidden aliases only


def subparsers():
    """``(name, parser)`` for every subcommand (and every ``classify`` action)."""
    out = []
    for name in COMMANDS:
        parser = build_parser([name])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = sub.choices[name]
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            out += [(f"{name} {action}", p) for action, p in nested[0].choices.items()]
        else:
            out.append((name, command))
    return out


PARSERS = subparsers()


def visible(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings}


def test_the_command_table_names_every_module():
    modules = {m.name for m in pkgutil.iter_modules(cli.__path__) if not m.name.startswith("_")}
    assert {module for module, _ in COMMANDS.values()} == modules
    assert list(COMMANDS) == sorted(COMMANDS)


@pytest.mark.parametrize("name, parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_each_flag_means_one_thing(name, parser):
    options = visible(parser)
    assert not RETIRED & set(options) - ({"--top-k"} if name == "steer" else set()), name
    if "--json" in options:  # a print switch, never a path (eval-sae's optional value is the deprecated form)
        action = options["--json"]
        assert action.nargs == 0 or (name == "eval-sae" and action.nargs == "?"), name
    if "--output" in options:
        assert options["--output"].type is Path and options["--output"].metavar == "PATH"
    if "--output-dir" in options:
        assert options["--output-dir"].type is Path
    if "--layers" in options:
        assert isinstance(options["--layers"], _options._Layers) and options["--layers"].nargs == "+"
    if "--layer" in options:
        assert options["--layer"].type is _options.non_negative_int
    if "--top" in options:
        assert options["--top"].type is _options.positive_int
    if "--device" in options:
        assert options["--device"].default == "auto"
    if "--k" in options and name != "selfcheck":
        assert options["--k"].type is _options.positive_int and options["--k"].default is None
    if "--keep-first-token" in options:
        assert "--skip-first-token" in options and parser.get_default("skip_first_token") is True
    if "--model" in options and name != "app":  # app serves a UI: no batches, no result to print
        for flag in ("--sae", "--backend", "--dtype", "--batch-size", "--no-progress", "--json"):
            assert flag in options, (name, flag)


def test_every_result_command_has_json():
    lacking = [name for name, parser in PARSERS if "--json" not in visible(parser) and name != "app"]  # app serves a UI
    assert lacking == []


def test_backend_and_threshold_constants_match_the_library():
    from qscope_plugins.backends import KINDS
    from qscope_plugins.cli import eval_sae
    from qscope_plugins.recipes.sae_eval import DENSE_THRESHOLD

    assert set(_options.BACKENDS) == set(KINDS) and eval_sae.DENSE_THRESHOLD == DENSE_THRESHOLD


@pytest.mark.parametrize("spec, layers", [
    ("3", [3]), ("0-5", [0, 1, 2, 3, 4, 5]), ("0,2,7", [0, 2, 7]), ("7,0-2", [0, 1, 2, 7]), ("all", "all"),
    ("ALL", "all"), (" 4 ", [4]),
])
def test_layer_specs(spec, layers):
    assert _options.parse_layer_spec(spec) == layers


def test_layers_resolve_against_the_model():
    assert _options.resolve_layers("all", 3) == [0, 1, 2] and _options.resolve_layers([2], 3) == [2]
    with pytest.raises(_options.UsageError, match="layer 3 is out of range: this model has layers 0..2"):
        _options.resolve_layers([1, 3], 3)


def test_only_the_chosen_subcommand_is_imported(monkeypatch):
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: imported.append(name) or real(name))
    help_text = build_parser(["catalog"]).format_help()
    assert imported == ["qscope_plugins.cli.catalog"]
    assert all(name in help_text for name in COMMANDS)  # every command is listed, unimported
    imported.clear()
    build_parser(["--verbose", "steer"])
    assert imported == ["qscope_plugins.cli.steer"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    from qscope_plugins import __version__

    assert capsys.readouterr().out.strip() == f"qscope {__version__} (qscope-plugins)"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_help_version_and_catalog_import_no_framework(tmp_path):
    """In a fresh interpreter: no other subcommand module, and no framework beyond what the package import pulls."""
    code = (
        "import json, sys\n"
        "import qscope_plugins\n"
        "base = set(sys.modules)\n"
        "from qscope_plugins.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "main(['catalog', '--json'])\n"
        "print(json.dumps({'base': sorted(base), 'after': sorted(sys.modules)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    new = set(report["after"]) - set(report["base"])
    cli_modules = {m for m in new if m.startswith("qscope_plugins.cli.")}
    assert cli_modules == {"qscope_plugins.cli._options", "qscope_plugins.cli.catalog"}, cli_modules
    frameworks = {"torch", "transformers", "transformer_lens", "sae_lens", "nnsight", "numpy"}
    assert not {m.split(".")[0] for m in new} & frameworks  # the CLI itself adds none
    if "torch" not in report["base"]:  # once `import qscope_plugins` registers lazily, nothing pulls torch in
        assert "torch" not in report["after"]


def test_doctor(capsys):
    status = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == (0 if report["ok"] else 1)
    rows = {row["package"]: row for row in report["packages"]}
    assert set(rows) == {"torch", "transformers", "transformer-lens", "sae-lens", "nnsight", "triton"}
    from qscope_plugins._versions import in_window, installed

    for name in ("torch", "transformers", "sae-lens"):
        assert rows[name]["version"] == installed(name) and rows[name]["in_window"] == in_window(name)
    assert rows["triton"]["window"] is None
    assert set(report["registrations"]) == {"sae_lens", "transformer_lens", "nnsight"}  # keyed by framework
    assert all(value["state"] == "registered" for value in report["registrations"].values())
    assert report["registrations"]["nnsight"]["patched"] == ["nnsight.schema.request.RequestModel.serialize"]
    assert "sae_lens.analysis.hooked_sae_transformer.HookedSAETransformer.add_sae" in (
        report["registrations"]["sae_lens"]["patched"])
    assert isinstance(report["accelerators"]["cuda_available"], bool)
    assert report["verdict"].startswith("OK: " if report["ok"] else "PROBLEM: ")
    assert main(["doctor"]) == status
    text = capsys.readouterr().out
    assert "tested window" in text and text.strip().splitlines()[-1] == report["verdict"]
    assert "    patched (no extension point; qscope_plugins.unregister() restores): nnsight.schema.request." in text


def test_doctor_lists_cached_qwen_scope_repos(tmp_path, monkeypatch, capsys):
    from qscope_plugins.catalog import get_group

    group = get_group("qwen-scope-3-1.7b-base-w32k-l50")
    snapshot = tmp_path / f"models--{group.repo_id.replace('/', '--')}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "layer0.sae.pt").write_bytes(b"")
    backbone = tmp_path / f"models--{group.model.replace('/', '--')}" / "snapshots" / "def"
    backbone.mkdir(parents=True)
    (backbone / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    main(["doctor", "--json"])
    cache = json.loads(capsys.readouterr().out)["hub_cache"]
    assert cache["path"] == str(tmp_path)
    assert cache["qwen_scope_saes"] == {group.repo_id: {"layer_files": 1, "n_layers": group.n_layers}}
    assert cache["backbones"] == {group.model: {"weight_files": 1}}


def test_doctor_verdict_names_a_version_outside_the_window():
    from qscope_plugins.cli import doctor

    report = {"packages": [{"package": "transformers", "version": "9.0", "window": ">=5.9,<5.25", "in_window": False}],
              "registrations": {"nnsight": {"registered": [], "error": "ImportError: boom"}}, "accelerators": {}}
    ok, line = doctor.verdict(report)
    assert not ok and line == ("PROBLEM: transformers 9.0 is outside the tested window >=5.9,<5.25; "
                               "registration with nnsight failed: ImportError: boom")


def test_doctor_reports_registration_status(monkeypatch):
    import qscope_plugins
    from qscope_plugins._register import FrameworkStatus
    from qscope_plugins.cli import doctor

    refused = FrameworkStatus("sae_lens", "sae-lens", "7.0.0", ">=6.54,<6.55", False, True, "refused",
                              error="sae-lens 7.0.0 is outside the tested window sae-lens>=6.54,<6.55")
    done = FrameworkStatus("transformer_lens", "transformer-lens", "3.9.0", ">=3.9,<4", True, True, "registered",
                           registered={"transformer_lens": ["HookedTransformer:Qwen3ForCausalLM"],
                                       "bridge": ["workaround:x"]})
    monkeypatch.setattr(qscope_plugins, "register", lambda: {})
    monkeypatch.setattr(qscope_plugins, "registration_status", lambda: {"sae_lens": refused, "transformer_lens": done})
    status = doctor.registration_status()
    assert status["transformer_lens"]["registered"] == ["HookedTransformer:Qwen3ForCausalLM", "workaround:x"]
    assert status["transformer_lens"]["state"] == "registered" and status["transformer_lens"]["error"] is None
    assert status["sae_lens"]["state"] == "refused" and status["sae_lens"]["registered"] == []
    ok, line = doctor.verdict({"packages": [], "registrations": status, "accelerators": {}})
    assert not ok and line == ("PROBLEM: registration with sae_lens failed: "
                               "sae-lens 7.0.0 is outside the tested window sae-lens>=6.54,<6.55")
