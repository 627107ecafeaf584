"""``QwenScopeSAE``: the Qwen-Scope Top-k SAE as a real SAELens ``TopKSAE``.

Math (``../shared/qwen_scope_facts.md`` §1): ``pre = W_enc x + b_enc`` (no ``b_dec``
pre-subtraction, no input normalisation), ``z = ReLU(TopK_k(pre))``, ``x_hat = W_dec z + b_dec``.

SAELens stores ``W_enc`` as ``(d_in, d_sae)`` and ``W_dec`` as ``(d_sae, d_in)``. Here
``W_enc`` is a transposed *view* of the released ``(d_sae, d_model)`` rows (kept in that
layout, in memory the SAE owns; the GEMM reads either layout at the same speed), and ``W_dec``
is contiguous with one row per feature, which is what sparse decoding gathers from.

The sparse path (``encode_sparse`` / ``decode_sparse``) never builds an ``N x d_sae`` code
tensor; long inputs are processed in chunks of rows (``chunk_bytes``) so not even the
pre-activations of the whole input exist at once. The dense ``encode`` / ``decode`` /
``forward`` keep SAELens semantics and hooks for ``HookedSAETransformer`` and friends.

SAELens's ``TopKSAE`` options mean the same on every path (dense and sparse, encode and decode,
``fold_W_dec_norm``), whether set at construction or later on ``sae.cfg``; the released SAEs use
neither: ``apply_b_dec_to_input`` subtracts ``b_dec`` from the input before encoding, and
``rescale_acts_by_decoder_norm`` selects and returns ``pre * ||W_dec[f]||`` and divides by the
norm again before decoding (``fold_W_dec_norm`` then folds the norms into the weights, same
function). ``normalize_activations`` other than ``"none"`` is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from typing_extensions import override

from .kernels import decode as sparse_decode
from .kernels import topk_encode

ARCHITECTURE = "qwen_scope_topk"


class TopKCodes(NamedTuple):
    """Sparse Top-k codes: ``values[..., i]`` is the activation of feature ``indices[..., i]``."""

    values: torch.Tensor
    """Activations, shape ``(..., k)``, sorted in descending order (ReLU applied unless ``relu=False``)."""
    indices: torch.Tensor
    """Feature ids, shape ``(..., k)``, int64."""


@dataclass
class QwenScopeConventions:
    """What the ``qwen_scope_topk`` configs (inference and training) add to SAELens's Top-k ones: the
    ReLU switch (``relu=False`` gives the model-card encoder) and no ``b_dec`` pre-subtraction."""

    relu: bool = True
    apply_b_dec_to_input: bool = False

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass
class QwenScopeSAEConfig(QwenScopeConventions, TopKSAEConfig):
    """SAELens's ``TopKSAEConfig`` with :class:`QwenScopeConventions`."""


class QwenScopeSAE(TopKSAE):
    """A Qwen-Scope Top-k SAE usable everywhere SAELens accepts an ``SAE``."""

    cfg: QwenScopeSAEConfig  # type: ignore[assignment]

    #: Bytes of pre-activations (or decode intermediates) held at once by the sparse path;
    #: ``None`` uses the kernels' default.
    chunk_bytes: int | None = None
    #: ``encode_sparse``'s bf16-screened exact path for fp32 weights: ``"auto"`` (where faster),
    #: ``"on"`` or ``"off"`` (see :func:`qscope_plugins.sae.kernels.topk_encode`, docs/topk.md).
    screen: str = "auto"

    def __init__(self, cfg: QwenScopeSAEConfig, use_error_term: bool = False):
        if cfg.k > cfg.d_sae:
            raise ValueError(f"k={cfg.k} exceeds d_sae={cfg.d_sae}")
        if cfg.normalize_activations != "none":
            raise ValueError(f"normalize_activations={cfg.normalize_activations!r} is not supported: Qwen-Scope SAEs "
                             "read raw residuals (use normalize_activations='none')")
        super().__init__(cfg, use_error_term)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weights(
        cls,
        W_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        k: int,
        layer: int | None = None,
        relu: bool = True,
        model_name: str | None = None,
        metadata: dict | None = None,
    ) -> QwenScopeSAE:
        """Build from tensors in the *released* orientation (``W_enc (d_sae, d_model)``, ``W_dec (d_model, d_sae)``)."""
        from .format import check_finite, check_shapes

        state = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        d_model, d_sae = check_shapes(state, "from_weights")
        for key, value in state.items():
            check_finite(value, "from_weights", key)
        cfg = make_config(d_model, d_sae, k, layer=layer, relu=relu, dtype=W_enc.dtype,
                          device=W_enc.device, model_name=model_name, metadata=metadata)
        return cls.from_parts(cfg, W_enc.detach(), W_dec.detach().T.contiguous(), b_enc.detach(), b_dec.detach())

    @classmethod
    def from_parts(
        cls,
        cfg: QwenScopeSAEConfig,
        W_enc_rows: torch.Tensor,
        W_dec_rows: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
    ) -> QwenScopeSAE:
        """Assemble without copying: both weights given with one row per feature, ``(d_sae, d_model)``."""
        device = cfg.device
        cfg.device = "meta"
        sae = cls(cfg)
        sae.cfg.device = device
        sae.device = torch.device(device)
        sae.load_state_dict(
            {"W_enc": W_enc_rows.T, "W_dec": W_dec_rows, "b_enc": b_enc, "b_dec": b_dec}, assign=True
        )
        return sae

    # ------------------------------------------------------------------ metadata
    @property
    def layer(self) -> int | None:
        """Decoder layer read by this SAE (from ``blocks.{n}.hook_resid_post`` or an HF ``...layers.{n}``)."""
        parts = (self.cfg.metadata.hook_name or "").split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            return int(parts[1])
        return int(parts[-1]) if len(parts) > 1 and parts[-2] == "layers" and parts[-1].isdigit() else None

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def metadata(self):
        """``cfg.metadata`` (SAELens's ``SAEMetadata``, a mapping)."""
        return self.cfg.metadata

    complete = True
    """Every feature is held, so Top-k codes can be computed (see :mod:`.protocol`)."""

    # ------------------------------------------------------------------ encoder
    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pre-activations ``W_enc x + b_enc`` (before any decoder-norm rescaling, Top-k and ReLU;
        ``x - b_dec`` in place of ``x`` under ``apply_b_dec_to_input``), shape ``(..., d_sae)``."""
        return self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes ``ReLU(TopK_k(pre))`` (SAELens-compatible; hooks fire)."""
        pre = self.encode_pre(x)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        if self.cfg.relu:
            values = values.relu()
        return self.hook_sae_acts_post(torch.zeros_like(pre).scatter_(-1, indices, values))

    def encode_sparse(self, x: torch.Tensor) -> TopKCodes:
        """Top-k codes without any dense ``N x d_sae`` code tensor (pre-activations are chunked).

        Runs the fastest exact path for the device (see :mod:`qscope_plugins.sae.kernels`);
        under ``torch.no_grad()`` / ``inference_mode()`` fp32 SAEs can take the bf16-screened path
        (same codes as fp32 up to ties within fp32 rounding; ``sae.screen = "off"`` turns it off)
        and the Triton path can be taken on CUDA.
        """
        x, W_rows, b_enc = self._check_input(x), self.W_enc.T, self.b_enc
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.cfg.rescale_acts_by_decoder_norm:
            norms = self.W_dec.norm(dim=-1)
            W_rows, b_enc = W_rows * norms[:, None], b_enc * norms
        values, indices = topk_encode(x, W_rows, b_enc, self.cfg.k, chunk_bytes=self.chunk_bytes,
                                       screen=self.screen)
        return TopKCodes(values.relu() if self.cfg.relu else values, indices)

    # ------------------------------------------------------------------ decoder
    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``x_hat = sum_i values_i W_dec[indices_i] + b_dec``, shape ``(..., d_in)``."""
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self.W_dec.norm(dim=-1)[indices]
        return sparse_decode(values, indices, self.W_dec, self.b_dec, chunk_bytes=self.chunk_bytes)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode_sparse(*encode_sparse(x))``: the fast reconstruction, no hooks."""
        return self.decode_sparse(*self.encode_sparse(x))

    # ------------------------------------------------------------------ features
    def direction(self, feature: int) -> torch.Tensor:
        """The raw decoder column of ``feature`` (not re-normalised), shape ``(d_in,)``."""
        return self.directions([feature])[0]

    def directions(self, features: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Raw decoder columns of ``features``, shape ``(len(features), d_in)`` (a copy)."""
        ids = self._check_features(features)
        return self.W_dec.detach()[ids.to(self.W_dec.device)].clone()

    def encoder_rows(self, features: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the encoder rows ``(len(features), d_in)`` and biases ``(len(features),)`` of ``features``."""
        ids = self._check_features(features).to(self.W_enc.device)
        return self.W_enc.detach()[:, ids].T.clone(), self.b_enc.detach()[ids].clone()

    def _check_features(self, features: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(features, dtype=torch.long).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.cfg.d_sae)]
        if bad.numel():
            raise ValueError(f"feature id {int(bad[0])} out of range [0, {self.cfg.d_sae}) for this SAE")
        return ids

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"input last dimension {x.shape[-1]} != SAE d_in {self.cfg.d_in}")
        return x

    @override
    def process_state_dict_for_saving(self, state_dict: dict) -> None:
        # safetensors needs contiguous tensors; W_enc is usually a transposed view.
        state_dict["W_enc"] = state_dict["W_enc"].contiguous()


SAELENS_METADATA: dict = {
    # Qwen tokenizers define no BOS token and the HF tokenizer (the model cards' demo) prepends
    # nothing, so the SAEs read activations of raw text; with prepend_bos=True TransformerLens
    # would put its stand-in BOS (the EOS token, <|endoftext|>) first, a position the SAEs never saw.
    "prepend_bos": False,
    # The training context length is not published; 1024 is SAELens's own placeholder for these
    # SAEs (its qwen_scope loader), a length the Qwen3 / Qwen3.5 models handle natively.
    "context_size": 1024,
    # The training data ("in-house pretraining data") is not released.
    "dataset_path": None,
    "exclude_special_tokens": False,
    # HF activations; TransformerLens's default processing leaves the residual stream of these
    # RMSNorm models unchanged (docs/models.md), so nothing needs to be switched off.
    "model_from_pretrained_kwargs": {},
}
"""Metadata every loaded SAE carries for SAELens's tools (copied into each config)."""


def make_config(
    d_model: int,
    d_sae: int,
    k: int,
    *,
    layer: int | None = None,
    relu: bool = True,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    model_name: str | None = None,
    hf_hook_name: str | None = None,
    metadata: dict | None = None,
) -> QwenScopeSAEConfig:
    """A config with the Qwen-Scope conventions and the SAELens metadata its tools read.

    ``ActivationsStore.from_sae`` and ``sae_lens.evals`` need ``context_size``, ``prepend_bos`` and
    ``model_from_pretrained_kwargs`` (a dict: ``evals`` unpacks it); the values are
    :data:`SAELENS_METADATA`, and ``metadata`` overrides any of them.
    """
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.util import dtype_to_str

    from .format import as_index

    k = as_index(k, "k")
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k}")
    if k > d_sae:
        raise ValueError(f"k={k} exceeds d_sae={d_sae}")
    layer = None if layer is None else as_index(layer, "layer")
    meta = {
        "model_name": model_name,
        "hook_name": f"blocks.{layer}.hook_resid_post" if layer is not None else None,
        "hf_hook_name": hf_hook_name,
        "hook_head_index": None,
        **copy.deepcopy(SAELENS_METADATA),
        **(metadata or {}),
    }
    return QwenScopeSAEConfig(
        d_in=d_model,
        d_sae=d_sae,
        k=k,
        relu=relu,
        dtype=dtype if isinstance(dtype, str) else dtype_to_str(dtype),
        device=str(device),
        apply_b_dec_to_input=False,
        normalize_activations="none",
        metadata=SAEMetadata(**meta),
    )
