"""``qscope dashboard``: feature pages as static HTML that opens from disk, without a server.

The output directory holds ``index.html`` (one row per feature) and ``layer{n}/feature{f}.html``.
It is built complete in a sibling temporary directory and then moved into place, so a failure
leaves no partial dashboard; an existing dashboard (marked by ``.qscope-dashboard``) is replaced.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from .._io import make_temp_dir, replace_dir
from ..recipes.feature_index import FeatureIndex
from ..recipes.feature_pages import feature_page
from .html import document, esc, page_html

MARKER = ".qscope-dashboard"


def _href(layer: int, feature: int) -> str:
    return f"layer{layer}/feature{feature}.html"


def write_dashboard(index: FeatureIndex, features: Sequence[tuple[int, int]], out: str | Path, **page_kw) -> Path:
    """Write the pages of ``features`` (``(layer, feature)`` pairs) under ``out``; returns ``out/index.html``."""
    out = Path(out)
    if not features:
        raise ValueError("no features to write")
    if out.exists() and not (out / MARKER).exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a dashboard; use an empty or new --out directory")
    for layer, feature in features:  # validate every id before rendering anything
        index.activations(layer, feature)
    chosen = set(features)
    pages, rows = {}, []
    for layer, feature in features:
        page = feature_page(index, layer, feature, **page_kw)

        def link(n: int, f: int) -> str | None:
            return f"feature{f}.html" if (n, f) in chosen else None

        back = '<p><a href="../index.html">all features</a></p>'
        pages[(layer, feature)] = document(f"layer {layer} feature {feature}", back + page_html(page, link))
        exp = (page.explanation or {}).get("explanation", "")
        rows.append(f'<tr><td>{layer}</td><td><a href="{_href(layer, feature)}">{feature}</a></td>'
                    f"<td>{page.density:.4%}</td><td>{page.max_act:.3f}</td><td>{esc(exp)}</td></tr>")
    table = ('<table class="qs-table"><tr><th>layer</th><th>feature</th><th>density</th><th>max</th>'
             f'<th>explanation</th></tr>{"".join(rows)}</table>')
    title = f"Features of {index.config.sae_source}"
    body = f"<h1>{esc(title)}</h1><p class=\"qs-muted\">model {esc(index.config.model)}</p>{table}"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        (tmp / MARKER).write_text("qscope dashboard\n")
        (tmp / "index.html").write_text(document(title, body), encoding="utf-8")
        for (layer, feature), text in pages.items():
            (tmp / f"layer{layer}").mkdir(exist_ok=True)
            (tmp / _href(layer, feature)).write_text(text, encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"
