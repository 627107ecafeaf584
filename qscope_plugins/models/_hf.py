"""Finding a model's HF config without surprises: no hub call for ``hf_model`` or a local dir.

Imports nothing from TransformerLens, so the bridge integration (which must also run on
TransformerLens 4.x, where ``HookedTransformer`` is gone) can use it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

# Hub ids whose config we fetch to decide whether a model is ours (the Qwen-Scope backbones
# and their siblings). Other unknown names are left to the framework's own error.
QWEN_HUB_NAME = re.compile(r"^Qwen/Qwen3(\.5)?-", re.IGNORECASE)

# Published Qwen3.5 checkpoints declare the multimodal class; their text model is this one.
TEXT_ARCHITECTURE = {
    "Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM",
}


def is_local_model(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def find_hf_config(model_name: str, hf_model=None, **hub_kwargs: Any) -> PretrainedConfig | None:
    """The config of ``hf_model``, of the local directory ``model_name``, or of a Qwen3 /
    Qwen3.5 hub id (fetched like the frameworks do; cached files are used offline); ``None``
    for anything else, which is then not ours to handle."""
    if hf_model is not None:
        return hf_model.config
    if is_local_model(model_name):
        return AutoConfig.from_pretrained(model_name)
    if QWEN_HUB_NAME.match(model_name):
        return AutoConfig.from_pretrained(model_name, **hub_kwargs)
    return None
