"""Train a Top-k SAE on a Qwen residual stream with SAELens's own runner; export it in the Qwen-Scope layout.

For an SAE Qwen-Scope does not ship (another checkpoint, another layer), with the tools users
already have. What SAELens does, unchanged: the model (``HookedTransformer``, reaching Qwen3 /
Qwen3-MoE / Qwen3.5 through this package's adapters, so ``register()`` runs first), the activation
store, tokenisation and batching, the Top-k SAE (``TopKTrainingSAEConfig``) with its AuxK loss
against dead features (weight 1/32 as in the report), dead-feature tracking, the optimiser and
schedule, checkpoints and resuming (``n_checkpoints`` / ``resume_from_checkpoint``), and dropping the
first token of each context (``seqpos_slice``).

What SAELens cannot do, done here in the least code:

* **Extreme-norm filtering** (the report drops activations of extreme L2 norm, "most often ... the
  first token"; threshold unpublished): SAELens has no such filter, so :class:`NormFilter` wraps
  the store's ``get_filtered_llm_batch`` and drops activations whose norm exceeds
  ``factor x`` the batch median (10x, as in other public Qwen3 SAEs).
* **Export in the released layout**: :func:`export_qwen_scope` folds SAELens's decoder-norm
  rescaling (with SAELens's own ``fold_W_dec_norm``) and any ``b_dec`` pre-subtraction into the
  weights, so the file computes exactly ``ReLU(TopK_k(W_enc x + b_enc))`` / ``W_dec z + b_dec`` on
  raw residuals, then writes ``layer{n}.sae.pt`` (:func:`~qscope_plugins.sae.format.save_layer_file`)
  and ``layer{n}/`` safetensors + sidecar (:func:`~qscope_plugins.sae.convert.convert_layer`).

On activations already in memory (the nano build's SAEs), :func:`train_sae_on_activations` runs
SAELens's ``SAETrainer`` itself, with the initialisation, input scale, schedule and AuxK
accounting small clustered data needs as options of ours (``docs/training_saes.md``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..catalog import LAYER_FILE

log = logging.getLogger(__name__)

AUX_WEIGHT = 1 / 32
"""The report's auxiliary-loss weight against dead features (following Gao et al. 2024)."""

NORM_FACTOR = 10.0
"""Drop activations whose L2 norm exceeds this multiple of the batch median."""


def drop_extreme_norms(acts: Tensor, factor: float) -> Tensor:
    """The rows of ``acts`` ``(N, d)`` whose L2 norm is at most ``factor`` times the median norm."""
    norms = acts.norm(dim=-1)
    return acts[norms <= factor * norms.median()]


class NormFilter:
    """Wraps an ``ActivationsStore``'s batch source so every training batch is norm-filtered.

    Counts what it kept and dropped (``kept`` / ``dropped``, in tokens) for the training log.
    """

    def __init__(self, store: Any, factor: float) -> None:
        if factor <= 1:
            raise ValueError(f"the norm filter factor must be > 1 (a multiple of the median), got {factor}")
        self.factor, self.kept, self.dropped = factor, 0, 0
        self._source = store.get_filtered_llm_batch
        store.get_filtered_llm_batch = self

    def __call__(self, *args, **kwargs) -> Tensor:
        acts = self._source(*args, **kwargs)
        kept = drop_extreme_norms(acts, self.factor)
        self.kept += kept.shape[0]
        self.dropped += acts.shape[0] - kept.shape[0]
        return kept


def training_config(
    model: str,
    layer: int,
    *,
    d_in: int,
    d_sae: int,
    k: int,
    training_tokens: int,
    context_size: int = 128,
    train_batch_size_tokens: int = 4096,
    lr: float = 2e-4,
    aux_weight: float = AUX_WEIGHT,
    skip_first_token: bool = True,
    device: str = "cpu",
    **overrides: Any,
):
    """A SAELens ``LanguageModelSAERunnerConfig`` for a Top-k SAE on ``blocks.{layer}.hook_resid_post``.

    ``model`` is a hub id or a local checkpoint directory, loaded by SAELens as a
    ``HookedTransformer`` without weight processing (the residual stream the SAE reads must stay
    HF's). Texts are tokenized without BOS (Qwen has none) and joined with EOS. Nothing goes to
    wandb and nothing is written unless ``overrides`` say so (``output_path``, ``checkpoint_path``,
    ``n_checkpoints``, ``resume_from_checkpoint``, ``logger``, ...).
    """
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    sae = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, aux_loss_coefficient=aux_weight,
                                apply_b_dec_to_input=False, normalize_activations="none")
    settings: dict[str, Any] = dict(
        model_name=model, model_class_name="HookedTransformer", hook_name=f"blocks.{layer}.hook_resid_post",
        dataset_path="local", is_dataset_tokenized=False, streaming=False, context_size=context_size,
        prepend_bos=False, sequence_separator_token="eos", seqpos_slice=(1, None) if skip_first_token else (None,),
        training_tokens=training_tokens, train_batch_size_tokens=train_batch_size_tokens, lr=lr, device=device,
        logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=None, verbose=False,
    )
    return LanguageModelSAERunnerConfig(sae=sae, **(settings | overrides))


@dataclass
class Trained:
    """A finished run: SAELens's trained SAE, its norm filter (``None`` when off) and the export directory."""

    sae: Any
    norm_filter: NormFilter | None
    out_dir: Path | None


def train_sae(cfg, data: Sequence[str] | Any, *, norm_factor: float | None = NORM_FACTOR,
              out_dir: str | os.PathLike | None = None) -> Trained:
    """Run SAELens's ``LanguageModelSAETrainingRunner`` with ``cfg`` (see :func:`training_config`) on
    ``data`` (texts or a ``datasets.Dataset`` with a ``text`` column); export to ``out_dir`` when given.

    ``norm_factor=None`` turns the extreme-norm filter off.
    """
    from datasets import Dataset
    from sae_lens import LanguageModelSAETrainingRunner

    from .. import register

    register()  # HookedTransformer.from_pretrained* must know the Qwen architectures
    if not isinstance(data, Dataset):
        texts = [t for t in data if t.strip()]
        if not texts:
            raise ValueError("no training texts given")
        data = Dataset.from_dict({"text": texts})
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=data)
    norm_filter = NormFilter(runner.activations_store, norm_factor) if norm_factor is not None else None
    sae = runner.run()
    if norm_filter is not None:
        log.info("norm filter: kept %d activations, dropped %d", norm_filter.kept, norm_filter.dropped)
    if out_dir is not None:
        out_dir = export_qwen_scope(sae, out_dir, int(cfg.hook_name.split(".")[1]))
    return Trained(sae, norm_filter, out_dir)


INITS = ("data", "saelens")
"""``init`` of :func:`train_sae_on_activations`: latents at training points, or SAELens's own initialisation."""


@dataclass
class TrainedOnActivations:
    """A finished :func:`train_sae_on_activations` run: SAELens's trained SAE, which reads ``x / scale``."""

    sae: Any
    scale: float

    def released(self) -> dict[str, Tensor]:
        """The four tensors in the released layout, for raw inputs (:func:`released_state`)."""
        return released_state(self.sae, scale=self.scale)


def warm_up_decay(step: int, total: int) -> float:
    """The learning-rate factor of step ``step`` (from 0) of ``total``: linear warm-up over the first
    tenth of the steps, constant, then linear decay to 0 over the last fifth."""
    return min(1.0, 10 * (step + 1) / total, 5 * (1 - step / total))


@contextmanager
def unclipped_gradients(params: Sequence[Any], optimizer: Any) -> Iterator[None]:
    """Within the block, ``optimizer`` steps on the gradients as backward left them.

    SAELens's ``SAETrainer`` clips the gradient norm to 1 between backward and the optimizer step
    (hard-coded); each gradient is kept as autograd finishes it and put back just before the step.
    """
    kept: dict[Any, Tensor] = {}

    def keep(param) -> None:
        kept[param] = param.grad.clone()

    def restore(*_) -> None:
        for param, grad in kept.items():
            param.grad = grad
        kept.clear()

    handles = [param.register_post_accumulate_grad_hook(keep) for param in params]
    handles.append(optimizer.register_step_pre_hook(restore))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_sae_on_activations(
    acts: Tensor,
    *,
    d_sae: int,
    k: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    k_aux: int = 64,
    aux_weight: float = AUX_WEIGHT,
    dead_after_tokens: int = 50_000,
    init: str = "data",
    scale_inputs: bool = True,
) -> TrainedOnActivations:
    """Train a Top-k SAE on activations in memory, ``acts`` ``(tokens, d_in)``, with SAELens's ``SAETrainer``.

    SAELens runs the loop: its trainer, Adam (betas 0.9 / 0.999), the step and sample counts, fed
    by a data provider of ``epochs`` shuffled passes over ``acts`` (``batch_size`` rows a step; the
    last partial batch of a pass is dropped). The SAE is
    :class:`~qscope_plugins.sae.training.AuxKTrainingSAE` (AuxK against latents that have not fired
    for ``dead_after_tokens`` tokens, weight ``aux_weight``, top ``k_aux`` of them; unit-norm
    decoder). Options of ours around the trainer:

    * ``init="data"``: latent ``f`` starts at a random training point (minus the mean), encoder
      ``W_dec^T / k``, ``b_dec`` the mean, which keeps latents alive on small clustered data;
      ``"saelens"`` keeps SAELens's initialisation.
    * ``scale_inputs``: training reads ``x / scale`` (unit variance per coordinate), so one
      learning rate suits every layer; the export folds the scale back in.
    * the schedule :func:`warm_up_decay` (as a ``LambdaLR`` in place of SAELens's scheduler),
      the decoder renormalised after every optimizer step, and no gradient clipping
      (:func:`unclipped_gradients`).

    ``seed`` fixes the initial points and the shuffles (and seeds torch's global generator).
    """
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from ..sae.metrics import explained_variance
    from ..sae.training import AuxKTrainingSAE, AuxKTrainingSAEConfig

    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if acts.ndim != 2 or not acts.is_floating_point():
        raise ValueError(f"acts must be a 2-D float tensor (tokens, d_in), got shape {tuple(acts.shape)} {acts.dtype}")
    n, d_in = acts.shape
    if not 1 <= k <= d_sae:
        raise ValueError(f"k={k} must be in [1, d_sae={d_sae}]")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not torch.isfinite(acts).all():
        raise ValueError("acts contain NaN or Inf")
    steps = epochs * (n // batch_size)
    if steps < 1:
        raise ValueError(f"no training step: {epochs} epoch(s) of {n} activations in batches of {batch_size}")
    if init == "data" and d_sae > n:
        raise ValueError(f"init='data' starts each of the {d_sae} latents at a training point; only {n} given")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean = acts.mean(0)
    scale = float((acts - mean).pow(2).sum(1).mean().sqrt()) / d_in**0.5 if scale_inputs else 1.0
    sae = AuxKTrainingSAE(AuxKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=k, k_aux=k_aux, aux_loss_coefficient=aux_weight,
        dead_after_tokens=dead_after_tokens, device=str(acts.device)))
    if init == "data":
        sae.initialise_at(acts[torch.randperm(n, generator=generator)[:d_sae]] - mean, mean / scale)

    def log_epoch(epoch: int, x: Tensor) -> None:
        with torch.no_grad():
            ev = explained_variance(x, sae.decode(sae.encode(x)))
        log.info("sae epoch %d: explained variance %.4f on its last batch, dead %d", epoch, ev,
                 int((sae.tokens_since_fired > dead_after_tokens).sum()))

    last = {}  # the batch of the latest step

    def batches() -> Iterator[Tensor]:
        for epoch in range(epochs):
            if epoch:  # the trainer asks for this batch once the previous epoch's last step is done
                log_epoch(epoch - 1, last["x"])
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                last["x"] = acts[order[start : start + batch_size]] / scale
                yield last["x"]

    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
            device=str(acts.device), dead_feature_window=max(1, dead_after_tokens // batch_size),
            feature_sampling_window=steps + 1),
        sae=sae, data_provider=batches())
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: warm_up_decay(step, steps))
    normalise = trainer.optimizer.register_step_post_hook(lambda *_: sae.normalise_decoder())
    try:
        with unclipped_gradients(list(sae.parameters()), trainer.optimizer):
            trainer.fit()
    finally:
        normalise.remove()
    log_epoch(epochs - 1, last["x"])  # fit asks for no batch after the last step
    return TrainedOnActivations(sae, scale)


def released_state(sae, *, scale: float = 1.0) -> dict[str, Tensor]:
    """The four tensors of a SAELens Top-k SAE in the released orientation, with every training-time
    convention folded in, so that ``ReLU(TopK_k(W_enc x + b_enc))`` reproduces ``sae.encode(x)``.

    ``scale``: the SAE was trained on ``x / scale``; the export then reads raw ``x`` (its codes are
    ``scale`` times the training codes)."""
    cfg = sae.cfg
    if cfg.architecture() not in ("topk", "qwen_scope_topk"):
        raise ValueError(f"only Top-k SAEs fit the Qwen-Scope format; this one is {cfg.architecture()!r}")
    if cfg.normalize_activations != "none":
        raise ValueError(f"normalize_activations={cfg.normalize_activations!r} cannot be exported: Qwen-Scope "
                         "SAEs read raw residuals (train with normalize_activations='none')")
    from ..sae.format import released_layout  # qscope_plugins.sae imports SAELens: only when exporting

    folded = copy.deepcopy(sae).float()
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        folded.fold_W_dec_norm()  # SAELens's own fold: unit decoder rows, same Top-k choice and output
    return released_layout(folded.W_enc, folded.W_dec, folded.b_enc, folded.b_dec,
                           b_dec_presub=cfg.apply_b_dec_to_input, scale=scale)


def export_qwen_scope(sae, out_dir: str | os.PathLike, layer: int) -> Path:
    """Write ``out_dir/layer{n}.sae.pt`` (released layout) and ``out_dir/layer{n}/`` (safetensors + sidecar).

    Both are written atomically; ``load_sae(out_dir, n, k=k)``, ``load_sae(out_dir / f"layer{n}")`` and
    SAELens's ``SAE.load_from_disk(out_dir / f"layer{n}")`` then give the same SAE. Name ``out_dir``
    like a Qwen-Scope repo (``SAE-Res-<model>-W<width>K-L0_<k>``) and ``k`` is read from the name.
    """
    from ..sae.convert import convert_layer
    from ..sae.format import save_layer_file

    from .._io import atomic_write_with, clean_leftovers, output_lock

    state = released_state(sae)
    out = Path(out_dir)
    with output_lock(out, what="SAE export"):
        out.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        target = out / LAYER_FILE.format(layer=layer)
        atomic_write_with(target, lambda path: save_layer_file(path, state))
        convert_layer(str(out), layer, out, k=sae.cfg.k)
    return out
