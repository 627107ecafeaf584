"""Train the nano build's Top-k SAEs and export them in the released Qwen-Scope layout.

Training follows the report's recipe at toy scale, through SAELens's ``SAETrainer``
(:func:`qscope_plugins.recipes.sae_train.train_sae_on_activations`): Top-k with an AuxK term of
weight 1/32 on features that have not fired for a while (Gao et al. 2024), unit-norm decoder
rows, latents initialised at training points, a short learning-rate warm-up, and a per-layer input
scale so one learning rate suits every layer. The export folds the scale and the decoder-bias
pre-subtraction into the weights, so the shipped file computes exactly
``z = ReLU(TopK_k(W_enc x + b_enc))`` and ``x_hat = W_dec z + b_dec`` on raw residuals (no
normalisation, no ``b_dec`` subtraction), as Qwen-Scope's files do.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..recipes.sae_train import train_sae_on_activations
from ..sae.format import topk_relu


@dataclass(frozen=True)
class SAEConfig:
    """Width, sparsity and schedule; part of the build's configuration hash."""

    expansion: int = 4
    k: int = 8
    k_aux: int = 64
    aux_weight: float = 1 / 32
    dead_after_tokens: int = 50_000
    batch_size: int = 1024
    epochs: int = 4
    lr: float = 2e-3
    seed: int = 0


def train_nano_sae(acts: Tensor, cfg: SAEConfig) -> dict[str, Tensor]:
    """Train on ``acts`` (tokens, d_model); return the four tensors in the released layout.

    Each latent starts at a random (centred) training point, so it is the best match of some
    inputs from the first step: random directions leave most latents outside every top-k of this
    clustered, token-dominated data, where they die. The encoder starts at ``W_dec^T / k`` so that
    the k winners' reconstruction starts near x, not k times it (that overshoot killed latents too).
    """
    return train_sae_on_activations(
        acts, d_sae=cfg.expansion * acts.shape[1], k=cfg.k, epochs=cfg.epochs, batch_size=cfg.batch_size,
        lr=cfg.lr, seed=cfg.seed, k_aux=cfg.k_aux, aux_weight=cfg.aux_weight,
        dead_after_tokens=cfg.dead_after_tokens, init="data", scale_inputs=True).released()


def encode(state: dict[str, Tensor], x: Tensor, k: int) -> Tensor:
    """Dense codes of raw residuals under the released formula (the build's own check)."""
    return topk_relu(x @ state["W_enc"].T + state["b_enc"], k)


def reconstruct(state: dict[str, Tensor], x: Tensor, k: int) -> Tensor:
    """``W_dec z + b_dec`` of the released-formula codes of ``x``."""
    return encode(state, x, k) @ state["W_dec"].T + state["b_dec"]
