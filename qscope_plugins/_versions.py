"""The tested dependency window: the versions CI exercises (oldest and newest), in one place.

``pyproject.toml`` states the same bounds; ``.ci/run`` installs ``constraints/oldest.txt`` and
``constraints/newest.txt`` and runs the suite on each. A framework found outside its window is
not patched: registration warns with its name, its version and the window (see ``_register``).

This module imports nothing beyond the standard library, so it is safe anywhere (NDIF servers,
``qscope doctor`` before any framework import).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Window:
    """``low <= version < high`` (``high`` exclusive), as in ``pyproject.toml``."""

    package: str  # distribution name on PyPI
    low: str
    high: str

    def __str__(self) -> str:
        return f">={self.low},<{self.high}"


# Keep in step with pyproject.toml's dependencies (a test checks the two agree).
WINDOWS: dict[str, Window] = {
    w.package: w
    for w in (
        Window("torch", "2.13", "2.14"),  # the only torch build CI can install here is the 2.13.0 CPU one
        Window("transformers", "5.9", "5.25"),
        Window("transformer-lens", "3.9", "4"),
        Window("sae-lens", "6.54", "6.55"),
        Window("nnsight", "0.8", "0.9"),
    )
}

# Frameworks whose integration modules patch or register into them: import name -> distribution.
FRAMEWORKS: dict[str, str] = {
    "sae_lens": "sae-lens",
    "transformer_lens": "transformer-lens",
    "nnsight": "nnsight",
    "transformers": "transformers",
    "torch": "torch",
}


def parse(version: str) -> tuple[int, ...]:
    """``"5.24.0"`` -> ``(5, 24, 0)``; local tags and pre-release suffixes are dropped (``2.13.0+cpu``)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def installed(package: str) -> str | None:
    """The installed version of distribution ``package``, or ``None`` when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def in_window(package: str, version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) of ``package`` lies inside its tested window."""
    window = WINDOWS[package]
    version = installed(package) if version is None else version
    if version is None:
        return False
    v = parse(version)
    return parse(window.low) <= v < parse(window.high)


def outside_window(package: str, version: str | None = None) -> str | None:
    """``None`` when inside the window; otherwise one line naming the package, its version and the window."""
    window = WINDOWS[package]
    version = installed(package) if version is None else version
    if version is None:
        return f"{package} is not installed (tested: {package}{window})"
    if in_window(package, version):
        return None
    return f"{package} {version} is outside the tested window {package}{window}"
