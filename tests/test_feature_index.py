"""The activation index, feature pages and the static dashboard, on the nano model (no browser here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _nano_explorer import LANGUAGE_FEATURE, corpus, index_dir, nano

from qscope_plugins.cli import main
from qscope_plugins.recipes import feature_index as fi
from qscope_plugins.recipes.feature_index import FeatureIndex, build_index
from qscope_plugins.recipes.feature_pages import feature_page, neuronpedia_url, random_contexts


@pytest.fixture(scope="module")
def index() -> FeatureIndex:
    return FeatureIndex.open(index_dir())


def test_index_holds_exactly_the_nonzero_topk_codes(index):
    backend, saes, _ = nano()
    texts = corpus()[:20]
    expected = {}
    for rb in backend.residuals(texts, [3], batch_size=20):
        for row in range(len(texts)):
            ids = rb.batch.input_ids[row][rb.mask[row]]
            codes = saes[3].encode_sparse(rb.hidden[3][row][rb.mask[row]])
            base = int(index.offsets[row])
            assert index.tokens[base : base + ids.numel()].tolist() == ids.tolist()
            for pos in range(1, ids.numel()):  # the first token is not indexed
                for v, f in zip(codes.values[pos].tolist(), codes.indices[pos].tolist()):
                    if v > 0:
                        expected[(base + pos, f)] = v
    arrays = index.layer(3)
    features = np.repeat(np.arange(index.config.d_sae), np.diff(arrays["indptr"]))
    limit = int(index.offsets[20])
    got = {(int(t), int(f)): float(v) for t, f, v in zip(arrays["token"], features, arrays["value"]) if t < limit}
    assert got.keys() == expected.keys()
    assert max(abs(got[key] - expected[key]) for key in got) < 1e-4
    assert index.indexed_tokens == index.config.n_tokens - index.config.n_docs


def test_interrupted_build_resumes_to_identical_files(tmp_path, monkeypatch):
    backend, saes, _ = nano()
    texts, one = corpus()[:40], {3: saes[3]}
    kw = dict(model="nano", sae_source="nano", batch_size=8)
    build_index(backend, one, texts, tmp_path / "straight", **kw)

    real, calls = fi._index_batch, []

    def crash_on_third(*args):
        calls.append(args[5])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(fi, "_index_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_index(backend, one, texts, tmp_path / "resumed", **kw)
    meta = json.loads((tmp_path / "resumed" / "meta.json").read_text())
    assert meta["completed_batches"] == 2 and not meta["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        FeatureIndex.open(tmp_path / "resumed")
    monkeypatch.setattr(fi, "_index_batch", real)
    calls.clear()
    build_index(backend, one, texts, tmp_path / "resumed", **kw)
    for name in ("layer3.npz", "tokens.npz", "effects.npz", "vocab.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert not (tmp_path / "resumed" / "partial").exists()


def test_a_different_corpus_or_directory_is_refused(tmp_path):
    backend, saes, _ = nano()
    one = {3: saes[3]}
    build_index(backend, one, corpus()[:8], tmp_path / "ix", model="nano", sae_source="nano")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ix").iterdir()}
    with pytest.raises(ValueError, match="different n_docs"):
        build_index(backend, one, corpus()[:9], tmp_path / "ix", model="nano", sae_source="nano")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ix").iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a feature index"):
        build_index(backend, one, corpus()[:8], tmp_path / "other", model="nano", sae_source="nano")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_tampered_layer_file_is_detected(tmp_path):
    backend, saes, _ = nano()
    build_index(backend, {3: saes[3]}, corpus()[:8], tmp_path / "ix", model="nano", sae_source="nano")
    path = tmp_path / "ix" / "layer3.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the hash"):
        FeatureIndex.open(tmp_path / "ix").layer(3)


def test_feature_page_contexts_histogram_and_quantiles(index):
    layer, feature = LANGUAGE_FEATURE
    where, values = index.activations(layer, feature)
    page = feature_page(index, layer, feature, n_top=10)
    assert page.n_active == values.size > 0 and page.density == pytest.approx(values.size / index.indexed_tokens)
    assert page.max_act == pytest.approx(float(values.max()))
    peaks = [c.acts[c.peak - c.start] for c in page.top]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] == pytest.approx(page.max_act, abs=1e-3)
    assert len({c.doc for c in page.top}) == len(page.top)  # one context per document
    for c in page.top:  # every highlighted value is the feature's indexed activation at that token
        base = int(index.offsets[c.doc]) + c.start
        assert c.token_ids == index.tokens[base : base + len(c.token_ids)].tolist()
        for i, act in enumerate(c.acts):
            hit = np.flatnonzero(where == base + i)
            assert act == pytest.approx(float(values[hit[0]]) if hit.size else 0.0, abs=1e-3)
    assert sum(page.histogram["counts"]) == values.size
    assert [q["lo"] for q in page.quantiles] == sorted(q["lo"] for q in page.quantiles)
    for q in page.quantiles:
        for c in q["contexts"]:
            assert q["lo"] - 1e-3 <= c.acts[c.peak - c.start] <= q["hi"] + 1e-3
    negatives = random_contexts(index, layer, feature, 5)
    assert len(negatives) == 5 and all(c.max_act == 0 for c in negatives)
    data = page.to_dict()
    assert data["top"][0]["tokens"] and data["logits_up"][0]["token"] == page.token(page.logits_up[0][0])


@torch.no_grad()
def test_logit_effects_and_neighbours_match_the_decoder(index):
    backend, saes, _ = nano()
    layer, feature = LANGUAGE_FEATURE
    W = saes[layer].W_dec.float()
    logits = backend.logits(W[feature][None, None])[0, 0]
    logits = logits - logits.mean()
    page = feature_page(index, layer, feature)
    assert [t for t, _ in page.logits_up] == logits.topk(10).indices.tolist()
    assert [t for t, _ in page.logits_down] == (-logits).topk(10).indices.tolist()
    assert page.logits_up[0][1] == pytest.approx(float(logits.max()), rel=1e-4)
    cos = torch.nn.functional.cosine_similarity(W[feature][None], W, dim=-1)
    cos[feature] = -2
    assert [f for f, _ in page.neighbours] == cos.topk(10).indices.tolist()


def test_neuronpedia_link_only_where_hosted(index):
    from qscope_plugins.cli._explorer import neuronpedia_ids

    assert neuronpedia_ids("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", [0, 1]) == {}  # SAELens records none
    assert neuronpedia_url(index, 3, 459) is None
    index.meta.setdefault("provenance", {})["neuronpedia_ids"] = {"3": "qwen3-1.7b/3-res"}
    try:
        assert neuronpedia_url(index, 3, 459) == "https://www.neuronpedia.org/qwen3-1.7b/3-res/459"
    finally:
        index.meta["provenance"].pop("neuronpedia_ids")


def test_cli_index_then_dashboard(tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(corpus()[:12]) + "\n")
    out = tmp_path / "ix"
    assert main(["index", "--data", str(data), "--layers", "3", "--output-dir", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layers"] == [3] and summary["documents"] == 12
    dash = tmp_path / "dash"
    assert main(["dashboard", "--index", str(out), "--features", "3:459,1-2", "--output-dir", str(dash)]) == 0
    assert sorted(p.name for p in (dash / "layer3").iterdir()) == ["feature1.html", "feature2.html", "feature459.html"]
    assert 'href="layer3/feature459.html"' in (dash / "index.html").read_text()
    capsys.readouterr()
    assert main(["dashboard", "--index", str(out), "--features", "2:1", "--output-dir", str(tmp_path / "d2")]) == 2
    assert "error: layer 2 is not in the index; indexed layers: [3]" in capsys.readouterr().err
    assert main(["dashboard", "--index", str(out), "--features", "3:512", "--output-dir", str(tmp_path / "d2")]) == 2
    assert "feature 512 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "d2").exists()
    assert main(["index", "--layers", "7", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_tokens_split_inside_a_character_display_exactly():
    from qscope_plugins.recipes.token_text import display, single, token_bytes

    backend, _, _ = nano()
    tok = backend.tokenizer
    table = token_bytes(tok, len(tok))
    text = "Duki ሀ𝄞 , 峟 75 ."  # the first two characters are not in the nano vocabulary: byte tokens
    ids = tok(text)["input_ids"]
    assert any(single(t, table).startswith("b'") for t in ids)  # some token holds part of a character
    assert "\ufffd" in "".join(tok.decode([t]) for t in ids)  # what one-at-a-time decoding shows
    shown = display(ids, table)
    assert len(shown) == len(ids) and "".join(shown) == tok.decode(ids) == text


def test_effects_do_not_depend_on_the_chunking():
    from qscope_plugins.recipes.feature_index import feature_effects
    backend, saes, _ = nano()
    head = backend.logits
    whole = feature_effects(saes[3], head)
    small = feature_effects(saes[3], head, budget=3 * 1024)  # 3 features per chunk
    for key in whole:  # batched matmuls round differently, so near-ties may swap places in a row or two
        if key.endswith("ids"):
            assert (whole[key] == small[key]).all(1).mean() > 0.99
        else:
            assert np.allclose(whole[key], small[key], rtol=1e-4, atol=1e-5)


def test_token_labels_quote_text_once_and_show_partial_bytes():
    from qscope_plugins.recipes.token_text import label

    table = [b" the", b"\xe7\x82", "峟".encode()]
    assert [label(i, table) for i in range(4)] == ["' the'", "b'\\xe7\\x82'", "'峟'", "<3>"]
