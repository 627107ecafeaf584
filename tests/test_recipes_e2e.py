"""Footprints, redundancy, subsets and classifiers end to end on a tiny Qwen3 with a planted feature.

Ground truth: the token ``q`` gets a large embedding component along a unit direction v (and the LM
head is tilted so that after a ``q`` the model keeps writing ``q``); feature 77 of every test SAE reads
v with bias -10. So feature 77 fires exactly at ``q`` tokens, at any layer, through the real forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qscope_plugins import QwenScopeSAE
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.cli import main
from qscope_plugins.recipes import classifier as clf
from qscope_plugins.recipes import classifier_eval as cev
from qscope_plugins.recipes.classifier_run import apply, example_activations, monitor
from qscope_plugins.recipes.footprint_store import FootprintStore
from qscope_plugins.recipes.footprints import extract_footprints
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model, tiny_tokenizer

LAYERS = (1, 3)
D_SAE, K, PLANTED = 256, 8, 77
WORDS = "the a cat dog runs fast slow blue red green sky tree house car".split()


def sentences(rng, n, marker):
    out = []
    for _ in range(n):
        words = list(rng.choice(WORDS, rng.integers(3, 7)))
        if marker:
            words.insert(int(rng.integers(1, len(words))), "q")
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model, tok = tiny_model("Qwen3ForCausalLM"), tiny_tokenizer()
    q = tok.convert_tokens_to_ids("q")
    v = torch.randn(64, generator=torch.Generator().manual_seed(5))
    v /= v.norm()
    with torch.no_grad():
        model.get_input_embeddings().weight[q] += 20 * v
        tilt = v * model.model.norm.weight
        model.get_output_embeddings().weight[q] += 30 * tilt / tilt.norm()
    states = {}
    for layer in LAYERS:
        state = random_sae_state(64, D_SAE, seed=layer)
        state["W_enc"][PLANTED], state["b_enc"][PLANTED] = v, -10.0
        states[layer] = state
        write_released_layer(root / "sae", layer, state)
    saes = {
        n: QwenScopeSAE.from_weights(s["W_enc"], s["W_dec"], s["b_enc"], s["b_dec"], k=K, layer=n) for n, s in states.items()
    }
    rng = np.random.default_rng(0)
    sizes = {"pos": (24, True), "neg": (24, False), "test_pos": (16, True), "test_neg": (16, False)}
    texts = {name: sentences(rng, n, marker) for name, (n, marker) in sizes.items()}
    model_dir = save_checkpoint(model, root / "model", tokenizer=tok)
    return {"root": root, "backend": HFBackend(model, tok), "saes": saes, "q": q, "texts": texts, "model_dir": model_dir}


def dense_reference(world, texts, position):
    """Per-text (unbatched) forward + dense encode: ``{layer: [{feature: active-token count}]}``."""
    out = {layer: [] for layer in LAYERS}
    for text in texts:
        hidden = next(world["backend"].residuals([text], LAYERS)).hidden
        for layer in LAYERS:
            codes = world["saes"][layer].encode(hidden[layer][0]).detach()
            codes = codes[-1:] if position == "last" else codes[1:]  # "all" skips the first token
            counts = (codes > 0).sum(0)
            out[layer].append({int(f): int(counts[f]) for f in torch.nonzero(counts).ravel()})
    return out


@pytest.mark.parametrize("position", ["last", "all"])
def test_footprints_match_unbatched_dense_reference(world, tmp_path, position):
    texts = world["texts"]["pos"][:6]
    store = extract_footprints(world["backend"], world["saes"], texts, tmp_path, "bench", position=position, batch_size=4)
    reference = dense_reference(world, texts, position)
    for layer in LAYERS:
        prints = store.footprints(layer)
        expected = reference[layer]
        assert [sorted(e) for e in expected] == [s.tolist() for s in prints.sets()]
        if position == "all":
            got = prints.matrix()
            assert [{int(f): int(got[i, f]) for f in e} for i, e in enumerate(expected)] == expected
    assert store.config.sae_source == "unknown" and store.config.template == "{text}"


def test_footprint_run_resumes_to_identical_bytes(world, tmp_path, monkeypatch):
    samples = [{"id": f"s{i}", "question": t} for i, t in enumerate(world["texts"]["neg"][:9])]
    kwargs = dict(template="Q: {question}\nA:", id_field="id", batch_size=2, position="all")
    extract_footprints(world["backend"], world["saes"], samples, tmp_path / "a", "b", **kwargs)

    calls = []
    original = FootprintStore.write_batch

    def failing(self, batch, rows):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(batch)
        original(self, batch, rows)

    monkeypatch.setattr(FootprintStore, "write_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_footprints(world["backend"], world["saes"], samples, tmp_path / "b", "b", **kwargs)
    monkeypatch.undo()
    store = extract_footprints(world["backend"], world["saes"], samples, tmp_path / "b", "b", **kwargs)
    assert store.config.sample_ids[:2] == ("s0", "s1")
    files = sorted(p.name for p in (tmp_path / "a" / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / "b" / name).read_bytes() == (tmp_path / "b" / "b" / name).read_bytes()


def test_input_errors(world, tmp_path):
    with pytest.raises(ValueError, match="^text 1 has 600 tokens, more than the model context \\(512 tokens\\)$"):
        extract_footprints(world["backend"], world["saes"], ["ok", "a" * 600], tmp_path, "long")
    with pytest.raises(ValueError, match="^sample 0 has no field 'question' used by the template$"):
        extract_footprints(world["backend"], world["saes"], [{"text": "x"}], tmp_path, "t", template="{question}")


def test_classifier_recovers_planted_feature_through_the_model(world):
    backend, saes, texts = world["backend"], world["saes"], world["texts"]
    pos, neg, test_pos, test_neg = (example_activations(backend, saes, texts[k]) for k in ("pos", "neg", "test_pos", "test_neg"))
    deltas = clf.layer_deltas(pos, neg)
    assert all(int(np.argmax(d)) == PLANTED and d[PLANTED] == 1.0 for d in deltas.values())
    layer = clf.select_layer(deltas)
    model = clf.fit(pos[layer], neg[layer], top_k=1, layer=layer)
    assert model.features == (PLANTED,)
    assert cev.evaluate(model, test_pos, test_neg, n_boot=0).f1 >= 0.95
    control = clf.random_control(pos[layer], neg[layer], top_k=1, layer=layer, seed=3)
    assert cev.evaluate(control, test_pos, test_neg, n_boot=0).f1 < 0.9
    applied = apply(backend, model, saes, texts["test_pos"][:3] + texts["test_neg"][:3])
    assert applied.predictions.tolist() == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match=r"^no SAE given for the classifier's layers \[3\]$"):
        apply(backend, clf.compose_layers(deltas, m=2), {1: saes[1]}, ["x"])


def test_monitor_flags_the_first_generated_marker(world):
    backend, saes = world["backend"], world["saes"]
    model = clf.FeatureClassifier(features=(PLANTED,), layers=(3,), d_sae=D_SAE)
    prompts = ["the cat", "a dog", "the q", "red q sky"]
    results = monitor(backend, model, saes, prompts, max_new_tokens=8, batch_size=4)
    generations = backend.generate(prompts, max_new_tokens=8, batch_size=4)
    assert [r.prompt_flagged for r in results] == [False, False, True, True]
    for result, generation in zip(results, generations):
        seen = generation.token_ids[:-1]  # the last token never goes back through the model
        expected = seen.index(world["q"]) if world["q"] in seen else None
        assert result.first_flagged_token == expected and result.text == generation.text
    assert any(r.generation_flagged for r in results) and not all(r.generation_flagged for r in results)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def test_cli_footprint_redundancy_subset(world, tmp_path, capsys):
    rng = np.random.default_rng(1)
    model_args = ["--model", world["model_dir"], "--sae", world["root"] / "sae", "--k", K, "--no-progress"]
    files = {}
    for name, n in (("alpha", 12), ("beta", 9), ("gamma", 10)):
        records = [{"id": f"{name}{i}", "question": t} for i, t in enumerate(sentences(rng, n, name == "alpha"))]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
        scores = {f"m{j}": (rng.random(n) < 0.2 + 0.15 * j).astype(int).tolist() for j in range(5)}
        (tmp_path / f"{name}_scores.json").write_text(json.dumps(scores))
    bench = [a for name, f in files.items() for a in ("--benchmark", f"{name}={f}")]
    store = tmp_path / "store"
    options = ["--store", store, "--template", "Q: {question}", "--id-field", "id", "--json"]
    assert cli("footprint", *model_args, "--layers", 1, 3, *bench, *options) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["alpha"]["samples"] == 12

    out = tmp_path / "report"
    scores = [a for name in files for a in ("--scores", f"{name}={tmp_path / f'{name}_scores.json'}")]
    assert cli("redundancy", "--store", store, "--layer", 3, *scores, "--output-dir", out, "--n-subsets", 10, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((out / "redundancy.json").read_text()) == result
    expected = FootprintStore.open(store, "beta").footprints(3).sets()
    from qscope_plugins.recipes import redundancy as rd

    beta = next(r for r in result["benchmarks"] if r["benchmark"] == "beta")
    assert beta["R_hat"] == pytest.approx(rd.feature_redundancy(expected)) and beta["R"] is not None
    assert "spearman_R_hat_vs_R" in result and result["overlap_vs_similarity"]["pairs"] == 3
    for name in ("overlap.png", "coverage.png", "r_hat_vs_r.png", "overlap.csv", "coverage.csv", "benchmarks.csv"):
        assert (out / name).stat().st_size > 0
    assert cli("redundancy", "--store", store) == 2
    assert "choose one with --layer" in capsys.readouterr().err

    options = ["--layer", 1, "--n", 4, "--scores", tmp_path / "alpha_scores.json", "--json"]
    assert cli("subset", "--store", store, "--benchmark", "alpha", *options) == 0
    subset = json.loads(capsys.readouterr().out)
    greedy = rd.greedy_max_coverage(FootprintStore.open(store, "alpha").footprints(1).sets(), 4)
    assert subset["sample_ids"] == [f"alpha{i}" for i in greedy.indices] and -1 <= subset["ranking"]["tau"] <= 1


def test_cli_classify_fit_eval_apply(world, tmp_path, capsys):
    t = world["texts"]
    paths = {k: write_lines(tmp_path / f"{k}.txt", v[:12] if k in ("pos", "neg") else v[:8]) for k, v in t.items()}
    model_args = ["--model", world["model_dir"], "--sae", world["root"] / "sae", "--k", K, "--no-progress"]
    saved = tmp_path / "clf.json"
    data = ["--pos", paths["pos"], "--neg", paths["neg"], "--eval-pos", paths["test_pos"], "--eval-neg", paths["test_neg"]]
    options = ["--top", 1, "--k-grid", "1,2", "--baselines", "--plot", tmp_path / "f1.png", "--output", saved, "--json"]
    assert cli("classify", "fit", *model_args, "--layers", *LAYERS, *data, *options) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["classifier"]["features"] == [PLANTED] and fit["evaluation"]["f1"] >= 0.95
    assert np.array(fit["f1_per_layer_and_k"]["f1"]).shape == (2, 2) and (tmp_path / "f1.png").exists()
    assert set(fit["baselines"]) == {"weighted_f1", "random_features_f1", "linear_probe_f1"}
    loaded = json.loads(saved.read_text())
    assert loaded["sae_source"] == str(world["root"] / "sae") and loaded["model"] == str(world["model_dir"])

    held_out = ["--pos", paths["test_pos"], "--neg", paths["test_neg"]]
    assert cli("classify", "eval", *model_args, "--classifier", saved, *held_out, "--n-boot", 50, "--json") == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["f1"] == fit["evaluation"]["f1"] and evaluation["f1_low"] <= evaluation["f1"]

    assert cli("classify", "apply", *model_args, "--classifier", saved, "--texts", paths["test_pos"], "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and all(r["flagged"] for r in rows)

    en = ["--lang", "en", paths["pos"], paths["neg"], paths["test_pos"], paths["test_neg"]]
    swapped = ["--lang", "xx", paths["neg"], paths["pos"], paths["test_neg"], paths["test_pos"]]
    options = ["--layers", 3, "--top", 1, "--plot", tmp_path / "transfer.png", "--json"]
    assert cli("classify", "eval", *model_args, *options, *en, *swapped) == 0
    transfer = json.loads(capsys.readouterr().out)
    f1 = np.array(transfer["layers"]["3"]["transfer_f1"])
    assert f1[0, 0] >= 0.95 and f1[0, 1] == 0.0 and (tmp_path / "transfer_layer3.png").exists()
