"""Finding a model's HF config without surprises: no hub call for ``hf_model`` or a local dir.

Imports nothing from TransformerLens, so the bridge integration (which must also run on
TransformerLens 4.x, where ``HookedTransformer`` is gone) can use it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")

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


def load_causal_lm(name: str, dtype: torch.dtype | str | None = None, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)`` with the weights really in ``dtype``.

    For a published Qwen3.5 checkpoint (a multimodal wrapper) this builds the text model, and
    transformers 5.9 then takes its dtype from ``text_config.dtype`` (``bfloat16`` as published)
    instead of ``dtype=``, silently rounding float32 weights; so the text config is given the
    requested dtype first. Other checkpoints load exactly as ``from_pretrained`` does.
    """
    if isinstance(dtype, torch.dtype) and "config" not in kwargs:
        config = AutoConfig.from_pretrained(name, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        text = config.get_text_config()
        if text is not config:
            text.dtype = dtype
            kwargs["config"] = config
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
