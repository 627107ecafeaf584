"""Train Top-k SAEs on residual activations and export them in the released Qwen-Scope layout.

Training follows the report's recipe at toy scale: Top-k with an AuxK term of weight 1/32 on
features that have not fired for a while (Gao et al. 2024), unit-norm decoder columns, latents
initialised at training points, a short learning-rate warm-up, and a per-layer input scale so one
learning rate suits every layer. The export folds the scale and the
decoder-bias pre-subtraction into the weights, so the shipped file computes exactly
``z = ReLU(TopK_k(W_enc x + b_enc))`` and ``x_hat = W_dec z + b_dec`` on raw residuals (no
normalisation, no ``b_dec`` subtraction), as Qwen-Scope's files do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sae.format import released_layout

log = logging.getLogger(__name__)


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


class _TopKSAE(torch.nn.Module):
    """Training-time parameterisation: ``pre = W_enc (x - b_dec) + b_enc`` on scaled inputs."""

    def __init__(self, W_dec: Tensor, b_dec: Tensor, k: int) -> None:
        super().__init__()
        d_sae = W_dec.shape[1]
        W_dec = W_dec / W_dec.norm(dim=0, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T / k)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(b_dec.clone())

    def pre(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8)


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """Dense codes ``ReLU(TopK_k(pre))``."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def train_nano_sae(acts: Tensor, cfg: SAEConfig) -> dict[str, Tensor]:
    """Train on ``acts`` (tokens, d_model); return the four tensors in the released layout.

    Training sees ``x / scale``; since Top-k and ReLU commute with a positive factor, the codes of
    raw inputs are ``scale`` times the training codes, which the exported biases absorb.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    d_model = acts.shape[1]
    d_sae = cfg.expansion * d_model
    mean = acts.mean(0)
    scale = float((acts - mean).pow(2).sum(1).mean().sqrt()) / d_model**0.5  # unit variance per coordinate
    # Each latent starts at a random (centred) training point, so it is the best match of some
    # inputs from the first step: random directions leave most latents outside every top-k of this
    # clustered, token-dominated data, where they die. The encoder starts at W_dec^T / k so that the
    # k winners' reconstruction starts near x, not k times it (that overshoot killed latents too).
    init = acts[torch.randperm(acts.shape[0], generator=generator)[:d_sae]] - mean
    sae = _TopKSAE(init.T.contiguous(), mean / scale, cfg.k)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps_since_fired = torch.zeros(d_sae)
    n = acts.shape[0]
    total = cfg.epochs * (n // cfg.batch_size)
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            x = acts[order[start : start + cfg.batch_size]] / scale
            pre = sae.pre(x)
            z = topk_relu(pre, cfg.k)
            x_hat = z @ sae.W_dec.T + sae.b_dec
            err = x - x_hat
            loss = err.pow(2).sum(1).mean()
            fired = (z > 0).any(0)
            steps_since_fired = torch.where(fired, 0.0, steps_since_fired + cfg.batch_size)
            dead = steps_since_fired > cfg.dead_after_tokens
            if dead.any():
                aux_pre = pre.masked_fill(~dead, float("-inf"))
                z_aux = topk_relu(aux_pre, min(cfg.k_aux, int(dead.sum()))).nan_to_num(0.0)
                aux = (err.detach() - z_aux @ sae.W_dec.T).pow(2).sum(1).mean()
                loss = loss + cfg.aux_weight * aux
            for group in opt.param_groups:  # linear warm-up over the first tenth, decay over the last fifth
                group["lr"] = cfg.lr * min(1.0, 10 * (step + 1) / total, 5 * (1 - step / total))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sae.normalise_decoder()
            step += 1
        log.info("sae epoch %d: last batch mse/var %.4f, dead %d", epoch,
                 float(err.detach().pow(2).sum() / x.var(0).sum() / len(x)), int(dead.sum()))
    return released_layout(sae.W_enc.T, sae.W_dec.T, sae.b_enc, sae.b_dec, b_dec_presub=True, scale=scale)


def encode(state: dict[str, Tensor], x: Tensor, k: int) -> Tensor:
    """Dense codes of raw residuals under the released formula (the build's own check)."""
    return topk_relu(x @ state["W_enc"].T + state["b_enc"], k)


def reconstruct(state: dict[str, Tensor], x: Tensor, k: int) -> Tensor:
    """``W_dec z + b_dec`` of the released-formula codes of ``x``."""
    return encode(state, x, k) @ state["W_dec"].T + state["b_dec"]
