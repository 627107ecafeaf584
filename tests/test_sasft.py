"""SASFT: alpha per language, the penalty against a hand computation, one step lowers it, Trainer wiring."""

from __future__ import annotations

import json

import pytest
import torch

from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.recipes.sasft import (
    LanguageBaselines, SASFTLoss, SASFTTrainer, estimate_alpha, feature_encoder,
)
from qscope_plugins.sae import QwenScopeSAE, load_feature_subset
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer
from qscope_plugins.testing.tiny_models import hf_layer_outputs, tiny_model, tiny_tokenizer

LAYERS = (2, 3)
FEATURES = {2: (5, 17, 40), 3: (1, 99)}
TEXTS = {"en": ["the cat sat on the mat", "good morning to you"], "zh": ["你好世界", "今天天气很好"],
         "ru": ["привет мир", "доброе утро"]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def states():
    return {n: random_sae_state(64, 128, seed=10 + n) for n in LAYERS}


@pytest.fixture(scope="module")
def subsets(tmp_path_factory, states):
    """Only the selected features' rows, read from files in the released layout."""
    directory = tmp_path_factory.mktemp("sae")
    for n, state in states.items():
        write_released_layer(directory, n, state)
    return {n: load_feature_subset(str(directory), n, list(FEATURES[n]), k=8) for n in LAYERS}


def hand_pre(state, layer_out: torch.Tensor, features) -> torch.Tensor:
    """``W_enc[s] . h + b_enc[s]`` straight from the released tensors, in float64."""
    ids = list(features)
    return layer_out.double() @ state["W_enc"][ids].double().T + state["b_enc"][ids].double()


def test_estimate_alpha_is_the_mean_pre_activation_without_first_tokens(tok, states, subsets):
    model = tiny_model("Qwen3ForCausalLM", seed=4)
    baselines = estimate_alpha(HFBackend(model, tok), subsets, TEXTS, batch_size=2)
    assert baselines.languages == ("en", "zh", "ru") and baselines.features == FEATURES
    for j, texts in enumerate(TEXTS.values()):
        for n in LAYERS:
            pres = []
            for text in texts:
                _, outs = hf_layer_outputs(model, torch.tensor([tok(text)["input_ids"]]))
                pres.append(hand_pre(states[n], outs[n][0, 1:], FEATURES[n]))
            torch.testing.assert_close(baselines.alpha[n][j].double(), torch.cat(pres).mean(0), rtol=1e-5, atol=1e-5)
    full = {n: QwenScopeSAE.from_weights(**states[n], k=8, layer=n) for n in LAYERS}
    from_full = estimate_alpha(HFBackend(model, tok), full, TEXTS, features=FEATURES)
    for n in LAYERS:
        torch.testing.assert_close(from_full.alpha[n], baselines.alpha[n])


def test_baselines_round_trip_and_reject_bad_files(tmp_path):
    baselines = LanguageBaselines(("en", "zh"), {2: (5, 17)}, {2: torch.tensor([[0.5, -1.0], [2.0, 0.25]])})
    path = baselines.save(tmp_path / "alpha.json")
    loaded = LanguageBaselines.load(path)
    assert loaded.languages == ("en", "zh") and loaded.features == {2: (5, 17)}
    torch.testing.assert_close(loaded.alpha[2], baselines.alpha[2])
    assert loaded.index("zh") == 1
    with pytest.raises(ValueError, match="no baseline for language 'ko'; known: en, zh"):
        loaded.index("ko")
    bad = {"languages": ["en", "zh"], "layers": {"2": {"features": [5, 17], "alpha": [[0.5, -1.0, 3.0], [2.0, 0.25, 1.0]]}}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"alpha.json: layer 2 alpha has shape \(2, 3\), expected \(2, 2\)"):
        LanguageBaselines.load(path)


def make_batch(tok):
    """Three examples (en, zh, ru), prompt tokens masked with -100, right-padded with -100 labels."""
    pairs = [("Q: hi A:", " hello there"), ("问：你好 答：", "你好呀朋友"), ("В: привет О:", " здравствуй")]
    rows, labels = [], []
    for prompt, answer in pairs:
        p, a = tok(prompt)["input_ids"], tok(answer)["input_ids"]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, lab, ["en", "zh", "ru"]


def hand_penalty(model, states, ids, labels, languages, baselines, target, weight):
    """Eqs. 26-27 and the official normalisation, one loop per term, float64."""
    _, outs = hf_layer_outputs(model, ids)
    n_valid = int((labels != -100).sum())
    total = 0.0
    for n in LAYERS:
        pre = hand_pre(states[n], outs[n], FEATURES[n])  # (B, T, F)
        layer_sum = 0.0
        for b, language in enumerate(languages):
            if language == target:
                continue
            alpha = baselines.alpha[n][baselines.index(language)].double()
            for t in range(ids.shape[1]):
                if labels[b, t] != -100:
                    layer_sum += torch.relu(pre[b, t] - alpha).sum().item()
        total += layer_sum / (n_valid * len(FEATURES[n]) + 1)
    return weight * total


@pytest.fixture
def baselines(tok, subsets):
    model = tiny_model("Qwen3ForCausalLM", seed=4)
    found = estimate_alpha(HFBackend(model, tok), subsets, TEXTS)
    # shift the baselines so that some response tokens exceed them and some do not
    return LanguageBaselines(found.languages, found.features, {n: a - 0.3 for n, a in found.alpha.items()})


def test_penalty_equals_the_hand_computation(tok, states, subsets, baselines):
    model = tiny_model("Qwen3ForCausalLM", seed=4)
    ids, labels, languages = make_batch(tok)
    loss = SASFTLoss(subsets, baselines, target_language="zh", weight=0.5)
    with loss.attach(model):
        model(input_ids=ids)
        value = loss(labels, languages)
    expected = hand_penalty(model, states, ids, labels, languages, baselines, "zh", 0.5)
    assert expected > 0
    assert value.item() == pytest.approx(expected, rel=1e-4)
    with loss.attach(model):  # indices work like names; the target-language example adds nothing
        model(input_ids=ids)
        assert loss(labels, torch.tensor([0, 1, 2])).item() == pytest.approx(expected, rel=1e-4)
        model(input_ids=ids[1:2])
        assert loss(labels[1:2], ["zh"]).item() == 0.0


def test_one_optimisation_step_lowers_the_targeted_pre_activation(tok, subsets, baselines):
    model = tiny_model("Qwen3ForCausalLM", seed=4).train()
    ids, labels, languages = make_batch(tok)
    loss = SASFTLoss(subsets, baselines, target_language="zh", weight=1.0).attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model(input_ids=ids)
    before = loss(labels, languages)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        model(input_ids=ids)
        after = loss(labels, languages)
    loss.detach()
    assert after.item() < 0.9 * before.item()


def test_bad_input_is_reported(tok, states, subsets, baselines):
    model = tiny_model("Qwen3ForCausalLM", seed=4)
    ids, labels, languages = make_batch(tok)
    loss = SASFTLoss(subsets, baselines, target_language="zh", weight=1.0)
    with pytest.raises(RuntimeError, match="no layer outputs captured: attach"):
        loss(labels, languages)
    with loss.attach(model):
        model(input_ids=ids)
        with pytest.raises(ValueError, match="unknown language 'ko'; known: en, zh, ru"):
            loss(labels, ["en", "ko", "ru"])
        with pytest.raises(ValueError, match="language index 7 out of range"):
            loss(labels, torch.tensor([0, 7, 1]))
        with pytest.raises(ValueError, match=r"labels must be \(batch, tokens\) with one language per example"):
            loss(labels, ["en", "ru"])
    with pytest.raises(ValueError, match="no baseline for language 'ko'"):
        SASFTLoss(subsets, baselines, target_language="ko", weight=1.0)
    with pytest.raises(ValueError, match=r"feature 5 is not in this feature subset \(loaded: \[1, 99\]\)"):
        feature_encoder(subsets[3], [5])
    with pytest.raises(ValueError, match="name the features to penalise"):
        feature_encoder(QwenScopeSAE.from_weights(**states[2], k=8, layer=2))
    small = tiny_model("Qwen3ForCausalLM", seed=4, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"layer 2 is out of range: the model has layers 0..1"):
        loss.attach(small)


def test_trainer_adds_the_penalty_to_its_loss(tmp_path, tok, states, subsets, baselines):
    from datasets import Dataset
    from transformers import TrainingArguments

    model = tiny_model("Qwen3ForCausalLM", seed=4)
    ids, labels, languages = make_batch(tok)
    rows = [{"input_ids": i.tolist(), "labels": l.tolist(), "lang": baselines.index(x)}
            for i, l, x in zip(ids, labels, languages)]
    args = TrainingArguments(tmp_path, max_steps=1, per_device_train_batch_size=3, learning_rate=1e-3,
                             remove_unused_columns=False, report_to=[], save_strategy="no", use_cpu=True)
    loss = SASFTLoss(subsets, baselines, target_language="zh", weight=0.5)
    trainer = SASFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), sasft=loss)
    batch = {"input_ids": ids, "labels": labels, "lang": torch.tensor([baselines.index(x) for x in languages])}
    model.eval()
    with torch.no_grad():
        ce = model(input_ids=ids, labels=labels).loss.item()
        total = trainer.compute_loss(model, dict(batch)).item()
    penalty = hand_penalty(model, states, ids, labels, languages, baselines, "zh", 0.5)
    assert total == pytest.approx(ce + penalty, rel=1e-4)
    model.train()  # accumulation over 2 micro-batches, CE normalised over both: the penalty is halved
    trainer.current_gradient_accumulation_steps = 2
    n_items = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        ce_items = model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss.item()
        scaled = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items).item()
    assert scaled == pytest.approx(ce_items + penalty / 2, rel=1e-4)
    with pytest.raises(ValueError, match="SASFT needs 'labels' and 'lang' in every batch"):
        trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    assert trainer.train().global_step == 1
