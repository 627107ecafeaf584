"""The 14 Qwen-Scope SAE groups: the one source of truth for ids, shapes and backbones.

Every other module (loader, SAELens registration, CLI, recipes) reads these rows instead of
re-parsing repo names, so a fact about a release is written exactly once.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

WIDTHS = {"32K": 32768, "64K": 65536, "80K": 81920, "128K": 131072}
REPO_PATTERN = re.compile(r"SAE-Res-(?P<backbone>.+)-W(?P<width>\d+K)-L0_(?P<k>\d+)")
LAYER_FILE = "layer{layer}.sae.pt"


@dataclass(frozen=True)
class SAEGroup:
    """One Qwen-Scope repository: one Top-k SAE per decoder layer of one backbone."""

    repo_id: str
    release: str
    model: str
    family: str  # "qwen3" or "qwen3.5"
    moe: bool
    n_layers: int
    d_model: int
    d_sae: int
    k: int
    trained_on: str  # "base" or "instruct"

    @property
    def hf_layers_path(self) -> str:
        """Module path of the decoder layers in the published checkpoint layout.

        Qwen3.5 checkpoints declare ``Qwen3_5(Moe)ForConditionalGeneration``, whose text
        layers live under ``model.language_model``; Qwen3 checkpoints are text-only. Both are
        paths of the one layout resolver's table (``qscope_plugins.remote.LAYER_PATHS``), stated
        here as strings so the catalog stays torch-free.
        """
        return "model.language_model.layers" if self.family == "qwen3.5" else "model.layers"

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    def hf_hook_name(self, layer: int) -> str:
        return f"{self.hf_layers_path}.{layer}"

    def filename(self, layer: int) -> str:
        return LAYER_FILE.format(layer=layer)

    def to_dict(self) -> dict:
        return {**asdict(self), "hf_layers_path": self.hf_layers_path}


# (backbone, family, moe, n_layers, d_model, trained_on, [(width, k), ...]) from the report's Table 1.
_BACKBONES = (
    ("Qwen3-1.7B-Base", "qwen3", False, 28, 2048, "base", (("32K", 50), ("32K", 100))),
    ("Qwen3-8B-Base", "qwen3", False, 36, 4096, "base", (("64K", 50), ("64K", 100))),
    ("Qwen3.5-2B-Base", "qwen3.5", False, 24, 2048, "base", (("32K", 50), ("32K", 100))),
    ("Qwen3.5-9B-Base", "qwen3.5", False, 32, 4096, "base", (("64K", 50), ("64K", 100))),
    ("Qwen3.5-27B", "qwen3.5", False, 64, 5120, "instruct", (("80K", 50), ("80K", 100))),
    ("Qwen3-30B-A3B-Base", "qwen3", True, 48, 2048, "base", (("32K", 50), ("128K", 100))),
    ("Qwen3.5-35B-A3B-Base", "qwen3.5", True, 40, 2048, "base", (("32K", 50), ("128K", 100))),
)


def _release_name(backbone: str, width: str, k: int) -> str:
    # SAELens's naming: "Qwen3.5-2B-Base" + 32K + 50 -> "qwen-scope-3.5-2b-base-w32k-l50"
    return f"qwen-scope-{backbone.lower().removeprefix('qwen')}-w{width.lower()}-l{k}"


GROUPS: tuple[SAEGroup, ...] = tuple(
    SAEGroup(
        repo_id=f"Qwen/SAE-Res-{backbone}-W{width}-L0_{k}",
        release=_release_name(backbone, width, k),
        model=f"Qwen/{backbone}",
        family=family,
        moe=moe,
        n_layers=n_layers,
        d_model=d_model,
        d_sae=WIDTHS[width],
        k=k,
        trained_on=trained_on,
    )
    for backbone, family, moe, n_layers, d_model, trained_on, variants in _BACKBONES
    for width, k in variants
)

_BY_KEY = {key: g for g in GROUPS for key in (g.repo_id, g.release)}


def find_group(name: str) -> SAEGroup | None:
    """The group for a repo id or SAELens release name (case-sensitive), else ``None``."""
    return _BY_KEY.get(name)


def get_group(name: str) -> SAEGroup:
    """Like :func:`find_group` but raises a ``KeyError`` listing the known names."""
    group = find_group(name)
    if group is None:
        known = ", ".join(g.release for g in GROUPS)
        raise KeyError(f"unknown Qwen-Scope SAE group {name!r}; known releases: {known}")
    return group


def parse_repo_name(name: str) -> tuple[int, int] | None:
    """``(d_sae, k)`` from any string containing the Qwen-Scope pattern ``SAE-Res-*-W{N}K-L0_{k}``."""
    match = REPO_PATTERN.search(name)
    if match is None:
        return None
    width = match.group("width")
    d_sae = WIDTHS.get(width, int(width[:-1]) * 1024)
    return d_sae, int(match.group("k"))


def groups_for_model(model_id: str) -> list[SAEGroup]:
    """The groups trained on ``model_id`` (e.g. ``"Qwen/Qwen3-8B-Base"``)."""
    return [g for g in GROUPS if g.model == model_id]
