"""HTML for the explorer: token highlighting, the per-token heatmap and feature pages.

Plain strings with inline styles and SVG, no scripts and nothing fetched, so the same fragments serve
the Gradio app (``gr.HTML``) and the static dashboard, which opens from disk without a server.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from ..recipes.feature_pages import Context, FeaturePage
from ..recipes.token_text import label as token_label

PAGE_CSS = "body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }"
CSS = """
.qs-page h2 { margin: 0.2em 0; } .qs-page h3 { margin: 1em 0 0.3em; }
.qs-ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; margin: 2px 0;
  padding: 3px 6px; border-bottom: 1px solid #eee; }
.qs-tok { border-radius: 3px; padding: 1px 0; display: inline-block; min-width: 0.25em; }
.qs-peak { outline: 1px solid #c33; }
.qs-stats td, .qs-stats th, .qs-table td, .qs-table th { padding: 2px 10px; text-align: left; }
.qs-table { border-collapse: collapse; } .qs-table tr:nth-child(even) { background: #f6f6f6; }
.qs-heat { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 12px; }
.qs-heat td, .qs-heat th { border: 1px solid #ddd; padding: 2px 4px; text-align: center; min-width: 1.6em; }
.qs-heat th.qs-row { text-align: left; white-space: nowrap; }
.qs-cols { display: flex; gap: 2em; flex-wrap: wrap; }
.qs-muted { color: #777; }
"""


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def _shade(value: float, vmax: float) -> str:
    alpha = 0.0 if vmax <= 0 else max(0.0, min(1.0, value / vmax))
    return f"rgba(255,120,0,{alpha:.2f})" if value > 0 else (f"rgba(60,120,255,{min(1.0, -value / vmax):.2f})"
                                                             if value < 0 and vmax > 0 else "transparent")


def highlight(tokens: Sequence[str], acts: Sequence[float], vmax: float, peak: int | None = None) -> str:
    """Tokens as spans shaded by activation (orange, negative blue), the activation in the tooltip."""
    spans = []
    for i, (tok, act) in enumerate(zip(tokens, acts)):
        cls = "qs-tok qs-peak" if i == peak else "qs-tok"
        spans.append(f'<span class="{cls}" style="background:{_shade(act, vmax)}" title="{act:.3f}">{esc(tok)}</span>')
    return "".join(spans)


def context_html(page: FeaturePage, ctx: Context, vmax: float) -> str:
    tokens = page.text(ctx.token_ids)
    head = f'<span class="qs-muted">doc {ctx.doc} &middot; max {ctx.max_act:.2f}</span> '
    return f'<div class="qs-ctx">{head}{highlight(tokens, ctx.acts, vmax, ctx.peak - ctx.start)}</div>'


def histogram_svg(edges: Sequence[float], counts: Sequence[int], width: int = 420, height: int = 120) -> str:
    """A bar chart of activation counts (log-free, the x axis labelled with the range)."""
    if not counts:
        return '<p class="qs-muted">never active in the indexed corpus</p>'
    top, bw = max(counts), width / len(counts)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 18 - c / top * (height - 24):.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{c / top * (height - 24):.1f}" fill="#f80"><title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {c}</title></rect>'
        for i, c in enumerate(counts)
    )
    labels = (f'<text x="0" y="{height - 4}" font-size="11">{edges[0]:.2f}</text>'
              f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{edges[-1]:.2f}</text>')
    return f'<svg class="qs-hist" width="{width}" height="{height}" role="img">{bars}{labels}</svg>'


def _effects_table(page: FeaturePage, rows: Sequence[tuple[int, float]], title: str) -> str:
    body = "".join(f"<tr><td><code>{esc(token_label(t, page.vocab))}</code></td><td>{v:+.3f}</td></tr>" for t, v in rows)
    return f'<div><h3>{title}</h3><table class="qs-table">{body}</table></div>'


def page_html(page: FeaturePage, link: Callable[[int, int], str | None] | None = None) -> str:
    """The feature page as an HTML fragment; ``link(layer, feature)`` gives neighbour hrefs (or ``None``)."""
    vmax = page.max_act or 1.0
    parts = [f'<div class="qs-page" id="feature-{page.layer}-{page.feature}">',
             f"<h2>Layer {page.layer} &middot; feature {page.feature}</h2>",
             f'<p class="qs-muted">{esc(page.model)} &middot; {esc(page.sae_source)}</p>']
    exp = page.explanation
    if exp:
        score = exp.get("score", {}).get("balanced_accuracy")
        score_text = f" (detection balanced accuracy {score:.2f})" if isinstance(score, (int, float)) else ""
        parts.append(f'<p class="qs-explanation"><b>Explanation:</b> {esc(exp.get("explanation", ""))}'
                     f'<span class="qs-muted">{score_text} &middot; by {esc(str(exp.get("explainer", "?")))}</span></p>')
    else:
        parts.append('<p class="qs-muted qs-explanation">No explanation yet (qscope explain).</p>')
    if page.neuronpedia_url:
        parts.append(f'<p><a href="{esc(page.neuronpedia_url)}">Neuronpedia</a></p>')
    parts.append(
        '<table class="qs-stats"><tr><th>density</th><th>active tokens</th><th>max</th><th>mean (active)</th></tr>'
        f"<tr><td>{page.density:.4%}</td><td>{page.n_active} / {page.n_tokens}</td>"
        f"<td>{page.max_act:.3f}</td><td>{page.mean_act:.3f}</td></tr></table>"
    )
    parts.append("<h3>Activation histogram</h3>" + histogram_svg(page.histogram["edges"], page.histogram["counts"]))
    parts.append('<div class="qs-cols">' + _effects_table(page, page.logits_up, "Logits raised")
                 + _effects_table(page, page.logits_down, "Logits lowered"))
    rows = []
    for f, cos in page.neighbours:
        href = link(page.layer, f) if link else None
        name = f'<a href="{esc(href)}">{f}</a>' if href else str(f)
        rows.append(f"<tr><td>{name}</td><td>{cos:.3f}</td></tr>")
    parts.append(f'<div><h3>Nearest features (decoder cosine)</h3><table class="qs-table">{"".join(rows)}</table>'
                 "</div></div>")
    parts.append('<h3>Top activations</h3><div class="qs-top">'
                 + "".join(context_html(page, c, vmax) for c in page.top) + "</div>")
    for q in reversed(page.quantiles):
        parts.append(f'<h3>Quantile {q["lo"]:.2f} to {q["hi"]:.2f}</h3>'
                     + "".join(context_html(page, c, vmax) for c in q["contexts"]))
    parts.append("</div>")
    return "".join(parts)


def heatmap_html(tokens: Sequence[str], rows: Sequence[tuple[str, Sequence[float]]]) -> str:
    """A features x tokens table: row label, then one shaded cell per token (value in the tooltip)."""
    vmax = max((abs(v) for _, acts in rows for v in acts), default=1.0) or 1.0
    head = "".join(f"<th>{esc(t)}</th>" for t in tokens)
    body = []
    for label, acts in rows:
        cells = "".join(
            f'<td style="background:{_shade(v, vmax)}" title="{v:.3f}">{"" if v == 0 else f"{v:.1f}"}</td>'
            for v in acts
        )
        body.append(f'<tr><th class="qs-row">{esc(label)}</th>{cells}</tr>')
    return f'<div style="overflow-x:auto"><table class="qs-heat"><tr><th></th>{head}</tr>{"".join(body)}</table></div>'


def document(title: str, body: str) -> str:
    """A complete, self-contained HTML document."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{PAGE_CSS}{CSS}</style></head><body>{body}</body></html>\n")
