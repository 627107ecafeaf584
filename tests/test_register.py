"""Registration: lazy (no framework imported by ``import qscope_plugins``), on each framework's first
import in any order, idempotent, and never silent (one RegistrationWarning naming framework, version, reason).

Import state is per process, so every ordering runs in a fresh subprocess that prints JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from nnsight.schema.request import RequestModel
from sae_lens import HookedSAETransformer, SAE  # noqa: F401 - imported after qscope_plugins (conftest)
from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS
from transformer_lens import HookedTransformer

import qscope_plugins
from qscope_plugins import RegistrationWarning, _register, _versions
from qscope_plugins.integrations import saelens as saelens_integration
from qscope_plugins.integrations import transformer_lens as tl_integration

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("sae_lens", "transformer_lens", "nnsight")
OURS = "qscope_plugins.integrations.saelens"  # the module of the loader SAE.from_pretrained uses for a release

# Printed by every subprocess: what each framework looks like from the outside.
PROBE = """
def probe():
    import json, sys
    import qscope_plugins
    out = {"imported": sorted(m for m in ("sae_lens", "transformer_lens", "nnsight", "torch") if m in sys.modules)}
    if "sae_lens" in sys.modules:
        from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS
        release = qscope_plugins.GROUPS[0].release
        directory = sys.modules["sae_lens.saes.sae"].get_pretrained_saes_directory()  # SAE.from_pretrained's
        loader = NAMED_PRETRAINED_SAE_LOADERS.get(getattr(directory.get(release), "conversion_func", None))
        out["saelens"] = ["qscope" in NAMED_PRETRAINED_SAE_LOADERS, getattr(loader, "__module__", None)]  # release's
        out["add_sae_checked"] = hasattr(sys.modules["sae_lens"].HookedSAETransformer.add_sae, "__wrapped__")
    if "transformer_lens" in sys.modules:
        from transformer_lens import HookedTransformer
        from transformer_lens.model_bridge import TransformerBridge
        out["hooked"] = hasattr(HookedTransformer.from_pretrained.__func__, "__wrapped__")
        out["bridge"] = hasattr(TransformerBridge.boot_transformers, "__wrapped__")
    if "nnsight" in sys.modules:
        from nnsight.schema.request import RequestModel
        out["nnsight_guard"] = getattr(RequestModel.serialize.__func__, "_qscope_request_check", False)
    out["state"] = {k: v.state for k, v in qscope_plugins.registration_status().items()}
    return out
"""


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` (with ``probe()`` defined) in a fresh interpreter; return the JSON it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE + textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- lazy, and registered on first import
def test_import_loads_no_framework_and_each_registers_on_first_import_tl_first():
    out = _run("""
        import json, sys, warnings
        warnings.simplefilter("error", __import__("qscope_plugins").RegistrationWarning)
        steps = [probe()]
        import transformer_lens.model_bridge  # a submodule first; SAELens not imported by this
        steps.append(probe())
        from sae_lens import SAE  # SAELens after TransformerLens: its own patch, and add_sae's
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
        parsed = get_pretrained_saes_directory.cache_info().currsize  # its 1.5 MB YAML: not read yet
        steps.append({**probe(), "parsed_at_import": parsed})
        import nnsight
        steps.append(probe())
        print(json.dumps(steps))
    """)
    nothing = {"imported": [], "state": dict.fromkeys(FRAMEWORKS, "not imported")}
    assert out[0] == nothing
    assert out[1] == {
        "imported": ["torch", "transformer_lens"], "hooked": True, "bridge": True,
        "state": {"sae_lens": "not imported", "transformer_lens": "registered", "nnsight": "not imported"},
    }
    assert out[2]["saelens"] == [True, OURS] and out[2]["add_sae_checked"] is True
    assert out[2]["parsed_at_import"] == 0
    assert out[2]["state"] == {"sae_lens": "registered", "transformer_lens": "registered", "nnsight": "not imported"}
    assert out[3]["nnsight_guard"] is True
    assert out[3]["state"] == dict.fromkeys(FRAMEWORKS, "registered")


def test_registered_when_imported_through_this_package_or_saelens_first():
    """``load_sae`` imports SAELens from inside this package's own module (which SAELens registration
    needs complete); SAELens imports TransformerLens halfway through itself."""
    out = _run("""
        import json, warnings
        import qscope_plugins
        warnings.simplefilter("error", qscope_plugins.RegistrationWarning)
        import nnsight
        first = probe()
        from qscope_plugins import load_sae
        print(json.dumps([first, probe()]))
    """)
    assert out[0]["nnsight_guard"] is True and out[0]["imported"] == ["nnsight", "torch"]
    assert out[1] == {
        "imported": ["nnsight", "sae_lens", "torch", "transformer_lens"],
        "saelens": [True, OURS], "add_sae_checked": True, "hooked": True, "bridge": True, "nnsight_guard": True,
        "state": dict.fromkeys(FRAMEWORKS, "registered"),
    }


def test_frameworks_imported_before_the_package_are_registered_by_its_import():
    out = _run("""
        import json, sys
        from sae_lens import SAE
        import nnsight
        assert not any(m.startswith("qscope_plugins") for m in sys.modules)
        import qscope_plugins
        print(json.dumps(probe()))
    """)
    assert out["saelens"] == [True, OURS] and out["add_sae_checked"] and out["hooked"] and out["bridge"]
    assert out["nnsight_guard"] is True
    assert out["state"] == dict.fromkeys(FRAMEWORKS, "registered")


# ---------------------------------------------------------------- never silent
def test_version_outside_the_window_warns_once_and_patches_nothing():
    out = _run("""
        import importlib.metadata as metadata, json, warnings
        real = metadata.version
        metadata.version = lambda name: "6.99.0" if name == "sae-lens" else real(name)
        import qscope_plugins
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Our own integration module first: it imports TransformerLens itself (registered once it is complete).
            from qscope_plugins.integrations import transformer_lens
            from sae_lens import SAE
            again = qscope_plugins.register()["saelens"]
        status = qscope_plugins.registration_status()["sae_lens"]
        print(json.dumps({
            "warnings": [str(w.message) for w in caught if w.category is qscope_plugins.RegistrationWarning],
            "again": again, "status": [status.version, status.in_window, status.state, status.error], **probe(),
        }))
    """)
    reason = "sae-lens 6.99.0 is outside the tested window sae-lens>=6.54,<6.55"
    assert out["warnings"] == [f"qscope-plugins did not register with sae_lens (sae-lens 6.99.0): {reason}"]
    assert out["again"] == []
    assert out["status"] == ["6.99.0", False, "refused", reason]
    assert out["saelens"] == [False, "sae_lens.loading.pretrained_sae_loaders"]  # no converter, SAELens's loader
    assert out["add_sae_checked"] is False  # TransformerLens's integration leaves SAELens alone too
    assert out["hooked"] is True and out["state"]["transformer_lens"] == "registered"


def test_framework_missing_what_the_integration_imports_warns_once(tmp_path):
    """A framework that imports fine but lacks what our module needs: one warning, and the
    user's ``import nnsight`` still works."""
    fake = tmp_path / "nnsight"
    fake.mkdir()
    (fake / "__init__.py").write_text("MARK = 'fake'\n")
    out = _run(f"""
        import json, sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        import qscope_plugins
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import nnsight
            qscope_plugins.register()  # retries, fails the same way: no second warning
        status = qscope_plugins.registration_status()["nnsight"]
        print(json.dumps({{
            "mark": nnsight.MARK, "state": status.state, "error": status.error,
            "warnings": [str(w.message) for w in caught if w.category is qscope_plugins.RegistrationWarning],
        }}))
    """)
    version = _versions.installed("nnsight")
    reason = ("qscope_plugins.integrations.nnsight could not be imported "
              "(ModuleNotFoundError: No module named 'nnsight.intervention')")
    assert out == {
        "mark": "fake", "state": "failed", "error": reason,
        "warnings": [f"qscope-plugins did not register with nnsight (nnsight {version}): {reason}"],
    }


def test_an_exception_in_register_warns_once_and_the_rest_registers(tmp_path, monkeypatch):
    """In-process, on a registry of its own over two stand-in integrations (``json`` and ``csv``
    as their frameworks, both already imported)."""
    (tmp_path / "qscope_fake_bad.py").write_text("def register():\n    raise KeyError('layer9')\n")
    (tmp_path / "qscope_fake_good.py").write_text("CALLS = []\ndef register():\n    CALLS.append(1)\n    return ['x']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = _register.Registry(
        [("bad", "json", "qscope_fake_bad", ()), ("good", "csv", "qscope_fake_good", ())],
        own_package="qscope_fake", distributions={"json": "qscope-fake-json", "csv": "qscope-fake-csv"},
    )
    with pytest.warns(RegistrationWarning) as caught:
        registry.notify()
        assert registry.register() == {"bad": [], "good": ["x"]}
    assert [str(w.message) for w in caught] == [
        "qscope-plugins did not register with json (qscope-fake-json version unknown): "
        "qscope_fake_bad.register() raised KeyError: 'layer9'"
    ]
    status = registry.status()
    assert (status["json"].state, status["csv"].state) == ("failed", "registered")
    assert status["csv"].registered == {"good": ["x"]}
    assert sys.modules["qscope_fake_good"].CALLS == [1, 1]


# ---------------------------------------------------------------- item 6: a server that blocks imports
def test_package_and_remote_import_where_an_import_hook_refuses_frameworks():
    """NDIF-like: a finder that raises ImportError for the frameworks, ahead of everything;
    ``importlib.util.find_spec`` would re-raise it."""
    out = _run("""
        import importlib.util, json, sys, warnings
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("sae_lens", "transformer_lens", "transformers"):
                    raise ImportError(f"{name} is not available on this server")
        sys.meta_path.insert(0, Refuse())
        try:
            importlib.util.find_spec("sae_lens")
        except ImportError as err:
            refused = str(err)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import qscope_plugins.remote as remote
            import qscope_plugins
            layer = remote.Layout("model.layers", 2, 8).check_layer(1)
            status = {k: v.state for k, v in qscope_plugins.registration_status().items()}
        assert not [w for w in caught if type(w.message).__name__ == "RegistrationWarning"]
        sys.meta_path.insert(0, Refuse())  # now also in front of the package's own finder
        try:
            import transformer_lens
        except ImportError as err:
            later = str(err)
        print(json.dumps({"refused": refused, "layer": layer, "later": later, **probe(), "status": status}))
    """)
    assert out["refused"] == "sae_lens is not available on this server"
    assert out["later"] == "transformer_lens is not available on this server"
    assert out["layer"] == 1 and out["imported"] == ["torch"]
    assert set(out["status"].values()) <= {"not imported"}


# ---------------------------------------------------------------- this process
def test_this_process_registered_everything_without_a_warning():
    """The suite imported qscope_plugins first (conftest) and the frameworks after it."""
    status = qscope_plugins.registration_status()
    assert {k: (v.state, v.error, v.in_window) for k, v in status.items()} == {
        k: ("registered", None, True) for k in FRAMEWORKS
    }
    assert NAMED_PRETRAINED_SAE_LOADERS["qscope"] is saelens_integration.qscope_loader
    assert HookedTransformer.from_pretrained.__func__ is tl_integration._from_pretrained
    assert RequestModel.serialize.__func__._qscope_request_check is True
    assert status["sae_lens"].version == _versions.installed("sae-lens")
    plain = json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in status.items()}))  # what `qscope doctor` reads
    assert plain["nnsight"]["registered"]["nnsight"] and plain["transformer_lens"]["window"] == ">=3.9,<4"


def test_explicit_register_is_idempotent_and_the_hook_is_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistrationWarning)
        first = qscope_plugins.register()
        second = qscope_plugins.register()
    assert set(first) == {"saelens", "transformer_lens", "bridge", "nnsight"}
    assert second == first and first["saelens"] == [] and first["nnsight"] == []
    assert first["transformer_lens"] == [f"HookedTransformer:{a}" for a in tl_integration.available_architectures()]
    _register.REGISTRY.install_hook()
    _register.REGISTRY.install_hook()
    assert sum(getattr(f, "_qscope_import_hook", False) for f in sys.meta_path) == 1
    assert getattr(sys.meta_path[0], "_qscope_import_hook", False)
