"""Steered rollouts: one feature-amplified rollout per group, in the layout GRPO trainers use."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qscope_plugins.backends import Sampling
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.recipes.rollouts import grouped_rollouts, rollout_groups, steered_mask, trl_rollout_func
from qscope_plugins.recipes.steering import additive
from qscope_plugins.sae import QwenScopeSAE
from qscope_plugins.testing.sae_files import random_sae_state
from qscope_plugins.testing.tiny_models import tiny_model, tiny_tokenizer

PROMPTS = ["Once upon a time", "The weather today"]
NEW = 5


@pytest.fixture(scope="module")
def model():
    return tiny_model("Qwen3ForCausalLM", seed=2)


@pytest.fixture(scope="module")
def tok():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    return tok


@pytest.fixture(scope="module")
def steer():
    state = random_sae_state(64, 32, seed=5)
    sae = QwenScopeSAE.from_weights(state["W_enc"], state["W_dec"], state["b_enc"], state["b_dec"], k=4, layer=1)
    return additive(sae, [3, 7], 40.0, positions="-1")  # last prompt token and every generated token


def test_steered_mask_marks_the_last_of_every_group():
    assert steered_mask(6, 3) == [False, False, True, False, False, True]
    assert steered_mask(6, 4, offset=6) == [False, True, False, False, False, True]  # a group split across processes
    with pytest.raises(ValueError, match="a group needs at least 2 rollouts"):
        steered_mask(4, 1)


def test_groups_hold_normal_rollouts_and_one_steered(model, tok, steer):
    backend = HFBackend(model, tok)
    groups = rollout_groups(backend, PROMPTS, steer, group_size=3, max_new_tokens=NEW, sampling=Sampling())
    plain = backend.generate(PROMPTS, max_new_tokens=NEW)
    steered = backend.generate(PROMPTS, max_new_tokens=NEW, interventions=[steer])
    for group, normal, amplified in zip(groups, plain, steered):
        assert group.steered == [False, False, True]
        assert [g.token_ids for g in group.completions[:2]] == [normal.token_ids] * 2
        assert group.completions[2].token_ids == amplified.token_ids
        assert amplified.token_ids != normal.token_ids  # the steering really changed the rollout
    sampled = [rollout_groups(backend, PROMPTS, steer, group_size=3, max_new_tokens=NEW,
                              sampling=Sampling(do_sample=True, seed=11)) for _ in range(2)]
    assert [[g.token_ids for g in grp.completions] for grp in sampled[0]] == \
           [[g.token_ids for g in grp.completions] for grp in sampled[1]]
    with pytest.raises(ValueError, match="no steering interventions given"):
        grouped_rollouts(backend, PROMPTS, [], group_size=2, max_new_tokens=NEW)


def test_trl_rollout_func_follows_the_trainer_layout(model, tok, steer):
    model.train()
    trainer = SimpleNamespace(
        model=model, processing_class=tok,
        args=SimpleNamespace(num_generations=4, max_completion_length=NEW, temperature=1.0, top_k=None, top_p=None),
        accelerator=SimpleNamespace(process_index=1, unwrap_model=lambda m: m),
    )
    chat = [{"role": "user", "content": PROMPTS[1]}]
    prompts = [PROMPTS[0]] * 2 + [chat] * 4  # this process holds the second half of a group and a whole one
    out = trl_rollout_func(steer, sampling=Sampling())(prompts, trainer)
    assert model.training  # generation switched to eval mode and back
    assert out["steered"] == [False, True, False, False, False, True]
    assert out["logprobs"] is None
    backend = HFBackend(model, tok)
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    plain = backend.generate([PROMPTS[0], text], max_new_tokens=NEW)
    steered = backend.generate([PROMPTS[0], text], max_new_tokens=NEW, interventions=[steer])
    assert out["prompt_ids"] == [plain[0].prompt_ids] * 2 + [plain[1].prompt_ids] * 4
    assert out["completion_ids"] == [plain[0].token_ids, steered[0].token_ids] + \
        [plain[1].token_ids] * 3 + [steered[1].token_ids]
    model.eval()
