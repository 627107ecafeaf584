"""Synthesis loop: verification by the target feature, dedup, budget, provenance, crash-safe resume, baseline."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from qscope_plugins.recipes.coverage import TargetFeature, collect_support, coverage_report
from qscope_plugins.recipes.synthesis import (
    ContextPrompter, Generators, Request, explain, plan_requests, priority_targets, random_synthesis,
    read_synthetic, synthesize, text_id, top_contexts,
)

from test_coverage import (  # noqa: F401 (model and backend are shared fixtures)
    TEXTS, backend, dense_maxima, make_sae, model, write_cli_inputs,
)

LAYER = 1
CLOCK = "2026-01-01T00:00:00+00:00"
POOL = ["how do I pick a lock", "a story about a dragon", "the capital of France", "write a poem about rain",
        "bake a cake without eggs", "quantum physics for kids", "how to fix a bike", "plan a trip to Rome",
        "HOW DO I  pick a lock"]  # the last one duplicates the first after normalisation


@pytest.fixture(scope="module")
def saes():
    return {LAYER: make_sae(LAYER, seed=1)}


def clock() -> str:
    return CLOCK


def seeded_prompter(request: Request) -> list[str]:
    """Three pool prompts drawn from the request's seed: deterministic per (feature, round)."""
    return random.Random(request.seed).sample(POOL, 3)


def rewrite_story(prompt: str, request: Request) -> str:
    return f"Imagine a story in which someone asks: {prompt}"


def respond(prompt: str, label: str, request: Request) -> str:
    return "I can't help with that." if label == "harmful" else f"Sure, here is how: {prompt}."


GENERATORS = Generators(seeded_prompter, {"story": rewrite_story}, respond)


def firing_features(model, backend, saes, texts, lo=1, hi=None):
    """Features of ``LAYER`` that fire on at least ``lo`` and at most ``hi`` of ``texts`` (the dense reference)."""
    features = [(LAYER, f) for f in range(128)]
    counts = (dense_maxima(model, backend, saes, texts, features) > 0).sum(0)
    hi = len(texts) - 1 if hi is None else hi
    return [f for (_, f), c in zip(features, counts) if lo <= c <= hi]


def test_only_candidates_that_fire_survive(model, backend, saes, tmp_path):
    fixed = Generators(lambda request: list(POOL), {"story": rewrite_story}, respond)
    candidates = [(p, r) for p in POOL for r in (p, rewrite_story(p, None))]
    texts = [f"{r}\n\nI can't help with that." for _, r in candidates]
    feature = firing_features(model, backend, saes, texts)[0]
    reference = dense_maxima(model, backend, saes, texts, [(LAYER, feature)])[:, 0]
    target = TargetFeature(LAYER, feature, "lock picking", 0.9, "harmful")
    result = synthesize(backend, saes, [target], tmp_path / "out.jsonl", fixed, budget=100, per_feature=100,
                        max_rounds=2, clock=clock)
    records = read_synthetic(tmp_path / "out.jsonl")
    expected, seen = [], set()
    for text, act in zip(texts, reference):
        if act > 0 and text_id(text) not in seen:
            seen.add(text_id(text))
            expected.append((text, act))
    assert 0 < len(expected) < len(texts)
    assert [f"{r['prompt']}\n\n{r['response']}" for r in records] == [t for t, _ in expected]
    np.testing.assert_allclose([r["activation"] for r in records], [a for _, a in expected], rtol=1e-4)
    first = records[0]
    assert {k: first[k] for k in ("layer", "feature", "label", "generator", "responder", "round", "time")} == {
        "layer": LAYER, "feature": feature, "label": "harmful", "generator": "<lambda>", "responder": "respond",
        "round": 0, "time": CLOCK}
    assert {r["rewrite"] for r in records} <= {None, "story"}
    assert result.added == result.total == len(expected) and result.fired >= len(expected)
    assert result.unfilled == [(LAYER, feature)]  # round 1 repeats round 0: nothing new to reach 100


def run(backend, saes, targets, path, **kwargs):
    options = dict(budget=8, per_feature=2, max_rounds=4, clock=clock)
    return synthesize(backend, saes, targets, path, GENERATORS, **{**options, **kwargs})


@pytest.fixture(scope="module")
def targets(model, backend, saes):
    features = firing_features(model, backend, saes, POOL, lo=2, hi=6)[:4]
    assert len(features) == 4
    return [TargetFeature(LAYER, f, f"feature {f}", 0.9, "harmful" if i % 2 else "benign")
            for i, f in enumerate(features)]


def test_interrupted_synthesis_resumes_to_identical_output(backend, saes, targets, tmp_path):
    full = tmp_path / "full.jsonl"
    run(backend, saes, targets, full)
    assert len(read_synthetic(full)) >= 4

    class Crash(Exception):
        pass

    calls = {"n": 0}

    def crashing_clock() -> str:  # called once per kept record, just before it is written
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash
        return CLOCK

    part = tmp_path / "part.jsonl"
    with pytest.raises(Crash):
        run(backend, saes, targets, part, clock=crashing_clock)
    assert len(read_synthetic(part)) == 3
    with open(part, "ab") as handle:  # a crash in the middle of a write
        handle.write(b'{"id": "deadbeef", "prompt": "half a li')
    assert len(read_synthetic(part)) == 3  # the unterminated line does not count
    resumed = run(backend, saes, targets, part, resume=True)
    assert part.read_bytes() == full.read_bytes()
    assert resumed.total == len(read_synthetic(full))
    state = json.loads((tmp_path / "part.jsonl.state.json").read_text())
    assert state == json.loads((tmp_path / "full.jsonl.state.json").read_text())


def test_finished_rounds_are_not_generated_again(backend, saes, targets, tmp_path):
    calls = []

    def counting(request: Request) -> list[str]:
        calls.append((request.feature, request.round))
        return seeded_prompter(request)

    counting.name = "seeded"
    gens = Generators(counting, {"story": rewrite_story}, respond)
    path = tmp_path / "out.jsonl"
    synthesize(backend, saes, targets[:2], path, gens, budget=50, per_feature=50, max_rounds=2, clock=clock)
    first = list(calls)
    synthesize(backend, saes, targets[:2], path, gens, budget=50, per_feature=50, max_rounds=2, clock=clock,
               resume=True)
    assert calls == first  # every round was finished: resuming generates nothing


def test_budget_caps_the_file_and_a_larger_budget_continues_it(backend, saes, targets, tmp_path):
    small = run(backend, saes, targets, tmp_path / "a.jsonl", budget=3)
    assert small.total == 3 and small.budget_reached
    assert len(read_synthetic(tmp_path / "a.jsonl")) == 3
    run(backend, saes, targets, tmp_path / "a.jsonl", budget=6, resume=True)
    run(backend, saes, targets, tmp_path / "b.jsonl", budget=6)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_duplicates_and_excluded_texts_are_skipped(model, backend, saes, tmp_path):
    gens = Generators(lambda request: ["how do I pick a lock", "How do I   PICK a lock", "write a poem about rain"])
    texts = ["how do I pick a lock", "write a poem about rain"]
    features = [(LAYER, f) for f in range(128)]
    fires = dense_maxima(model, backend, saes, texts, features) > 0
    both = [f for (_, f), col in zip(features, fires.T) if col.all()]
    target = TargetFeature(LAYER, both[0], "x")
    out = synthesize(backend, saes, [target], tmp_path / "d.jsonl", gens, budget=10, per_feature=10, clock=clock)
    assert [r["prompt"] for r in read_synthetic(tmp_path / "d.jsonl")] == texts
    assert out.total == 2
    synthesize(backend, saes, [target], tmp_path / "e.jsonl", gens, budget=10, per_feature=10, clock=clock,
               exclude=["HOW DO I PICK A LOCK"])
    assert [r["prompt"] for r in read_synthetic(tmp_path / "e.jsonl")] == ["write a poem about rain"]


def test_bad_input_fails_before_anything_is_written(backend, saes, targets, tmp_path):
    path = tmp_path / "out.jsonl"
    unlabelled = [TargetFeature(LAYER, targets[0].feature, "x")]
    with pytest.raises(ValueError, match=r"feature \(1, \d+\) has no safety label: set 'label' to 'harmful' or 'benign'"):
        run(backend, saes, unlabelled, path)
    with pytest.raises(ValueError, match=r"feature \(1, 3\) has neither an explanation nor top-activating contexts"):
        run(backend, saes, [TargetFeature(LAYER, 3, label="benign")], path)
    with pytest.raises(ValueError, match=r"feature \(1, 3\) is listed twice"):
        run(backend, saes, [TargetFeature(LAYER, 3, "x", label="benign")] * 2, path)
    with pytest.raises(ValueError, match="no SAE given for layer 2"):
        run(backend, saes, [TargetFeature(2, 3, "x", label="benign")], path)
    with pytest.raises(ValueError, match="budget must be >= 1, got 0"):
        run(backend, saes, targets, path, budget=0)
    assert not path.exists()
    run(backend, saes, targets, path, budget=2)
    with pytest.raises(FileExistsError, match="exists; resume it"):
        run(backend, saes, targets, path, budget=2)
    with pytest.raises(ValueError, match=r"was written with other settings \(per_feature, seed\)"):
        run(backend, saes, targets, path, budget=2, per_feature=3, seed=1, resume=True)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"out.jsonl is damaged \(line 2 is not a JSON record"):
        run(backend, saes, targets, path, budget=2, resume=True)


def test_generators_that_return_non_text_are_rejected(backend, saes, targets, tmp_path):
    gens = Generators(lambda request: [42])
    with pytest.raises(TypeError, match="generator '<lambda>' returned int, expected str"):
        synthesize(backend, saes, targets[:1], tmp_path / "o.jsonl", gens, budget=2)


def test_top_contexts_match_the_dense_reference(model, backend, saes):
    features = [(LAYER, f) for f in firing_features(model, backend, saes, TEXTS, lo=2)[:3]]
    contexts = top_contexts(backend, saes, TEXTS, features, n=2, window=4, batch_size=4)
    reference = dense_maxima(model, backend, saes, TEXTS, features)
    for j, key in enumerate(features):
        best = np.sort(reference[:, j])[::-1][:2]
        assert [c.activation for c in contexts[key]] == pytest.approx(best.tolist(), rel=1e-4)
        top_text = TEXTS[int(np.argmax(reference[:, j]))]
        assert contexts[key][0].text in top_text and len(contexts[key][0].peak) == 1
    fire = firing_features(model, backend, saes, TEXTS, lo=1, hi=len(TEXTS))
    never = [f for f in range(128) if f not in fire]
    assert top_contexts(backend, saes, TEXTS, [(LAYER, never[0])])[(LAYER, never[0])] == []
    seen = []
    reply = explain(lambda prompt: seen.append(prompt) or " Detects questions. ", contexts[features[0]])
    assert reply == "Detects questions." and "«" in seen[0]
    with pytest.raises(ValueError, match="no contexts to explain"):
        explain(lambda prompt: "x", [])


def test_context_prompter_raises_coverage_of_missing_targets(model, backend, saes, tmp_path):
    seed = TEXTS[:2]
    corpus = POOL + TEXTS[2:]
    features = [(LAYER, f) for f in range(128)]
    before = coverage_report(collect_support(backend, saes, seed, features), {k: 1.0 for k in features}, tau=0.5)
    ordered = priority_targets(before, [TargetFeature(l, f) for l, f in features])
    assert [t.key for t in ordered] == before.missing + before.weak
    missing = priority_targets(before, ordered, include_weak=False)
    contexts = top_contexts(backend, saes, corpus, [t.key for t in missing], n=3, window=40)
    reachable = [t for t in missing if contexts[t.key]][:6]
    assert len(reachable) == 6
    requests = plan_requests(reachable, contexts)
    assert requests[0].description == "what the example texts below have in common"
    out = tmp_path / "synth.jsonl"
    synthesize(backend, saes, reachable, out, Generators(ContextPrompter()), contexts=contexts,
               budget=len(reachable), clock=clock)
    synthetic = [r["prompt"] for r in read_synthetic(out)]
    after = coverage_report(collect_support(backend, saes, seed + synthetic, features),
                            {k: 1.0 for k in features}, tau=0.5)
    assert after.coverage > before.coverage
    assert set(before.missing) - set(after.missing) >= {(r["layer"], r["feature"]) for r in read_synthetic(out)}


def test_random_baseline_is_unverified_deterministic_and_budgeted(tmp_path):
    gens = Generators(lambda request: [f"Tell me about {request.description} (take {request.round})"], {}, respond)
    a = random_synthesis(tmp_path / "a.jsonl", gens, budget=5, seed=3, clock=clock)
    b = random_synthesis(tmp_path / "b.jsonl", gens, budget=5, seed=3, clock=clock)
    records = read_synthetic(tmp_path / "a.jsonl")
    assert a.total == b.total == 5 and len(records) == 5
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert all(r["activation"] is None and r["feature"] is None for r in records)
    assert all(r["response"] == ("I can't help with that." if r["label"] == "harmful" else
                                 f"Sure, here is how: {r['prompt']}.") for r in records)
    random_synthesis(tmp_path / "c.jsonl", gens, budget=3, seed=3, clock=clock)
    random_synthesis(tmp_path / "c.jsonl", gens, budget=5, seed=3, clock=clock, resume=True)
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    with pytest.raises(ValueError, match="topic label 'toxic' is not one of harmful, benign"):
        random_synthesis(tmp_path / "d.jsonl", gens, budget=5, topics=[("x", "toxic")])


# ---- qscope synth ------------------------------------------------------------------------------
def test_synth_command_dry_run_then_run_then_resume(model, backend, saes, tmp_path, capsys):
    from qscope_plugins.cli import main

    features = [(LAYER, f) for f in firing_features(model, backend, saes, POOL, lo=1, hi=3)[:3]]
    common = write_cli_inputs(tmp_path, model, features, scores=[1.0] * 3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(POOL) + "\n")
    seed = str(tmp_path / "seed.jsonl")
    out = tmp_path / "synth.jsonl"
    plan = ["synth", seed, *common, "--corpus", str(corpus), "--generator", "contexts", "--synthetic", str(out)]
    assert main([*plan, "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert not out.exists()
    assert dry["targets"] == dry["before"]["missing"] + dry["before"]["weak"]  # missing first
    assert [[r["layer"], r["feature"]] for r in dry["requests"]] == dry["targets"]
    assert all(r["contexts"] for r in dry["requests"])
    assert main([*plan, "--budget", "2", "--baseline", str(tmp_path / "random.jsonl"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = read_synthetic(out)
    assert summary["total"] == len(records) == 2
    assert summary["after"]["coverage"] > summary["before"]["coverage"]
    assert all(r["activation"] > 0 and r["generator"] == "contexts" for r in records)
    assert len(read_synthetic(tmp_path / "random.jsonl")) == 2 and "baseline" in summary
    assert main([*plan, "--budget", "2"]) == 2
    assert "exists; resume it" in capsys.readouterr().err
    assert main([*plan, "--budget", "2", "--resume", "--baseline", str(tmp_path / "random.jsonl")]) == 0
    assert read_synthetic(out) == records


def test_synth_command_with_a_text_generation_model(model, backend, saes, tmp_path, capsys):
    from qscope_plugins.cli import main

    features = [(LAYER, f) for f in firing_features(model, backend, saes, POOL, lo=1, hi=3)[:2]]
    common = write_cli_inputs(tmp_path, model, features, scores=[1.0, 1.0], labels=["harmful", "benign"])
    out = tmp_path / "synth.jsonl"
    args = ["synth", str(tmp_path / "seed.jsonl"), *common, "--synthetic", str(out), "--generator-model",
            str(tmp_path / "model"), "--styles", "roleplay", "--max-new-tokens", "12", "--max-rounds", "2",
            "--budget", "4", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["generated"] > 0
    records = read_synthetic(out)
    assert records and len(records) == summary["total"] <= 4
    assert all(r["activation"] > 0 and r["responder"] == "llm" and r["generator"] == "llm" for r in records)
    assert {r["rewrite"] for r in records} <= {None, "roleplay"}
    assert main(["synth", str(tmp_path / "seed.jsonl"), *common, "--synthetic", str(out)]) == 2
    assert "--generator llm and --explain need --generator-model" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    ([], "give --synthetic OUT.jsonl (or --dry-run)"),
    (["--synthetic", "o.jsonl", "--generator", "contexts"], "--generator contexts needs --corpus"),
    (["--dry-run", "--styles", "roleplay,poetry"], "unknown style 'poetry'; choose from roleplay, hypothetical, indirect"),
])
def test_synth_command_rejects_bad_options_before_loading_anything(tmp_path, capsys, extra, message):
    from qscope_plugins.cli import main

    args = ["synth", str(tmp_path / "seed.jsonl"), "--features", str(tmp_path / "f.json"), "--model", "m", "--sae", "s"]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err
