"""Miniature of the report's code-switching case: find the B-language feature(s), clamp them.

Discovery contrasts *positions*, not texts: on A documents that switch into B, positions whose
next token is in B's script (and whose own token is not) against positions whose next token is
not. Those are the tokens where the model decides to switch, so the features that separate them
carry the decision. Suppression clamps the chosen features to 0 wherever they fire (the steering
recipe's clamp, reconstruction error kept), so text where they are silent is left untouched.

Which layer and how many features are picked on a selection split of prompts (lowest switch rate
with at most a small perplexity rise), and the result is then measured on held-out prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import Backend, Intervention
from ..recipes.discovery import FeatureStats
from ..recipes.steering import clamp
from .lexicon import CJK

Head = Callable[[Tensor], Tensor]
"""Maps the last decoder layer's output to logits (final norm, then unembedding)."""


def script_tokens(tokenizer) -> Tensor:
    """``(vocab,)`` bool: the token's bytes belong to B's script (the corpus's only non-ASCII text)."""
    flags = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        flags.append(bool(CJK.search(text)) or "\ufffd" in text)  # a partial UTF-8 sequence decodes to U+FFFD
    return torch.tensor(flags)


def switched(text: str) -> bool:
    """Does a continuation contain any B-script character (the report's code-switch indicator)."""
    return bool(CJK.search(text))


@torch.no_grad()
def next_token_contrast(backend: Backend, saes: Mapping[int, object], texts: Sequence[str], target: Tensor,
                        *, batch_size: int = 32) -> dict[int, Tensor]:
    """Per layer, mean activation where the next token is a ``target`` token (the current one is
    not) minus mean activation where the next token is not a target token."""
    pos = {n: FeatureStats.empty(sae.cfg.d_sae) for n, sae in saes.items()}
    neg = {n: FeatureStats.empty(sae.cfg.d_sae) for n, sae in saes.items()}
    for rb in backend.residuals(texts, list(saes), batch_size=batch_size):
        ids = rb.batch.input_ids.cpu()
        real = (rb.mask[:, :-1] & rb.mask[:, 1:]).cpu()
        nxt, cur = target[ids[:, 1:]], target[ids[:, :-1]]
        for stats, mask in ((pos, real & nxt & ~cur), (neg, real & ~nxt)):
            for n, sae in saes.items():
                codes = sae.encode_sparse(rb.hidden[n][:, :-1][mask.to(rb.hidden[n].device)].float())
                stats[n].update(codes.values, codes.indices)
    return {n: pos[n].mean - neg[n].mean for n in saes}


@torch.no_grad()
def mean_nll(backend: Backend, head: Head, texts: Sequence[str], interventions: Sequence[Intervention] = (),
             *, batch_size: int = 32) -> float:
    """Mean next-token negative log-likelihood of ``texts`` with ``interventions`` applied.

    Backends capture residuals, not logits, so this reads the last decoder layer's output (edited
    by any intervention upstream) and applies the model's own final norm and unembedding.
    """
    last = backend.n_layers - 1
    total, count = 0.0, 0
    for rb in backend.residuals(texts, [last], batch_size=batch_size, interventions=interventions):
        logits = head(rb.hidden[last][:, :-1].float())
        mask = rb.mask[:, 1:]
        targets = rb.batch.input_ids[:, 1:][mask]
        total += float(torch.nn.functional.cross_entropy(logits[mask], targets, reduction="sum"))
        count += int(mask.sum())
    return total / count


def switch_rate(backend: Backend, prompts: Sequence[str], interventions: Sequence[Intervention] = (), *,
                max_new_tokens: int = 16, batch_size: int = 100) -> list[bool]:
    """Per prompt: does the greedy continuation switch into B."""
    outs = backend.generate(prompts, max_new_tokens=max_new_tokens, interventions=interventions, batch_size=batch_size)
    return [switched(g.text) for g in outs]


@dataclass(frozen=True)
class Suppression:
    layer: int
    features: tuple[int, ...]
    select_rate: float  # switch rate on the selection prompts with the clamp
    select_ppl_ratio: float

    def intervention(self, saes: Mapping[int, object]) -> Intervention:
        return clamp(saes[self.layer], list(self.features), 0.0, layer=self.layer)


def choose_suppression(backend: Backend, saes: Mapping[int, object], head: Head, diffs: Mapping[int, Tensor],
                       prompts: Sequence[str], texts: Sequence[str], *, sizes: Sequence[int] = (1, 2, 4, 8),
                       max_ppl_ratio: float = 1.05, tolerance: float = 0.02,
                       progress: Callable | None = None) -> Suppression:
    """The (layer, top-n features) clamp to use, chosen on ``prompts`` and ``texts`` only.

    Candidates whose perplexity ratio on ``texts`` exceeds ``max_ppl_ratio`` are dropped; among
    those whose switch rate on ``prompts`` is within ``tolerance`` of the lowest, the one with the
    fewest features wins (then the lower rate): the smallest explanation that does the job.
    """
    base_nll = mean_nll(backend, head, texts)
    found: list[Suppression] = []
    grid = [(n, size) for n in sorted(diffs) for size in sizes]
    for n, size in progress(grid) if progress else grid:
        feats = tuple(int(f) for f in torch.argsort(diffs[n], descending=True)[:size])
        iv = [clamp(saes[n], list(feats), 0.0, layer=n)]
        ratio = float(torch.exp(torch.tensor(mean_nll(backend, head, texts, iv) - base_nll)))
        if ratio <= max_ppl_ratio:
            rate = sum(switch_rate(backend, prompts, iv)) / len(prompts)
            found.append(Suppression(n, feats, rate, ratio))
    if not found:
        raise ValueError(f"no clamp kept the perplexity ratio within {max_ppl_ratio}")
    best = min(s.select_rate for s in found)
    return min((s for s in found if s.select_rate <= best + tolerance),
               key=lambda s: (len(s.features), s.select_rate))
