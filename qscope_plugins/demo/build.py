"""Build the nano artifacts: ``python -m qscope_plugins.demo.build --out DIR``.

Steps, all seeded by :class:`~qscope_plugins.demo.config.BuildConfig`: draw the lexicon, train the
tokenizer, train the nano ``Qwen3ForCausalLM``, capture its residual stream (the output of every
decoder layer) on fresh documents, train one Top-k SAE per layer, check each on held-out
documents, and write everything with a manifest. The output directory is written next to its
final place and renamed into it only when complete, so a failed build leaves the old one intact.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .._io import make_temp_dir, replace_dir
from .assets import MANIFEST, MODEL_DIR, SAE_DIR, SAFETENSORS_DIR, corpus_generator
from .config import BuildConfig
from .corpus import CorpusGenerator, Document
from .lm import pack_rows, train_lm
from ..sae.metrics import explained_variance
from .sae_train import encode, reconstruct, train_nano_sae

log = logging.getLogger(__name__)


def token_docs(tokenizer, docs: Iterable[Document], chunk: int = 512) -> Iterator[list[int]]:
    """Token ids of each document, tokenised in chunks (fast tokenizers batch well)."""
    batch: list[str] = []
    for doc in docs:
        batch.append(doc.text)
        if len(batch) == chunk:
            yield from tokenizer(batch)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch)["input_ids"]


def residual_rows(model, tokenizer, gen: CorpusGenerator, seed: int, n_rows: int, seq_len: int) -> list[torch.Tensor]:
    """Residuals of ``n_rows`` packed rows at every layer: a list of (n_rows * seq_len, d_model)."""
    from ..backends.hf import HFBackend

    rows = pack_rows(token_docs(tokenizer, gen.stream(seed)), seq_len, tokenizer.eos_token_id)
    prompts = [next(rows) for _ in range(n_rows)]
    layers = list(range(model.config.num_hidden_layers))
    chunks: dict[int, list[torch.Tensor]] = {n: [] for n in layers}
    for batch in HFBackend(model, tokenizer).residuals(prompts, layers, batch_size=64):
        for n in layers:
            chunks[n].append(batch.tokens(n).float())
    return [torch.cat(chunks[n]) for n in layers]


def _convert_relative(root: Path, n_layers: int, k: int) -> None:
    """Write the safetensors copies with the project's converter, run from ``root`` so that the
    recorded source path is the relative ``sae/layer{n}.sae.pt``, not this machine's temp dir."""
    from ..sae.convert import convert

    cwd = os.getcwd()
    os.chdir(root)
    try:
        convert(SAE_DIR, Path(SAFETENSORS_DIR), range(n_layers), k=k)
    finally:
        os.chdir(cwd)


def build(cfg: BuildConfig, out: Path) -> dict:
    """Run the whole build into ``out`` (replaced atomically); returns the manifest."""
    from ..sae.convert import sha256_file
    from ..sae.format import save_layer_file
    from .tokenizer import train_tokenizer

    start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 1)
        log.info("%s done (%.1f s)", name, timings[name])

    gen = corpus_generator(cfg)
    tokenizer = train_tokenizer([d.text for d in gen.documents(cfg.tokenizer_seed, cfg.tokenizer_docs)],
                                cfg.vocab_size)
    lap("tokenizer")
    eos = tokenizer.eos_token_id
    rows = pack_rows(token_docs(tokenizer, gen.stream(cfg.lm_seed)), cfg.model.seq_len, eos)
    model = train_lm(rows, cfg.model, len(tokenizer), eos)
    lap("lm")
    train_acts = residual_rows(model, tokenizer, gen, cfg.sae_seed, cfg.sae_train_rows, cfg.model.seq_len)
    heldout = residual_rows(model, tokenizer, gen, cfg.sae_heldout_seed, cfg.sae_heldout_rows, cfg.model.seq_len)
    lap("activations")
    states, quality = [], []
    for n, acts in enumerate(train_acts):
        state = train_nano_sae(acts, cfg.sae)
        fired = (encode(state, heldout[n], cfg.sae.k) > 0).any(0)
        ev = explained_variance(heldout[n], reconstruct(state, heldout[n], cfg.sae.k))
        quality.append({"layer": n, "explained_variance": round(ev, 4),
                        "dead_features": int((~fired).sum())})
        log.info("layer %d: %s", n, quality[-1])
        states.append(state)
    lap("saes")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        model.save_pretrained(tmp / MODEL_DIR)
        tokenizer.save_pretrained(tmp / MODEL_DIR)
        (tmp / SAE_DIR).mkdir()
        for n, state in enumerate(states):
            save_layer_file(tmp / SAE_DIR / f"layer{n}.sae.pt", state)
        _convert_relative(tmp, len(states), cfg.sae.k)
        lap("write")
        manifest = {
            "config_hash": cfg.hash(),
            "config": cfg.to_dict(),
            "sae": {"k": cfg.sae.k, "d_model": cfg.model.hidden_size,
                    "d_sae": cfg.sae.expansion * cfg.model.hidden_size, "layers": len(states)},
            "quality": quality,
            "build_seconds": timings,
            "build_cpu_seconds": round(time.process_time() - cpu_start, 1),
            "platform": {"python": platform.python_version(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "machine": platform.machine()},
            "files": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qscope_plugins.demo.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced when the build succeeds)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as in CI)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    manifest = build(BuildConfig(), args.out)
    print(json.dumps({key: manifest[key] for key in ("config_hash", "quality", "build_seconds", "build_cpu_seconds")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
