"""Test checkpoints whose ``config.json`` has the published field set of a Qwen-Scope backbone.

The tiny configs of :mod:`.tiny_models` set every field a model reads, so they cannot show a
field the real checkpoints lack (Qwen3.5-35B-A3B has no ``intermediate_size``) or a layout they
use (Qwen3's top-level ``rope_theta``, Qwen3.5's ``rope_parameters`` with ``mrope_section``).
The checkpoints written here keep the published ``config.json`` of each backbone key for key,
with only size fields shrunk (hidden, intermediate, expert count and width, vocabulary, layers,
and the vision tower's sizes); head_dim, kv heads, gates, rope layout, MTP, tying and the
multimodal wrapper stay as published.

Public API:

- ``BACKBONES``: the seven backbone names of the catalog, in catalog order.
- ``record(backbone)``: the data-file entry: ``config`` (published), ``shrink`` (the size
  fields replaced, per sub-config), ``sources``, ``unconfirmed``.
- ``published_config(backbone)``: the published ``config.json`` as a dict (a fresh copy).
- ``shrunk_config(backbone)``: the same keys with the size fields of ``shrink`` replaced.
- ``write_checkpoint(backbone, directory, seed=0)``: a random-weight checkpoint (every weight
  perturbed, see :func:`.tiny_models.perturb_`, then rounded to bfloat16 values, stored as
  float32) whose ``config.json`` is exactly
  ``shrunk_config(backbone)``, plus the tiny tokenizer. Qwen3.5 backbones are written in the
  published multimodal layout (text under ``model.language_model``, a tiny vision tower, and
  ``mtp.*`` tensors for the multi-token-prediction head that no loader may pick up).

Where each config comes from is recorded in ``published_configs.json`` next to this module.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from .tiny_models import perturb_, save_checkpoint, tiny_tokenizer

DATA_FILE = Path(__file__).with_name("published_configs.json")
_SUB_CONFIGS = {"text": "text_config", "vision": "vision_config"}


@functools.lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    return json.loads(DATA_FILE.read_text())["backbones"]


BACKBONES: tuple[str, ...] = (
    "Qwen3-1.7B-Base",
    "Qwen3-8B-Base",
    "Qwen3.5-2B-Base",
    "Qwen3.5-9B-Base",
    "Qwen3.5-27B",
    "Qwen3-30B-A3B-Base",
    "Qwen3.5-35B-A3B-Base",
)


def record(backbone: str) -> dict[str, Any]:
    data = _data()
    if backbone not in data:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    return copy.deepcopy(data[backbone])


def published_config(backbone: str) -> dict[str, Any]:
    return record(backbone)["config"]


def _section(config: dict[str, Any], part: str) -> dict[str, Any]:
    """The sub-config ``part`` ("text" / "vision") of a config dict; a flat config is its own text config."""
    key = _SUB_CONFIGS[part]
    if key in config:
        return config[key]
    if part == "text":
        return config
    raise KeyError(f"config has no {key}")


def shrunk_config(backbone: str) -> dict[str, Any]:
    """The published config with the recorded size fields replaced and no key added or removed."""
    entry = record(backbone)
    config = entry["config"]
    for part, sizes in entry["shrink"].items():
        section = _section(config, part)
        missing = sorted(set(sizes) - set(section))
        if missing:  # a shrink may only replace published fields, never add one
            raise ValueError(f"{backbone}: shrink sets {missing}, which its {part} config does not have")
        section.update(copy.deepcopy(sizes))
    text = _section(config, "text")
    if "layer_types" in text and len(text["layer_types"]) != text["num_hidden_layers"]:
        raise ValueError(f"{backbone}: layer_types does not have num_hidden_layers entries")
    if "vision_config" in config:
        config["vision_config"]["out_hidden_size"] = text["hidden_size"]
    return config


def _model_class(architecture: str):
    import transformers

    return getattr(transformers, architecture)


@torch.no_grad()
def write_checkpoint(backbone: str, directory: str | os.PathLike, seed: int = 0, bf16_values: bool = True) -> Path:
    """Write a random-weight ``backbone`` checkpoint to ``directory`` and return its path.

    The model is built by transformers from the shrunk config as a hub checkpoint would be
    loaded (``from_pretrained`` of this directory rebuilds the same model); ``config.json`` is
    then rewritten with the published field set, because ``save_pretrained`` serialises the
    config object (rope fields moved, defaults added) instead. ``bf16_values=False`` keeps full
    float32 weights (to catch a loader that rounds them).
    """
    from transformers import AutoConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_dict = shrunk_config(backbone)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    model = _model_class(config_dict["architectures"][0])._from_config(config, dtype=torch.float32)
    perturb_(model, seed)
    for param in model.parameters() if bf16_values else ():  # bf16 values, as published
        param.copy_(param.to(torch.bfloat16))
    save_checkpoint(model.eval(), directory, tokenizer=tiny_tokenizer(), config_json=config_dict)
    text = _section(config_dict, "text")
    if text.get("mtp_num_hidden_layers"):
        _add_mtp_tensors(directory / "model.safetensors", text["hidden_size"], seed)
    return directory


def _add_mtp_tensors(weights: Path, d_model: int, seed: int) -> None:
    """Add multi-token-prediction tensors (``mtp.*``) as published Qwen3.5 checkpoints carry them.

    No HF class loads them (they are ignored on load); the loaders under test must skip them
    too. The names follow the published head (a projection of [embedding; hidden] and its norms).
    """
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    generator = torch.Generator().manual_seed(seed + 1)
    extra = {
        "mtp.fc.weight": torch.randn(d_model, 2 * d_model, generator=generator),
        "mtp.norm.weight": torch.randn(d_model, generator=generator),
        "mtp.pre_fc_norm_embedding.weight": torch.randn(d_model, generator=generator),
        "mtp.pre_fc_norm_hidden.weight": torch.randn(d_model, generator=generator),
    }
    save_file({**state, **{k: v.to(torch.bfloat16).float() for k, v in extra.items()}}, weights, metadata={"format": "pt"})
