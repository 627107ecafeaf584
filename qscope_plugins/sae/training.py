"""``QwenScopeTrainingSAE``: the training counterpart of :class:`~qscope_plugins.sae.topk.QwenScopeSAE`.

Built on SAELens's ``TopKTrainingSAE`` (its AuxK loss, dead-feature handling, sparse activations,
decoder-norm rescaling and inference export), registered under the same architecture name
``qwen_scope_topk``, so a released Qwen-Scope SAE saved with ``sae.save_model(path)`` loads with
``TrainingSAE.load_from_disk(path)``, trains further with SAELens's ``SAETrainer`` /
``LanguageModelSAETrainingRunner``, and goes back to the released layout with
:func:`qscope_plugins.recipes.sae_train.export_qwen_scope` (or to SAELens's inference format with
``save_inference_model``, which loads as a ``QwenScopeSAE``).

The only behaviour added to ``TopKTrainingSAE`` is the ``relu`` switch of ``QwenScopeSAE``; the
config defaults follow Qwen-Scope (no ``b_dec`` pre-subtraction) except
``rescale_acts_by_decoder_norm``, which keeps SAELens's training default (True) for SAEs created
from scratch and is read from the file (False for the released SAEs) when loading one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from typing_extensions import override

from .topk import QwenScopeConventions


@dataclass
class QwenScopeTrainingSAEConfig(QwenScopeConventions, TopKTrainingSAEConfig):
    """SAELens's ``TopKTrainingSAEConfig`` with :class:`~qscope_plugins.sae.topk.QwenScopeConventions`."""


class _TopKNoReLU(torch.nn.Module):
    """Top-k without the ReLU (the model card's encoder): the k largest pre-activations, as they are."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = x.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(x).scatter_(-1, indices, values)


class QwenScopeTrainingSAE(TopKTrainingSAE):
    """SAELens's ``TopKTrainingSAE`` for the ``qwen_scope_topk`` architecture."""

    cfg: QwenScopeTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: QwenScopeTrainingSAEConfig, use_error_term: bool = False):
        if not cfg.relu and cfg.use_sparse_activations:
            raise ValueError("relu=False needs use_sparse_activations=False (SAELens's sparse TopK applies the ReLU)")
        super().__init__(cfg, use_error_term)

    @override
    def get_activation_fn(self):
        return super().get_activation_fn() if self.cfg.relu else _TopKNoReLU(self.cfg.k)

    @override
    def process_state_dict_for_saving(self, state_dict: dict) -> None:
        super().process_state_dict_for_saving(state_dict)
        # safetensors needs contiguous tensors; a W_enc loaded from a QwenScopeSAE is a transposed view.
        for key, value in state_dict.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                state_dict[key] = value.contiguous()

