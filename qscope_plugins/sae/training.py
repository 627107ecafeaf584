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

:class:`AuxKTrainingSAE` is the same SAE with its own training step (Gao et al.'s AuxK with dead
latents counted in tokens, a unit-norm decoder, latents started at given points), which
:func:`qscope_plugins.recipes.sae_train.train_sae_on_activations` trains with ``SAETrainer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from typing_extensions import override

from .format import topk_relu
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



@dataclass
class AuxKTrainingSAEConfig(QwenScopeTrainingSAEConfig):
    """:class:`QwenScopeTrainingSAEConfig` for :class:`AuxKTrainingSAE`: Gao et al.'s AuxK settings.

    A latent is dead once it has not fired for more than ``dead_after_tokens`` training tokens;
    the auxiliary loss (weight ``aux_loss_coefficient``) reconstructs the error from the top
    ``k_aux`` dead pre-activations. The defaults encode ``x - b_dec`` (``apply_b_dec_to_input``) and
    keep the decoder at unit norm instead of rescaling by it.
    """

    k_aux: int = 64
    dead_after_tokens: int = 50_000
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False


class AuxKTrainingSAE(QwenScopeTrainingSAE):
    """A SAELens training SAE whose own training step follows Gao et al. (2024) as the nano build does.

    :meth:`training_forward_pass` computes ``pre = (x - b_dec) W_enc + b_enc``,
    ``z = ReLU(TopK_k(pre))``, ``x_hat = z W_dec + b_dec`` and the summed squared error per token,
    averaged; it counts, per latent, the training tokens since it last fired, *this batch
    included*, and adds the AuxK term on the latents dead by that count (SAELens's trainer counts
    steps and passes the mask of the step before; that mask is ignored). :meth:`normalise_decoder`
    puts every decoder row back to unit norm (call it after each optimizer step), and
    :meth:`initialise_at` starts the latents at given points. SAELens's own ``encode`` / ``decode``
    compute the same codes and reconstructions, so the trained SAE exports like any other.
    """

    cfg: AuxKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: AuxKTrainingSAEConfig, use_error_term: bool = False):
        if not cfg.relu or cfg.rescale_acts_by_decoder_norm or cfg.use_sparse_activations:
            raise ValueError("AuxKTrainingSAE trains ReLU Top-k codes on a unit-norm decoder: it needs relu=True, "
                             "rescale_acts_by_decoder_norm=False and use_sparse_activations=False")
        super().__init__(cfg, use_error_term)
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, device=self.device), persistent=False)

    @torch.no_grad()
    def initialise_at(self, points: torch.Tensor, b_dec: torch.Tensor) -> None:
        """Latent ``f`` starts at ``points[f]`` ``(d_sae, d_in)``: unit decoder row along it, encoder
        column ``W_dec[f] / k`` (so the k winners' reconstruction starts near the input, not k times
        it), ``b_enc = 0``, ``b_dec`` as given.

        The parameters are views of ``(d_in, d_sae)`` decoder and ``(d_sae, d_in)`` encoder storage.
        """
        W_dec = points.T.contiguous()  # (d_in, d_sae): one column per latent
        W_dec = W_dec / W_dec.norm(dim=0, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec.T)
        self.W_enc = torch.nn.Parameter((W_dec.T / self.cfg.k).T)
        self.b_enc = torch.nn.Parameter(torch.zeros(self.cfg.d_sae, device=points.device))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.tokens_since_fired.zero_()

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Unit-norm decoder rows, in place."""
        W_dec = self.W_dec.T
        W_dec /= W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x = step_input.sae_in
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        z = topk_relu(pre, self.cfg.k)
        x_hat = z @ self.W_dec + self.b_dec
        err = x - x_hat
        mse = err.pow(2).sum(1).mean()
        fired = (z > 0).any(0)
        self.tokens_since_fired = torch.where(fired, 0.0, self.tokens_since_fired + x.shape[0])
        dead = self.tokens_since_fired > self.cfg.dead_after_tokens
        loss, losses = mse, {"mse_loss": mse}
        if dead.any():
            aux_pre = pre.masked_fill(~dead, float("-inf"))
            z_aux = topk_relu(aux_pre, min(self.cfg.k_aux, int(dead.sum()))).nan_to_num(0.0)
            aux = self.cfg.aux_loss_coefficient * (err.detach() - z_aux @ self.W_dec).pow(2).sum(1).mean()
            loss = loss + aux
            losses["auxiliary_reconstruction_loss"] = aux
        return TrainStepOutput(sae_in=x, sae_out=x_hat, feature_acts=z, hidden_pre=pre, loss=loss, losses=losses)
