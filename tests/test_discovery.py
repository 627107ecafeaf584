"""Feature discovery equals a brute-force per-text computation and recovers a planted feature."""

from __future__ import annotations

import pytest
import torch

from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.recipes.discovery import (
    FeatureStats,
    common_prefix_length,
    contrast,
    diagnose,
    rank_features,
    top_features,
)
from qscope_plugins.sae import QwenScopeSAE
from qscope_plugins.testing.sae_files import random_sae_state
from qscope_plugins.testing.tiny_models import tiny_model, tiny_tokenizer

FEATURE, PLANT = 17, 12.0
POSITIVE = ["Q: ZZZ cat", "Q: ZZ", "Q: a ZZZZZZ sentence"]
NEGATIVE = ["Q: the dog", "Q: a long sentence here too", "Q: cat"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saes():
    return {n: QwenScopeSAE.from_weights(**random_sae_state(64, 256, seed=1), k=8, layer=n) for n in (1, 2)}


@pytest.fixture(scope="module")
def backend(tok, saes):
    """Feature FEATURE's direction planted in token "Z"'s embedding, so it fires only on "Z"."""
    model = tiny_model("Qwen3ForCausalLM", seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight[tok("Z")["input_ids"][0]] += PLANT * saes[2].direction(FEATURE)
    return HFBackend(model, tok)


@pytest.fixture(autouse=True)
def no_dense_codes(saes, monkeypatch):
    """Discovery must stream sparse codes: the dense encoder is off limits inside the recipes."""
    for sae in saes.values():
        monkeypatch.setattr(sae, "encode", lambda x: pytest.fail("dense encode called"))


def brute_force(backend, sae, layer, texts, keep):
    """Per-feature (rate, mean, max) over kept tokens, one unpadded text at a time, dense codes."""
    acts = []
    for ids in backend.encode(texts):
        captured = {}
        handle = backend.layers[layer].register_forward_hook(lambda m, a, o, c=captured: c.setdefault("h", o))
        try:
            with torch.no_grad():
                backend.model(torch.tensor([ids]))
        finally:
            handle.remove()
        hidden = captured["h"][0]
        codes = sae.encode_sparse(hidden)
        dense = torch.zeros(len(ids), sae.cfg.d_sae).scatter_(-1, codes.indices, codes.values)
        acts.append(dense[[keep(ids, i) for i in range(len(ids))]])
    acts = torch.cat(acts).double()
    return (acts > 0).double().mean(0), acts.mean(0), acts.max(0).values


def test_feature_stats_match_dense_statistics():
    gen = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(50, generator=gen)[:5] for _ in range(40)])
    values = torch.rand(40, 5, generator=gen) * (torch.rand(40, 5, generator=gen) > 0.3)
    dense = torch.zeros(40, 50).scatter_(-1, indices, values).double()
    stats = FeatureStats.empty(50)
    stats.update(values[:25], indices[:25])
    stats.update(values[25:], indices[25:])
    torch.testing.assert_close(stats.rate, (dense > 0).double().mean(0))
    torch.testing.assert_close(stats.mean, dense.mean(0))
    torch.testing.assert_close(stats.peak, dense.max(0).values)


def test_contrast_recovers_the_planted_feature(backend, saes, tok):
    # Mean-activation difference (the report's contrast) puts the planted feature first.
    [first, *_] = contrast(backend, saes[2], POSITIVE, NEGATIVE, top=5, rank_by="mean")
    assert (first.layer, first.feature, first.rate_neg) == (2, FEATURE, 0.0) and first.mean_diff > 2
    # Firing rate also ties in features that co-fire after "Z"; the planted one is among the
    # best, firing on exactly the "Z" tokens (first tokens skipped).
    rows = contrast(backend, saes[2], POSITIVE, NEGATIVE, top=5, rank_by="rate")
    planted = next(r for r in rows if r.feature == FEATURE)
    z = tok("Z")["input_ids"][0]
    kept = [ids[1:] for ids in backend.encode(POSITIVE)]
    assert planted.rate_pos == sum(row.count(z) for row in kept) / sum(map(len, kept))
    assert planted.rate_neg == 0


# Each option both on and off at least once; batch_size=2 pads rows of different lengths.
@pytest.mark.parametrize("skip_first, drop_shared, drop_prefix", [(True, False, False), (False, True, True), (True, True, False)])
def test_contrast_equals_brute_force(backend, saes, skip_first, drop_shared, drop_prefix):
    pos_ids, neg_ids = backend.encode(POSITIVE), backend.encode(NEGATIVE)
    prefix = common_prefix_length(pos_ids + neg_ids) if drop_prefix else 0
    assert not drop_prefix or prefix == 3  # "Q: "
    shared = {t for r in pos_ids for t in r} & {t for r in neg_ids for t in r} if drop_shared else set()

    def keep(ids, i):
        return not (skip_first and i == 0) and i >= prefix and ids[i] not in shared

    top = 12
    rows = contrast(backend, saes, POSITIVE, NEGATIVE, top=top, skip_first=skip_first,
                    drop_shared_tokens=drop_shared, drop_common_prefix=drop_prefix, batch_size=2)
    assert sorted({r.layer for r in rows}) == [1, 2]
    for layer, sae in saes.items():
        rate_p, mean_p, _ = brute_force(backend, sae, layer, POSITIVE, keep)
        rate_n, mean_n, _ = brute_force(backend, sae, layer, NEGATIVE, keep)
        got = [r for r in rows if r.layer == layer]
        assert 0 < len(got) <= top
        for r in got:
            assert r.rate_pos == pytest.approx(float(rate_p[r.feature]), abs=1e-9)
            assert r.rate_neg == pytest.approx(float(rate_n[r.feature]), abs=1e-9)
            assert r.mean_pos == pytest.approx(float(mean_p[r.feature]), rel=1e-4, abs=1e-5)
            assert r.mean_diff == pytest.approx(float(mean_p[r.feature] - mean_n[r.feature]), rel=1e-4, abs=1e-5)
        score = (rate_p - rate_n).abs()
        chosen = torch.tensor([r.feature for r in got])
        rest = torch.ones_like(score, dtype=torch.bool)
        rest[chosen] = False
        assert score[chosen].min() >= score[rest].max() - 1e-12  # the best |rate_diff|, best first
        assert [abs(r.rate_diff) for r in got] == sorted((abs(r.rate_diff) for r in got), reverse=True)


def test_contrast_errors(backend, saes):
    with pytest.raises(ValueError, match="rank_by must be 'rate' or 'mean', got 'max'"):
        contrast(backend, saes, POSITIVE, NEGATIVE, rank_by="max")
    with pytest.raises(ValueError, match="no prompts given: the prompt list is empty"):
        contrast(backend, saes, [], NEGATIVE)
    with pytest.raises(ValueError, match="no tokens left on the positive side after filtering"):
        contrast(backend, saes, ["Q"], ["Q: x"], skip_first=True)
    with pytest.raises(ValueError, match="SAE d_model 32 does not match the model's d_model 64"):
        contrast(backend, QwenScopeSAE.from_weights(**random_sae_state(32, 64), k=4, layer=1), POSITIVE, NEGATIVE)


def test_rank_features_over_a_span_equals_brute_force(backend, saes):
    text = "Q: a long Z sentence"
    ids = backend.encode([text])[0]
    rows = rank_features(backend, saes[2], ids, span=(3, 9), top=10)
    rate, mean, peak = brute_force(backend, saes[2], 2, [text], lambda _, i: 3 <= i < 9)
    assert [r.feature for r in rows] == mean.topk(len(rows)).indices.tolist()
    for r in rows:
        assert (r.mean, r.max, r.rate) == pytest.approx((float(mean[r.feature]), float(peak[r.feature]),
                                                         float(rate[r.feature])), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match=r"span \(5, 50\) is empty or outside the 20 tokens"):
        rank_features(backend, saes[2], ids, span=(5, 50))


def test_diagnose_scores_only_the_response(backend, saes):
    rows = diagnose(backend, saes[2], "a plain prompt:", "ZZZZZ", top=3)
    assert rows[0].feature == FEATURE and rows[0].max > PLANT / 2
    quiet = diagnose(backend, saes[2], "Z Z Z Z", " plain answer", top=20)
    assert FEATURE not in [r.feature for r in quiet]


def test_top_features_of_a_text(backend, saes):
    rows = top_features(backend, saes, "ZZZZ", top=4)
    by_layer = {n: [r.feature for r in rows if r.layer == n] for n in (1, 2)}
    assert by_layer[2][0] == FEATURE
    assert all(len(v) <= 4 for v in by_layer.values())
