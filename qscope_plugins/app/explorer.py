"""What each tab of ``qscope app`` computes, without any UI: one object over a backend and its SAEs.

Every method takes plain values and returns HTML plus plain data, so the Gradio layer
(:mod:`.gradio_app`) only wires widgets, and the logic is tested without a browser. The math is the
project's recipes: :func:`~qscope_plugins.recipes.discovery.contrast` (Compare),
:mod:`~qscope_plugins.recipes.steering` (Steer), the classifier (Monitor) and feature pages (Feature).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..backends import Backend, Sampling
from ..recipes.discovery import FeatureStats, _top, contrast
from ..recipes.steering import additive, clamp, parse_positions, steer
from ..recipes.token_text import display, token_bytes
from . import html as H

# The official demo's strength presets: fixed without comparison data, multiples of the feature's
# activation-rate difference d (from the Compare tab) with it.
PRESETS = {"Light": 5.0, "Medium": 20.0, "Strong": 100.0}
PRESET_FACTORS = {"Light": 0.5, "Medium": 2.0, "Strong": 10.0}
CUSTOM_DEFAULT = 5.0


@dataclass
class TextResult:
    tokens: list[str]
    rows: list[tuple[int, int, list[float]]]
    """``(layer, feature, per-token activations)``, top features first per layer."""
    html: str


class Explorer:
    """The app's state: a backend, ``{layer: SAE}``, an optional feature index and the last comparison."""

    def __init__(self, backend: Backend, saes: Mapping[int, object], *, model: str, sae: str, k: int | None = None,
                 index=None, backend_kind: str = "hf") -> None:
        self.backend, self.saes = backend, dict(saes)
        self.model, self.sae, self.k, self.index, self.backend_kind = model, sae, k, index, backend_kind
        self._bytes = token_bytes(backend.tokenizer, len(backend.tokenizer))
        self.comparison: dict[tuple[int, int], float] = {}
        """``|rate_diff|`` of each compared ``(layer, feature)``, for the presets."""

    @property
    def layers(self) -> list[int]:
        return sorted(self.saes)

    def _tokens(self, ids: Sequence[int]) -> list[str]:
        return display(ids, self._bytes)

    def _layers(self, layers) -> list[int]:
        chosen = [int(n) for n in (layers or self.layers)]
        missing = [n for n in chosen if n not in self.saes]
        if missing:
            raise ValueError(f"no SAE loaded for layers {missing}; loaded: {self.layers}")
        return chosen

    # ---- Text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def text(self, text: str, layers=None, top_k: int = 5, raw: bool = False, exclude_first: bool = True) -> TextResult:
        """Per-token activations of the ``top_k`` features per layer, ranked by mean over positions."""
        if not text or not text.strip():
            raise ValueError("enter a text")
        layers = self._layers(layers)
        ids = self.backend.encode([text])[0]
        (rb,) = list(self.backend.residuals([ids], layers, batch_size=1))
        start = 1 if exclude_first and len(ids) > 1 else 0
        rows: list[tuple[int, int, list[float]]] = []
        for n in layers:
            sae = self.saes[n]
            hidden = rb.hidden[n][0, start:].to(sae.W_enc.device, torch.float32)
            if raw:  # raw pre-activations W_enc x + b_enc, before Top-k and ReLU (one text: small)
                pre = sae.encode_pre(hidden)
                for f in pre.mean(0).topk(min(top_k, pre.shape[1])).indices.tolist():
                    rows.append((n, f, [round(float(v), 3) for v in pre[:, f]]))
                continue
            codes = sae.encode_sparse(hidden)
            stats = FeatureStats.empty(sae.cfg.d_sae)
            stats.update(codes.values, codes.indices)
            for f in _top(stats.mean, top_k):
                per_token = ((codes.indices == f) * codes.values).sum(-1)
                rows.append((n, f, [round(float(v), 3) for v in per_token]))
        tokens = self._tokens(ids[start:])
        labels = [(f"L{n} #{f}", acts) for n, f, acts in rows]
        return TextResult(tokens, rows, H.heatmap_html(tokens, labels))

    # ---- Compare ---------------------------------------------------------------------------------
    def compare(self, texts_a: Sequence[str], texts_b: Sequence[str], layers=None, top_k: int = 5,
                exclude_first: bool = True, drop_shared: bool = False, drop_prefix: bool = False, raw: bool = False):
        """Top-``top_k`` features per layer by activation-rate difference (A minus B); rows and HTML."""
        texts_a, texts_b = [t for t in texts_a if t.strip()], [t for t in texts_b if t.strip()]
        if not texts_a or not texts_b:
            raise ValueError("enter a text (or one text per line) on both sides")
        layers = self._layers(layers)
        rows = contrast(self.backend, {n: self.saes[n] for n in layers}, texts_a, texts_b, top=top_k,
                        skip_first=exclude_first, drop_shared_tokens=drop_shared, drop_common_prefix=drop_prefix,
                        raw=raw)
        self.comparison = {(r.layer, r.feature): abs(r.rate_diff) for r in rows}
        body = "".join(f"<tr><td>{r.layer}</td><td>{r.feature}</td><td>{r.rate_pos:.3f}</td><td>{r.rate_neg:.3f}</td>"
                       f"<td>{r.rate_diff:+.3f}</td><td>{r.mean_diff:+.3f}</td></tr>" for r in rows)
        table = ('<table class="qs-table qs-compare"><tr><th>layer</th><th>feature</th><th>rate A</th><th>rate B</th>'
                 f"<th>rate diff</th><th>mean diff</th></tr>{body}</table>")
        return rows, table if rows else '<p class="qs-muted">no feature differs</p>'

    # ---- Steer -----------------------------------------------------------------------------------
    def strength(self, preset: str, layer: int, features: Sequence[int], custom: float = CUSTOM_DEFAULT) -> float:
        """The official presets: Light/Medium/Strong fixed, or x d (the Compare tab's |rate diff|) with it."""
        if preset == "Custom":
            return float(custom)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose Light, Medium, Strong or Custom")
        if not self.comparison:
            return PRESETS[preset]
        d = self.comparison.get((layer, features[0]), max(self.comparison.values()))
        return PRESET_FACTORS[preset] * d

    def steer(self, prompt: str, layer: int, features: Sequence[int], *, preset: str = "Light",
              custom: float = CUSTOM_DEFAULT, positions: str = "all", generated: bool = True,
              mode: str = "add", max_new_tokens: int = 40) -> dict:
        """Greedy baseline and steered generations side by side, and the ``qscope steer`` command."""
        if not prompt:
            raise ValueError("enter a prompt")
        layer = self._layers([layer])[0]
        features = [int(f) for f in features]
        if not features:
            raise ValueError("enter at least one feature id")
        parse_positions(positions)  # validates the syntax before any generation
        sae, where = self.saes[layer], dict(layer=layer, positions=positions, generated=generated)
        value = self.strength(preset, layer, features, custom)
        iv = clamp(sae, features, value, **where) if mode == "clamp" else additive(sae, features, value, **where)
        kw = dict(max_new_tokens=int(max_new_tokens), sampling=Sampling())
        baseline = steer(self.backend, [prompt], [], **kw)[0].text
        steered = steer(self.backend, [prompt], iv, **kw)[0].text
        return {"baseline": baseline, "steered": steered, "strength": value,
                "command": self.steer_command(prompt, layer, features, value, positions, generated, mode,
                                              max_new_tokens)}

    def steer_command(self, prompt, layer, features, value, positions, generated, mode, max_new_tokens) -> str:
        parts = ["qscope", "steer", "--model", self.model, "--sae", self.sae]
        if self.k:
            parts += ["--k", str(self.k)]
        if self.backend_kind != "hf":
            parts += ["--backend", self.backend_kind]
        parts += ["--layer", str(layer)]
        for f in features:
            parts += ["--feature", str(f)]
        parts += ["--clamp", f"{value:g}"] if mode == "clamp" else ["--alpha", f"{value:g}"]
        parts += ["--prompt", prompt, "--max-new-tokens", str(int(max_new_tokens)), "--positions", positions]
        if not generated:
            parts.append("--prompt-only")
        return shlex.join(parts)

    # ---- Feature ---------------------------------------------------------------------------------
    def feature(self, layer: int, feature: int) -> str:
        from ..recipes.feature_pages import feature_page

        if self.index is None:
            return '<p class="qs-muted">No feature index: start the app with --index DIR (see qscope index).</p>'
        return H.page_html(feature_page(self.index, int(layer), int(feature)))

    # ---- Monitor ---------------------------------------------------------------------------------
    @torch.no_grad()
    def monitor(self, classifier, text: str) -> tuple[bool, list[bool], str]:
        """A saved classifier on ``text``: its verdict, and per token whether the classifier flags that token."""
        from ..recipes.classifier_run import apply

        if not text or not text.strip():
            raise ValueError("enter a text")
        layers = sorted(set(classifier.layers))
        flagged = bool(apply(self.backend, classifier, self.saes, [text]).predictions[0])
        ids = self.backend.encode([text])[0]
        (rb,) = list(self.backend.residuals([ids], layers, batch_size=1))
        per_token = {}
        for n in layers:
            codes = self.saes[n].encode_sparse(rb.hidden[n][0].float())
            t, k = codes.indices.shape
            per_token[n] = sp.csr_array((codes.values.reshape(-1).cpu().numpy(), codes.indices.reshape(-1).cpu().numpy(),
                                         np.arange(0, t * k + 1, k)), shape=(t, classifier.d_sae))
        flags = [bool(x) for x in classifier.predict(per_token)]
        if classifier.skip_first_token and flags:
            flags[0] = False
        tokens = self._tokens(ids)
        spans = H.highlight(tokens, [1.0 if f else 0.0 for f in flags], 1.0)
        verdict = "flagged" if flagged else "not flagged"
        body = (f'<p class="qs-verdict"><b>Text {verdict}</b> &middot; {sum(flags)} of {len(flags)} tokens flagged</p>'
                f'<div class="qs-ctx">{spans}</div>')
        return flagged, flags, body
