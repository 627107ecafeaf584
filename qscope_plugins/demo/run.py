"""``qscope demo``: the report's experiments in miniature on the shipped nano model, offline.

The nano model is loaded as a TransformerLens ``HookedTransformer`` and as an nnsight model (and
greedy generations are checked to agree); its SAEs come from the released-layout files through
``load_sae``. Every step uses the project's recipes and backends on held-out data regenerated from
the build's seeds:

1. SAE explained variance per layer;
2. code-switching: find the B-language feature(s) by contrast, clamp them, measure the switch rate
   before/after on held-out prompts and the perplexity ratio on monolingual text;
3. the toxicity OR-rule classifier's held-out F1;
4. benchmark redundancy: ``R_hat`` from footprints against performance-based ``R`` (Spearman).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_with, write_json
from .assets import ASSETS, MODEL_DIR, SAE_DIR, corpus_generator, read_manifest
from .benchmarks import build_suite
from .config import BuildConfig, EvalSeeds
from .lexicon import TOPICS
from .language import choose_suppression, mean_nll, next_token_contrast, script_tokens, switch_rate
from .redundancy import redundancy
from .toxicity import toxicity_classifier

SUMMARY = "summary.json"
EVAL = EvalSeeds()


@dataclass(frozen=True)
class DemoSizes:
    """How much held-out data each step uses (the defaults meet the issue's noise requirement)."""

    ev_docs: int = 64
    contrast_docs: int = 600
    select_prompts: int = 200
    select_texts: int = 100
    prompts: int = 600
    monolingual: int = 300
    toxicity_per_class: int = 500
    agreement_prompts: int = 24

    @classmethod
    def quick(cls) -> DemoSizes:
        """A smoke-test size: every step runs, on a fifth of the data (noisier numbers)."""
        return cls(32, 200, 60, 40, 120, 60, 100, 8)


@torch.no_grad()
def _explained_variance(backend, saes, texts) -> list[float]:
    """:func:`~qscope_plugins.sae.metrics.explained_variance` per layer over every token of ``texts``."""
    from ..sae.metrics import explained_variance

    layers = sorted(saes)
    xs: dict[int, list[torch.Tensor]] = {n: [] for n in layers}
    for rb in backend.residuals(texts, layers, batch_size=32):
        for n in layers:
            xs[n].append(rb.tokens(n).float())
    out = []
    for n in layers:
        x = torch.cat(xs[n])
        out.append(explained_variance(x, saes[n].decode(saes[n].encode(x))))
    return out


def run_demo(out: Path | None, *, sizes: DemoSizes = DemoSizes(), say: Callable[[str], None] = print,
             progress: bool = True) -> dict:
    """Run every step; write ``summary.json`` and PNG plots to ``out`` (unless ``None``); return the summary."""
    from ..backends.nnsight import NNsightBackend
    from ..backends.transformer_lens import TransformerLensBackend
    from ..sae.loading import load_sae

    start = time.perf_counter()
    manifest = read_manifest()
    cfg, gen = BuildConfig(), corpus_generator()
    model_dir = str(ASSETS / MODEL_DIR)
    say(f"nano Qwen3 ({manifest['sae']['layers']} layers, d_model {manifest['sae']['d_model']}), "
        f"SAEs W{manifest['sae']['d_sae']} k={manifest['sae']['k']}, build {manifest['config_hash'][:12]}")
    hooked = TransformerLensBackend.from_pretrained(model_dir, hooked=True)
    traced = NNsightBackend.from_pretrained(model_dir)
    saes = {n: load_sae(ASSETS / SAE_DIR, n, k=manifest["sae"]["k"]) for n in range(manifest["sae"]["layers"])}

    bar = _progress_factory(progress)
    say("1/4 SAE explained variance on held-out documents")
    ev = _explained_variance(hooked, saes, [d.text for d in gen.documents(cfg.sae_heldout_seed, sizes.ev_docs)])

    say("2/4 code-switching: contrast, choose the clamp on a selection split, measure on held-out prompts")
    check = [p for p, _ in gen.switch_prompts(EVAL.agreement, sizes.agreement_prompts)]
    agree = [g.token_ids for g in hooked.generate(check, max_new_tokens=16)] == \
            [g.token_ids for g in traced.generate(check, max_new_tokens=16)]
    target = script_tokens(hooked.tokenizer)
    contrast_docs = [d.text for d in gen.documents(EVAL.contrast, sizes.contrast_docs, lang="A")]
    diffs = next_token_contrast(hooked, saes, contrast_docs, target)
    select_prompts = [p for p, _ in gen.switch_prompts(EVAL.switch_select, sizes.select_prompts)]
    select_texts = [d.text for d in gen.documents(EVAL.monolingual_select, sizes.select_texts, lang="A",
                                                   toxic=False, cues=False)]
    head = traced.logits  # the final norm and unembedding of the model the loss is measured on
    chosen = choose_suppression(traced, saes, head, diffs, select_prompts, select_texts, progress=bar)
    prompts = gen.switch_prompts(EVAL.switch_prompts, sizes.prompts)
    texts = [d.text for d in gen.documents(EVAL.monolingual, sizes.monolingual, lang="A", toxic=False, cues=False)]
    iv = [chosen.intervention(saes)]
    before = switch_rate(traced, [p for p, _ in prompts])
    after = switch_rate(traced, [p for p, _ in prompts], iv)
    ppl_ratio = float(np.exp(mean_nll(traced, head, texts, iv) - mean_nll(traced, head, texts)))

    say("3/4 toxicity classifier (OR rule over SAE features)")
    tox = toxicity_classifier(hooked, saes, gen.toxicity_set(EVAL.toxicity_select, sizes.toxicity_per_class),
                              gen.toxicity_set(EVAL.toxicity_eval, sizes.toxicity_per_class))

    say("4/4 benchmark redundancy from feature footprints")
    layer = max(saes)  # fixed in advance: the last layer, whose last token has read the whole item
    red = redundancy(hooked, saes[layer], layer, build_suite(gen.lex, cfg.benchmarks))

    topics = np.array([t for _, t in prompts])
    summary = {
        "code_switch_rate_before": float(np.mean(before)),
        "code_switch_rate_after": float(np.mean(after)),
        "perplexity_ratio": ppl_ratio,
        "classifier_f1": tox.held_out.f1,
        "redundancy_spearman": red.spearman,
        "sae_explained_variance_min": min(ev),
        "sae_explained_variance": ev,
        "code_switch": {
            "prompts": len(prompts),
            "layer": chosen.layer,
            "features": list(chosen.features),
            "rate_by_topic_before": [float(np.mean(np.array(before)[topics == t])) for t in range(gen.n_topics)],
            "rate_by_topic_after": [float(np.mean(np.array(after)[topics == t])) for t in range(gen.n_topics)],
            "ground_truth_switch_prob": [cfg.corpus.switch_prob(t, gen.n_topics) for t in range(gen.n_topics)],
            "monolingual_texts": len(texts),
        },
        "classifier": {
            "layer": tox.classifier.layers[0],
            "features": list(tox.classifier.features),
            "held_out": tox.held_out.to_dict(),
            "selection_f1": tox.select_f1,
        },
        "redundancy": {
            "layer": red.layer,
            "benchmarks": list(red.names),
            "r_hat": list(red.r_hat),
            "r": list(red.r),
            "footprint_sizes": list(red.footprint_sizes),
            "overlap": red.overlap.round(4).tolist(),
        },
        "backends_agree": agree,
        "build": manifest["config_hash"],
        "device": f"cpu ({torch.get_num_threads()} threads, {platform.machine()})",
        "seconds": round(time.perf_counter() - start, 1),
    }
    if out is not None:
        write_outputs(Path(out), summary)
    return summary


def _progress_factory(enabled: bool):
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc="clamp sweep", leave=False, disable=not enabled)


def write_outputs(out: Path, summary: dict) -> None:
    """``summary.json`` and three PNG plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SUMMARY, summary)

    cs = summary["code_switch"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(cs["rate_by_topic_before"]))
    ax.bar(x - 0.2, cs["rate_by_topic_before"], 0.4, label="baseline")
    label = f"clamped: layer {cs['layer']}, {len(cs['features'])} feature(s)"
    ax.bar(x + 0.2, cs["rate_by_topic_after"], 0.4, label=label)
    ax.set_xticks(x, [f"{name}\n(p={p:g})" for name, p in zip(TOPICS, cs["ground_truth_switch_prob"])], fontsize=7)
    ax.set(ylabel="code-switch rate", ylim=(0, 1.05),
           title=f"greedy code-switching, perplexity ratio {summary['perplexity_ratio']:.3f}")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    atomic_write_with(out / "code_switch.png", lambda path: fig.savefig(path, dpi=120))
    plt.close(fig)

    clf = summary["classifier"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    by_k: dict[str, list[tuple[int, float]]] = {}
    for key, f1 in clf["selection_f1"].items():
        layer, k = key.split("/")
        by_k.setdefault(k, []).append((int(layer), f1))
    for k, points in by_k.items():
        ax.plot(*zip(*sorted(points)), marker="o", label=f"K={k}")
    ax.set(xlabel="layer", ylabel="F1 (selection split)",
           title=f"toxicity OR rule: held-out F1 {summary['classifier_f1']:.3f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_with(out / "classifier.png", lambda path: fig.savefig(path, dpi=120))
    plt.close(fig)

    red = summary["redundancy"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(red["r_hat"], red["r"])
    for name, a, b in zip(red["benchmarks"], red["r_hat"], red["r"]):
        ax.annotate(name, (a, b), fontsize=6)
    ax.set(xscale="log", xlabel="R_hat (feature footprints)", ylabel="R (model panel)",
           title=f"benchmark redundancy, Spearman rho {summary['redundancy_spearman']:.3f}")
    ax.set_xticks([1, 2, 5, 10, 20])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    atomic_write_with(out / "redundancy.png", lambda path: fig.savefig(path, dpi=120))
    plt.close(fig)
