"""Recipes need only the Backend interface: every recipe module imports, and the recipes run on an
HF model, with TransformerLens, SAELens and nnsight made unimportable.

Run as a script, this module blocks the three frameworks (a meta-path finder that raises
``ImportError`` for them), imports every module under ``qscope_plugins.recipes``, runs
:func:`run_recipes` and prints the results as JSON; the tests run it in a subprocess and compare
with the same functions run here, frameworks available. The SAE is a plain-torch Top-k SAE
defined below (``qscope_plugins.sae`` builds on SAELens, so it is blocked too).
"""

from __future__ import annotations

import importlib
import importlib.abc
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch

BLOCKED = ("transformer_lens", "sae_lens", "nnsight")
LAYER = 1
TEXTS = ["Hello world, this is a test", "ab", "The quick brown fox jumps", "SAE quality per layer!"]


class Blocker(importlib.abc.MetaPathFinder):
    """Makes ``BLOCKED`` (and their submodules) unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked for this test")
        return None


class Codes(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


class TopKSAE:
    """The least a recipe asks of an SAE, in plain torch: ``W_enc`` ``(d_in, d_sae)``, Top-k ReLU codes."""

    def __init__(self, d_in: int, d_sae: int, k: int, layer: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.W_dec = torch.randn(d_sae, d_in, generator=gen)
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        self.W_enc = self.W_dec.T + 0.01 * torch.randn(d_in, d_sae, generator=gen)
        self.b_enc = 0.1 * torch.randn(d_sae, generator=gen)
        self.b_dec = 0.1 * torch.randn(d_in, generator=gen)
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_sae, k=k)
        self.d_in, self.d_sae, self.k = d_in, d_sae, k  # the protocol's sizes (qscope_plugins.sae.SparseAutoencoder)
        self.layer = layer

    def encode_sparse(self, x: torch.Tensor):
        values, indices = (x @ self.W_enc + self.b_enc).topk(self.cfg.k, dim=-1)
        return Codes(values.relu(), indices)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return (values.unsqueeze(-1) * self.W_dec[indices]).sum(-2) + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_sparse(*self.encode_sparse(x))

    complete = True  # every feature held: Top-k works
    metadata: dict = {}

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    def directions(self, features) -> torch.Tensor:
        return self.W_dec[torch.as_tensor(features, dtype=torch.long)]

    def encoder_rows(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(features, dtype=torch.long)
        return self.W_enc[:, ids].T.clone(), self.b_enc[ids].clone()


def recipe_modules() -> list[str]:
    import qscope_plugins.recipes as recipes

    return sorted(m.name for m in pkgutil.walk_packages(recipes.__path__, recipes.__name__ + "."))


def run_recipes() -> dict:
    """sae_eval, rollouts and SASFT end to end on a tiny HF Qwen3; plain values (JSON)."""
    from qscope_plugins.backends import Intervention, Sampling
    from qscope_plugins.backends.hf import HFBackend
    from qscope_plugins.recipes.rollouts import grouped_rollouts, trl_rollout_func
    from qscope_plugins.recipes.sae_eval import evaluate_sae
    from qscope_plugins.recipes.sasft import SASFTLoss, estimate_alpha
    from qscope_plugins.testing.tiny_models import tiny_model, tiny_tokenizer

    torch.set_num_threads(1)
    model, tok = tiny_model("Qwen3ForCausalLM", seed=3), tiny_tokenizer()
    backend = HFBackend(model, tok)
    sae = TopKSAE(64, 256, 8, LAYER, seed=5)
    evals = evaluate_sae(backend, {LAYER: sae}, TEXTS, skip_first_token=True, batch_size=3)
    steer = [Intervention(LAYER, vector=3 * sae.W_dec[7])]
    completions, mask = grouped_rollouts(backend, TEXTS[:2] * 2, steer, group_size=2, max_new_tokens=4,
                                         sampling=Sampling())
    trainer = SimpleNamespace(
        model=model, processing_class=tok,
        args=SimpleNamespace(num_generations=2, max_completion_length=4, temperature=1.0, top_k=None, top_p=None),
        accelerator=SimpleNamespace(process_index=0, unwrap_model=lambda m: m),
    )
    trl = trl_rollout_func(steer, sampling=Sampling())(TEXTS[:2] * 2, trainer)
    features = {LAYER: [3, 7, 11]}
    baselines = estimate_alpha(backend, {LAYER: sae}, {"en": TEXTS[:2], "xx": TEXTS[2:]}, features=features)
    ids = torch.tensor([tok("hello there")["input_ids"]] * 2)
    labels = ids.clone()
    labels[:, 0] = -100
    with SASFTLoss({LAYER: sae}, baselines, target_language="en", weight=1.0).attach(model) as sasft:
        model(input_ids=ids)
        penalty = sasft(labels, ["en", "xx"]).item()
    return {
        "sae_eval": evals[LAYER].to_dict(),
        "rollouts": {"tokens": [g.token_ids for g in completions], "steered": mask},
        "trl": {"completion_ids": trl["completion_ids"], "steered": trl["steered"]},
        "sasft": {"alpha": baselines.alpha[LAYER].tolist(), "penalty": penalty},
    }


def main() -> None:
    sys.meta_path.insert(0, Blocker())
    failed = {}
    for name in recipe_modules():
        try:
            importlib.import_module(name)
        except ImportError as err:
            failed[name] = str(err)
    results = run_recipes()
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps({"modules": recipe_modules(), "failed": failed, "loaded": loaded, "results": results}))


@pytest.fixture(scope="module")
def blocked_run() -> dict:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_recipe_imports_without_the_frameworks(blocked_run):
    assert "qscope_plugins.recipes.sae_eval" in blocked_run["modules"] and len(blocked_run["modules"]) > 10
    assert blocked_run["failed"] == {}
    assert blocked_run["loaded"] == []


def test_recipes_run_on_hf_without_the_frameworks(blocked_run):
    """Same numbers as with the frameworks importable: nothing falls back to another path."""
    got, want = blocked_run["results"], json.loads(json.dumps(run_recipes()))
    assert got == want
    metrics = got["sae_eval"]
    assert metrics["n_tokens"] > 0 and metrics["ce_loss_clean"] > 0 and metrics["ce_loss_recovered"] is not None
    assert metrics["ce_loss_with_sae_and_error"] == pytest.approx(metrics["ce_loss_clean"], abs=1e-5)
    assert got["rollouts"]["steered"] == [False, True, False, True] == got["trl"]["steered"]
    assert got["rollouts"]["tokens"] == got["trl"]["completion_ids"]
    assert got["sasft"]["penalty"] >= 0


def test_the_plain_sae_scores_as_the_released_sae_class():
    """The stand-in SAE is faithful: ``QwenScopeSAE`` with its weights gives the same metrics."""
    from qscope_plugins.backends.hf import HFBackend
    from qscope_plugins.recipes.sae_eval import evaluate_sae
    from qscope_plugins.sae import QwenScopeSAE
    from qscope_plugins.testing.tiny_models import tiny_model, tiny_tokenizer

    backend = HFBackend(tiny_model("Qwen3ForCausalLM", seed=3), tiny_tokenizer())
    plain = TopKSAE(64, 256, 8, LAYER, seed=5)
    released = QwenScopeSAE.from_weights(plain.W_enc.T, plain.W_dec.T, plain.b_enc, plain.b_dec, k=8, layer=LAYER)
    got = evaluate_sae(backend, {LAYER: plain}, TEXTS, skip_first_token=True, batch_size=3)[LAYER].to_dict()
    want = evaluate_sae(backend, {LAYER: released}, TEXTS, skip_first_token=True, batch_size=3)[LAYER].to_dict()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


if __name__ == "__main__":
    main()
