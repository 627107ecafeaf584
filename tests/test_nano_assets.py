"""The shipped nano artifacts: built from the code's configuration, intact, loadable, and good.

Also checks the corpus generator's planted ground truth, since the demo regenerates its held-out
sets from it instead of shipping text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch

from qscope_plugins.demo.assets import (
    ASSETS,
    MANIFEST,
    MODEL_DIR,
    SAE_DIR,
    SAFETENSORS_DIR,
    corpus_generator,
    read_manifest,
)
from qscope_plugins.demo.config import BuildConfig, EvalSeeds
from qscope_plugins.demo.lexicon import CJK

CFG = BuildConfig()
EVAL = EvalSeeds()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return read_manifest()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ASSETS / MODEL_DIR).eval()
    return model, AutoTokenizer.from_pretrained(ASSETS / MODEL_DIR)


def test_manifest_matches_the_build_configuration(manifest):
    assert manifest["config_hash"] == CFG.hash()
    assert manifest["config"] == json.loads(json.dumps(CFG.to_dict()))


def test_config_hash_tracks_every_field():
    assert replace(CFG, version=CFG.version + 1).hash() != CFG.hash()
    assert replace(CFG, sae=replace(CFG.sae, k=CFG.sae.k + 1)).hash() != CFG.hash()
    assert BuildConfig().hash() == CFG.hash()


def test_stale_manifest_is_refused(tmp_path, manifest):
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "config_hash": "0" * 64}))
    with pytest.raises(ValueError, match="rebuild with python -m qscope_plugins.demo.build"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing manifest.json"):
        read_manifest(tmp_path / "nowhere")


def test_files_match_manifest_and_fit_the_size_budget(manifest):
    listed = manifest["files"]
    on_disk = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file()} - {MANIFEST}
    assert on_disk == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, name
    assert sum((ASSETS / name).stat().st_size for name in listed) <= 10 * 2**20


def test_model_loads_in_transformers_and_learned_the_corpus(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.num_hidden_layers == CFG.model.num_hidden_layers
    assert model.config.hidden_size == CFG.model.hidden_size
    docs = [d.text for d in corpus_generator().documents(EVAL.monolingual, 8)]
    ids = tok(docs)["input_ids"]
    assert [tok.decode(row) for row in ids] == docs
    gen = torch.Generator().manual_seed(0)

    def loss(rows: list[list[int]]) -> float:
        with torch.no_grad():
            losses = [float(model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss) for r in rows]
        return sum(losses) / len(losses)

    shuffled = [[row[i] for i in torch.randperm(len(row), generator=gen)] for row in ids]
    real = loss(ids)
    assert real < 0.6 * loss(shuffled)
    assert real < 0.5 * torch.log(torch.tensor(float(len(tok)))).item()


def test_sae_files_have_the_released_layout(manifest):
    d_model, d_sae = CFG.model.hidden_size, CFG.sae.expansion * CFG.model.hidden_size
    shapes = {"W_enc": (d_sae, d_model), "W_dec": (d_model, d_sae), "b_enc": (d_sae,), "b_dec": (d_model,)}
    for n in range(CFG.model.num_hidden_layers):
        state = torch.load(ASSETS / SAE_DIR / f"layer{n}.sae.pt", weights_only=True)
        assert isinstance(state, dict) and set(state) == set(shapes)
        for key, shape in shapes.items():
            assert tuple(state[key].shape) == shape and state[key].dtype == torch.float32, (n, key)
    layers = CFG.model.num_hidden_layers
    assert manifest["sae"] == {"k": CFG.sae.k, "d_model": d_model, "d_sae": d_sae, "layers": layers}


def test_saes_reconstruct_held_out_residuals(model_and_tokenizer):
    """Both shipped formats load through ``load_sae`` and explain >= 0.9 of the variance per layer."""
    from qscope_plugins import load_sae
    from qscope_plugins.backends.hf import HFBackend

    model, tok = model_and_tokenizer
    docs = [d.text for d in corpus_generator().documents(CFG.sae_heldout_seed, 24)]
    layers = list(range(CFG.model.num_hidden_layers))
    batch = next(HFBackend(model, tok).residuals(docs, layers, batch_size=len(docs)))
    for n in layers:
        released = load_sae(ASSETS / SAE_DIR, n, k=CFG.sae.k)
        converted = load_sae(ASSETS / SAFETENSORS_DIR, n)
        assert converted.cfg.k == CFG.sae.k
        torch.testing.assert_close(converted.W_dec, released.W_dec, rtol=0, atol=0)
        x = batch.tokens(n)
        with torch.no_grad():
            x_hat = released.decode(released.encode(x))
        ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert ev >= 0.9, (n, ev)


def test_generator_plants_its_ground_truth():
    gen = corpus_generator()
    lex = gen.lex
    docs = gen.documents(EVAL.contrast, 400)
    assert docs == gen.documents(EVAL.contrast, 400)  # regenerated, never shipped
    for doc in docs:
        assert (doc.toxic_words > 0) == doc.toxic
        if doc.lang == "B":
            assert not doc.switched and not set(doc.text.split()) & set(lex.a.cues)
        else:
            assert bool(CJK.search(doc.text)) == doc.switched
            if doc.switched:  # the switch comes right after a cue and its comma
                assert doc.text[: CJK.search(doc.text).start()].split()[-3:-1][0] in lex.a.cues
        if not doc.toxic:
            assert not set(doc.text.split()) & set(lex.a.toxic)
    assert {d.lang for d in docs} == {"A", "B"} and 0 < sum(d.toxic for d in docs) < len(docs) / 4
    # switching follows the cue, at the planted topic-dependent rate
    n_topics = len(lex.a.nouns)
    high = [d for d in docs if d.lang == "A" and d.topic < n_topics // 2]
    low = [d for d in docs if d.lang == "A" and d.topic >= n_topics // 2]
    assert sum(d.switched for d in high) > 5 * sum(d.switched for d in low)
    # names, digits and punctuation are shared by both scripts
    b_doc = next(d for d in docs if d.lang == "B")
    assert any(name in b_doc.text for name in lex.names) and any(c.isdigit() for c in b_doc.text)


def test_switch_prompts_end_in_a_cue_and_toxicity_set_is_balanced():
    gen = corpus_generator()
    prompts = gen.switch_prompts(EVAL.switch_prompts, 60)
    assert all(p.endswith(",") and p.split()[-2] in gen.lex.a.cues and not CJK.search(p) for p, _ in prompts)
    assert sorted({t for _, t in prompts}) == list(range(len(gen.lex.a.nouns)))
    docs = gen.toxicity_set(EVAL.toxicity_eval, 50)
    assert sum(d.toxic for d in docs) == 50 and all((d.toxic_words > 0) == d.toxic for d in docs)
