"""The tested dependency window is stated once and agrees everywhere: pyproject.toml, _versions, CI's constraints."""

from pathlib import Path

import pytest

from qscope_plugins import _versions

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the window itself is checked on every Python in CI


def _pyproject_specs() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = {}
    for dep in deps:
        name = dep.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip()
        specs[name.lower().replace("_", "-")] = dep[len(name):].strip()
    return specs


def _pins(env: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / f"constraints-{env}.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.mark.parametrize("package", sorted(_versions.WINDOWS))
def test_pyproject_states_the_window(package):
    assert _pyproject_specs()[package] == str(_versions.WINDOWS[package])


@pytest.mark.parametrize("env", ["oldest", "newest"])
@pytest.mark.parametrize("package", sorted(_versions.WINDOWS))
def test_ci_constraints_lie_inside_the_window(env, package):
    version = _pins(env)[package]
    assert _versions.in_window(package, version), f"{env}: {package}=={version} outside {_versions.WINDOWS[package]}"


def test_oldest_constraints_pin_the_lower_bounds():
    """CI's oldest environment really is the oldest the bounds allow, for each framework of the window."""
    pins = _pins("oldest")
    for package, window in _versions.WINDOWS.items():
        assert _versions.parse(pins[package])[: len(_versions.parse(window.low))] == _versions.parse(window.low), package


def test_version_parsing_and_messages():
    assert _versions.parse("2.13.0+cpu") == (2, 13, 0)
    assert _versions.parse("5.25.0rc1") == (5, 25, 0)
    assert _versions.in_window("transformers", "5.24.0")
    assert not _versions.in_window("transformers", "5.25.0")
    assert not _versions.in_window("transformers", "5.8.2")
    assert _versions.outside_window("transformers", "5.24.0") is None
    assert _versions.outside_window("sae-lens", "7.0.1") == (
        "sae-lens 7.0.1 is outside the tested window sae-lens>=6.54,<6.55")
