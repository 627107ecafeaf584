"""Top-activating contexts of a feature and a one-sentence explanation of it (auto-interpretation)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ...backends import Backend
from ..capture import tokenize
from ..coverage import Complete, FeatureKey

@dataclass(frozen=True)
class Context:
    """A corpus excerpt around the token where a feature peaks."""

    left: str
    peak: str
    right: str
    activation: float

    @property
    def text(self) -> str:
        return f"{self.left}{self.peak}{self.right}"

    @property
    def marked(self) -> str:
        """The excerpt with the peak token marked ``«like this»``."""
        return f"{self.left}«{self.peak}»{self.right}"


@torch.no_grad()
def top_contexts(
    backend: Backend,
    saes: Mapping[int, object],
    corpus: Sequence[str],
    features: Sequence[FeatureKey],
    *,
    n: int = 5,
    window: int = 16,
    skip_first_token: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[FeatureKey, list[Context]]:
    """The ``n`` corpus texts on which each feature peaks highest, as excerpts around the peak token.

    One excerpt per text (its peak), ``window`` tokens before the peak and ``window // 2`` after.
    Streams the corpus; per batch only a ``(B, T, F)`` tensor of the target features exists.
    Features that never fire get an empty list.
    """
    features = [(int(l), int(f)) for l, f in features]
    if not features or len(set(features)) < len(features) or n < 1 or window < 0:
        raise ValueError("top_contexts needs distinct features (at least one), n >= 1 and window >= 0")
    rows = tokenize(backend, list(corpus))
    layers = sorted({l for l, _ in features})
    lookup = {}
    for layer in layers:
        sae = saes[layer]
        backend.check_sae(sae, layer)
        table = torch.full((int(sae.cfg.d_sae),), len(features), dtype=torch.long)
        table[[f for l, f in features if l == layer]] = torch.tensor([j for j, (l, _) in enumerate(features) if l == layer])
        lookup[layer] = table
    heaps: list[list[tuple[float, int, int]]] = [[] for _ in features]
    for rb in backend.residuals(rows, layers, batch_size=batch_size, progress=progress):
        acts = torch.zeros(*rb.mask.shape, len(features) + 1)
        for layer in layers:
            sae = saes[layer]
            codes = sae.encode_sparse(rb.hidden[layer].to(sae.W_enc.device, torch.float32))
            acts.scatter_(-1, lookup[layer][codes.indices.cpu()], codes.values.cpu().clamp(min=0))
        acts = acts[..., :-1] * rb.token_mask(skip_first_token).cpu().unsqueeze(-1)
        peaks, where = acts.max(dim=1)
        for b, j in (peaks > 0).nonzero().tolist():
            item = (float(peaks[b, j]), -(rb.batch.start + b), int(where[b, j]))
            (heapq.heappush if len(heaps[j]) < n else heapq.heappushpop)(heaps[j], item)
    decode = backend.tokenizer.decode
    out: dict[FeatureKey, list[Context]] = {}
    for key, heap in zip(features, heaps):
        contexts = []
        for act, neg_row, pos in sorted(heap, reverse=True):
            ids = rows[-neg_row]
            contexts.append(Context(decode(ids[max(0, pos - window) : pos]), decode(ids[pos : pos + 1]),
                                    decode(ids[pos + 1 : pos + 1 + window // 2]), act))
        out[key] = contexts
    return out


EXPLAIN_TEMPLATE = (
    "Below are text excerpts on which one feature of a language model is most active; the token where "
    "it peaks is marked «like this».\n{contexts}\n\nIn one sentence, what does this feature detect?"
)


def explain(complete: Complete, contexts: Sequence[Context], template: str = EXPLAIN_TEMPLATE) -> str:
    """A one-sentence explanation of a feature from its top-activating contexts (auto-interpretation)."""
    if not contexts:
        raise ValueError("no contexts to explain: the feature never fired on the corpus")
    reply = complete(template.format(contexts="\n".join(f"- {c.marked}" for c in contexts))).strip()
    if not reply:
        raise ValueError("the explainer returned an empty explanation")
    return reply
