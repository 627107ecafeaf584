"""SAE files in the exact released layout, and fake hub caches, for offline tests and demos."""

from __future__ import annotations

from pathlib import Path

import torch

from ..catalog import LAYER_FILE
from ..sae.format import save_layer_file


def random_sae_state(d_model: int, d_sae: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The four tensors of a layer file in the released orientation, random but well scaled.

    Decoder columns have unit norm and the encoder is their transpose plus noise, so encoding
    a decoder direction selects that feature, as a trained SAE would.
    """
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_model, d_sae, generator=gen)
    W_dec /= W_dec.norm(dim=0, keepdim=True)
    W_enc = W_dec.T + 0.01 * torch.randn(d_sae, d_model, generator=gen)
    state = {
        "W_enc": W_enc,
        "W_dec": W_dec,
        "b_enc": -0.05 * torch.rand(d_sae, generator=gen),
        "b_dec": 0.1 * torch.randn(d_model, generator=gen),
    }
    return {key: value.to(dtype).contiguous() for key, value in state.items()}


def write_released_layer(directory: str | Path, layer: int, state: dict[str, torch.Tensor]) -> Path:
    """Write ``directory/layer{n}.sae.pt`` exactly as Qwen-Scope ships it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return save_layer_file(directory / LAYER_FILE.format(layer=layer), state)


def make_fake_hub_repo(
    cache_dir: str | Path,
    repo_id: str,
    layers: dict[int, dict[str, torch.Tensor]],
    *,
    revision: str = "0123456789abcdef0123456789abcdef01234567",
) -> Path:
    """Lay out ``repo_id`` in a Hugging Face hub cache (``models--Org--Name/{refs/main, snapshots/<sha>/}``).

    Point ``HF_HUB_CACHE`` at ``cache_dir`` and set ``HF_HUB_OFFLINE=1`` to load from it.
    Returns the snapshot directory.
    """
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    for layer, state in layers.items():
        write_released_layer(snapshot, layer, state)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot
