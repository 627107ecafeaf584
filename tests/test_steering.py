"""Steering recipe: the vector is the report's formula, suppression removes a planted feature,
clamping keeps the reconstruction error, and the evaluation harness reports what it generated."""

from __future__ import annotations

import pytest
import torch

from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.recipes.steering import additive, clamp, parse_positions, steer, steering, steering_vector
from qscope_plugins.recipes.steering_eval import cjk_fraction, evaluate, mean_ci, sweep
from qscope_plugins.sae import QwenScopeSAE, load_feature_subset
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import tiny_model, tiny_tokenizer

LAYER, FEATURE, PLANT = 2, 17, 12.0
TEXTS = ["aZbZc", "xxZ", "hello Z world"]


@pytest.fixture(scope="module")
def state():
    return random_sae_state(64, 256, seed=1)


@pytest.fixture(scope="module")
def sae(state):
    return QwenScopeSAE.from_weights(**state, k=8, layer=LAYER)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def backend(tok):
    return HFBackend(tiny_model("Qwen3ForCausalLM", seed=3), tok)


@pytest.fixture(scope="module")
def planted(tok, sae):
    """The same model with feature FEATURE's decoder direction planted in token "Z"'s embedding."""
    model = tiny_model("Qwen3ForCausalLM", seed=3)
    z = tok("Z")["input_ids"][0]
    with torch.no_grad():
        model.model.embed_tokens.weight[z] += PLANT * sae.direction(FEATURE)
    return HFBackend(model, tok), z


def test_steering_vector_is_the_weighted_sum_of_raw_decoder_columns(sae, state):
    expected = 2.0 * state["W_dec"][:, 3] - 0.5 * state["W_dec"][:, 9]
    torch.testing.assert_close(steering_vector(sae, [3, 9], [2.0, -0.5]), expected)
    torch.testing.assert_close(steering_vector(sae, [3, 9], 4.0), 4.0 * (state["W_dec"][:, 3] + state["W_dec"][:, 9]))
    with pytest.raises(ValueError, match="1 strengths for 2 features"):
        steering_vector(sae, [3, 9], [1.0])
    with pytest.raises(ValueError, match=r"feature id 256 out of range \[0, 256\)"):
        steering_vector(sae, [256], 1.0)


def test_additive_from_a_feature_subset_file(tmp_path, state, sae):
    write_released_layer(tmp_path, LAYER, state)
    subset = load_feature_subset(tmp_path, LAYER, [9, 3], k=8)
    iv = additive(subset, [3, 9], [1.0, 3.0], layer=LAYER, positions="0,2-3", generated=False)
    torch.testing.assert_close(iv.vector, steering_vector(sae, [3, 9], [1.0, 3.0]))
    assert (iv.layer, iv.positions, iv.generated) == (LAYER, (0, 2, 3), False)


@pytest.mark.parametrize(
    "spec, expected",
    [(None, None), ("all", None), ("none", ()), ("", ()), ("0,2,5-8", (0, 2, 5, 6, 7, 8)), ("-1", (-1,)),
     ("1, -2", (1, -2)), ([3, 4], (3, 4))],
)
def test_parse_positions(spec, expected):
    assert parse_positions(spec) == expected


def test_parse_positions_rejects_garbage():
    with pytest.raises(ValueError, match="bad position 'x' in '1,x'; use e.g. 'all', '0,2,5-8' or '-1'"):
        parse_positions("1,x")


def _feature_at(backend, sae, interventions, z):
    [rb] = list(backend.residuals(TEXTS, [LAYER], batch_size=len(TEXTS), interventions=interventions))
    hidden, ids = rb.tokens(LAYER), rb.batch.input_ids[rb.mask]
    acts = sae.encode(hidden)[:, FEATURE].detach()
    return acts[ids == z], acts[ids != z], hidden[ids == z] @ sae.direction(FEATURE)


def test_suppression_removes_a_planted_feature(planted, sae):
    backend, z = planted
    on_z, elsewhere, _ = _feature_at(backend, sae, [], z)
    assert on_z.min() > PLANT / 2 and elsewhere.max() == 0  # the plant is what makes it fire
    on_z, elsewhere, projection = _feature_at(backend, sae, [additive(sae, FEATURE, -PLANT, backend=backend)], z)
    assert on_z.max() == 0 and elsewhere.max() == 0
    assert projection.abs().max() < 0.25 * PLANT  # what is left is the later layers' reaction to the plant
    on_z, _, projection = _feature_at(backend, sae, [clamp(sae, FEATURE, 0.0, backend=backend)], z)
    assert on_z.max() == 0 and projection.abs().max() < 0.25 * PLANT


def test_suppression_changes_what_the_planted_model_generates(planted, sae):
    backend, _ = planted
    prompts = ["ZZZ", "a Z"]
    plain = steer(backend, prompts, [], max_new_tokens=5)
    suppressed = steer(backend, prompts, additive(sae, FEATURE, -PLANT), max_new_tokens=5)
    assert [g.token_ids for g in plain] != [g.token_ids for g in suppressed]


def test_clamp_sets_codes_and_keeps_the_reconstruction_error(sae):
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        codes = sae.encode(hidden)
        active = int(codes[0, 0].nonzero()[0])  # a feature firing at (0, 0)
        edited = clamp(sae, [active, FEATURE], [5.0, 0.0]).fn(hidden)
        target = codes.clone()
        target[..., active], target[..., FEATURE] = 5.0, 0.0
        # h' - decode(z') == h - decode(z): only the chosen codes changed, the error term is kept.
        torch.testing.assert_close(edited - sae.decode(target), hidden - sae.decode(codes), atol=1e-4, rtol=1e-4)


def test_clamp_needs_the_full_sae(tmp_path, state):
    write_released_layer(tmp_path, LAYER, state)
    subset = load_feature_subset(tmp_path, LAYER, [3], k=8)
    with pytest.raises(ValueError, match="clamping needs the full SAE"):
        clamp(subset, 3, 0.0, layer=LAYER)


def test_functional_and_context_manager_forms_agree(backend, sae):
    iv = additive(sae, [3, 9], [6.0, -4.0])
    functional = steer(backend, TEXTS, iv, max_new_tokens=5)
    with steering(backend, iv) as steered:
        in_context = steered.generate(TEXTS, max_new_tokens=5)
    after = backend.generate(TEXTS, max_new_tokens=5)
    assert [g.token_ids for g in functional] == [g.token_ids for g in in_context]
    assert [g.token_ids for g in after] == [g.token_ids for g in steer(backend, TEXTS, [], max_new_tokens=5)]
    assert [g.token_ids for g in after] != [g.token_ids for g in functional]


def test_additive_checks_the_sae_against_the_model(backend):
    narrow = QwenScopeSAE.from_weights(**random_sae_state(32, 64), k=4, layer=1)
    with pytest.raises(ValueError, match="SAE d_model 32 does not match the model's d_model 64"):
        additive(narrow, 0, 1.0, backend=backend)
    with pytest.raises(ValueError, match="this SAE does not record its layer; pass layer="):
        additive(QwenScopeSAE.from_weights(**random_sae_state(64, 64), k=4), 0, 1.0)


# ---- evaluation harness -------------------------------------------------------------------------
def test_cjk_fraction():
    assert cjk_fraction("ab 中文") == pytest.approx(0.5)
    assert cjk_fraction("「漢字」") == 1.0
    assert cjk_fraction("plain English") == 0.0
    assert cjk_fraction("  ") == 0.0


def test_mean_ci():
    est = mean_ci([1.0, 2.0, 3.0, 4.0, 10.0])
    assert est.mean == pytest.approx(4.0) and est.n == 5
    assert 1.0 <= est.low < est.mean < est.high <= 10.0
    assert mean_ci([0.5, 0.5]).to_dict() == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 2}
    assert mean_ci([1.0, 2.0, 3.0], seed=1) == mean_ci([1.0, 2.0, 3.0], seed=1)
    with pytest.raises(ValueError, match="no values to summarise"):
        mean_ci([])


def test_evaluate_scores_the_generations_it_made(backend, sae):
    metric = lambda text: float(len(text))  # noqa: E731
    result = evaluate(backend, TEXTS, additive(sae, 3, 20.0), metric, max_new_tokens=4)
    assert [g.token_ids for g in result.baseline] == [g.token_ids for g in backend.generate(TEXTS, max_new_tokens=4)]
    assert result.baseline_scores == [len(g.text) for g in result.baseline]
    assert result.differences == [s - b for s, b in zip(result.steered_scores, result.baseline_scores)]
    summary = result.summary()
    assert summary["difference"]["mean"] == pytest.approx(sum(result.differences) / 3)
    assert [row["difference"] for row in result.per_prompt()] == result.differences


def test_sweep_shares_one_baseline(backend, sae, monkeypatch):
    calls = []
    original = backend.generate

    def counting(prompts, **kw):
        calls.append(bool(kw.get("interventions")))
        return original(prompts, **kw)

    monkeypatch.setattr(backend, "generate", counting)
    rows = sweep(backend, TEXTS, lambda a: additive(sae, 3, a), [0.0, 30.0], lambda t: float(len(t)), max_new_tokens=3)
    assert calls == [False, True, True]
    assert [r["alpha"] for r in rows] == [0.0, 30.0]
    assert rows[0]["difference"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 3}
    with pytest.raises(ValueError, match="no strengths to sweep"):
        sweep(backend, TEXTS, lambda a: additive(sae, 3, a), [], cjk_fraction)
