"""SAELens's own tools on Qwen-Scope SAEs: ActivationsStore, the evals CLI, cfg_overrides, training classes.

Written the way SAELens's tests use them: a release in the pretrained directory, ``SAE.from_pretrained``,
then the tool, offline, on a tiny Qwen3 checkpoint.
"""

import json

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, ActivationsStore, HookedSAETransformer
from sae_lens.loading.pretrained_sae_loaders import get_qwen_scope_config_from_hf, handle_config_defaulting
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

import qscope_plugins
from qscope_plugins.integrations import saelens as integration
from qscope_plugins.testing.sae_files import make_fake_hub_repo, random_sae_state
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model, tiny_tokenizer

REPO = "Qwen/SAE-Res-Tiny-W1K-L0_8"  # Qwen-Scope naming: d_sae 1024, k 8
RELEASE = "qwen-scope-tiny-test"
TEXTS = [f"the {i}th line of a tiny corpus, with some words in it" for i in range(48)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = tiny_model("Qwen3ForCausalLM", seed=1)
    directory = tmp_path_factory.mktemp("model") / "Qwen3-Tiny"
    save_checkpoint(hf, directory, tokenizer=tiny_tokenizer())
    return hf, directory


@pytest.fixture
def release(offline_hub, checkpoint):
    """A Qwen-Scope-style release (the ``qscope`` converter) whose overrides name the tiny checkpoint."""
    hf, directory = checkpoint
    make_fake_hub_repo(offline_hub, REPO, {1: random_sae_state(hf.config.hidden_size, 1024, seed=2)})
    saes = get_pretrained_saes_directory()

    def add(config_overrides=None, neuronpedia_id=None):
        saes[RELEASE] = PretrainedSAELookup(
            release=RELEASE, repo_id=REPO, model=str(directory), conversion_func="qscope",
            saes_map={"layer1": "layer1.sae.pt"}, expected_var_explained={"layer1": 1.0}, expected_l0={"layer1": 8},
            neuronpedia_id={"layer1": neuronpedia_id}, norm_scaling_factor={}, config_overrides=config_overrides)

    add({"model_name": str(directory)})
    yield add
    saes.pop(RELEASE, None)


def hf_layer_output(hf, tokens, layer):
    seen = {}
    handle = hf.model.layers[layer].register_forward_hook(lambda m, i, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hf(tokens)
    handle.remove()
    return seen["h"]


def test_metadata_that_saelens_tools_read():
    """Every release: context_size, prepend_bos, dataset fields and model_from_pretrained_kwargs (a dict) are set."""
    for group in qscope_plugins.GROUPS:
        cfg = integration.qscope_config(group.repo_id, "layer0.sae.pt", "cpu")
        meta = cfg["metadata"]
        assert meta["context_size"] == 1024 and meta["prepend_bos"] is False
        assert meta["model_from_pretrained_kwargs"] == {} and meta["dataset_path"] is None
        assert meta["model_name"] == group.model and meta["hook_name"] == "blocks.0.hook_resid_post"
    a = integration.qscope_config(group.repo_id, "layer0.sae.pt", "cpu")
    a["metadata"]["model_from_pretrained_kwargs"]["fold_ln"] = False  # configs share no mutable state
    assert integration.qscope_config(group.repo_id, "layer0.sae.pt", "cpu")["metadata"]["model_from_pretrained_kwargs"] == {}


def test_activations_store_from_sae(release, checkpoint):
    """``ActivationsStore.from_sae`` needs no extra argument, and yields HF's layer output at the SAE's hook."""
    hf, directory = checkpoint
    sae = SAE.from_pretrained(RELEASE, "layer1")
    model = HookedSAETransformer.from_pretrained_no_processing(str(directory), **sae.cfg.metadata.model_from_pretrained_kwargs)
    data = Dataset.from_dict({"text": TEXTS})
    store = ActivationsStore.from_sae(model, sae, dataset=data)  # SAELens raised "context_size is required"
    assert store.context_size == 1024 and store.prepend_bos is False and store.hook_name == "blocks.1.hook_resid_post"
    store = ActivationsStore.from_sae(model, sae, dataset=data, context_size=12, store_batch_size_prompts=2)
    tokens = store.get_batch_tokens(2)
    assert tokens.shape == (2, 12) and not (tokens[:, 0] == model.tokenizer.bos_token_id).all()
    acts = store.get_activations(tokens)  # (batch, pos, d_in)
    torch.testing.assert_close(acts, hf_layer_output(hf, tokens, 1), atol=1e-4, rtol=1e-4)


def test_evals_cli_runs_on_a_qwen_scope_release_offline(release, tmp_path):
    """``python -m sae_lens.evals <release> <sae_id> ...``: loads the model by metadata, unpacks its kwargs, evaluates."""
    from sae_lens.evals import run_evals_cli

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    run_evals_cli([RELEASE, "layer1", "--datasets", str(data), "--ctx_lens", "16", "--batch_size_prompts", "2",
                   "--n_eval_reconstruction_batches", "1", "--n_eval_sparsity_variance_batches", "1",
                   "--compute_kl", "--compute_ce_loss", "--compute_sparsity_metrics", "--output_dir", str(tmp_path / "out")])
    (result,) = json.loads((tmp_path / "out" / "all_eval_results.json").read_text())
    assert result["unique_id"] == f"{RELEASE}-layer1" and result["eval_cfg"]["context_size"] == 16
    metrics = result["metrics"]
    assert metrics["sparsity"]["l0"] == pytest.approx(8.0)
    ce = metrics["model_performance_preservation"]
    assert ce["ce_loss_without_sae"] > 0 and ce["ce_loss_with_sae"] > 0


OVERRIDES = {"context_size": 256, "dataset_path": "org/corpus", "prepend_bos": True, "seqpos_slice": [1, None],
             "exclude_special_tokens": True}


def saelens_would_give(overrides):
    """What SAELens's own qwen_scope config getter makes of these overrides (after its 6.0 conversion)."""
    flat = get_qwen_scope_config_from_hf("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", "layer1.sae.pt", "cpu", cfg_overrides=overrides)
    return handle_config_defaulting(flat)["metadata"]


def test_cfg_overrides_reach_the_loaded_sae_as_in_saelens(release, checkpoint):
    release({**OVERRIDES, "model_name": str(checkpoint[1]), "relu": False}, neuronpedia_id="qwen3-tiny/1-res")
    sae = SAE.from_pretrained(RELEASE, "layer1")
    expected = saelens_would_give({**OVERRIDES, "neuronpedia_id": "qwen3-tiny/1-res"})
    for key in [*OVERRIDES, "neuronpedia_id"]:
        assert sae.cfg.metadata[key] == expected[key], key
    assert sae.cfg.relu is False  # a config field, not metadata
    with torch.no_grad():  # pre-activations of 0 are b_enc, all negative here: kept as they are without ReLU
        assert (sae.encode(torch.zeros(1, sae.cfg.d_in)) < 0).sum() == 8


def test_config_getter_keeps_metadata_overrides():
    """``load_sae_config_from_huggingface`` (the config-only route) applies the release's overrides under metadata."""
    from dataclasses import replace

    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    group = qscope_plugins.get_group("qwen-scope-3-1.7b-base-w32k-l50")
    saes = get_pretrained_saes_directory()
    original = saes[group.release]
    saes[group.release] = replace(original, config_overrides=dict(OVERRIDES), neuronpedia_id={"layer1": "np/1"})
    try:
        cfg = load_sae_config_from_huggingface(group.release, "layer1")
    finally:
        saes[group.release] = original
    expected = saelens_would_give({**OVERRIDES, "neuronpedia_id": "np/1"})
    assert {key: cfg["metadata"][key] for key in [*OVERRIDES, "neuronpedia_id"]} == \
        {key: expected[key] for key in [*OVERRIDES, "neuronpedia_id"]}
    assert "context_size" not in cfg and cfg["architecture"] == "qwen_scope_topk"


def test_released_sae_trains_further_with_saelens_and_exports_back(tmp_path):
    """save_model -> TrainingSAE.load_from_disk -> SAETrainer.fit -> released layout and SAELens inference format."""
    from sae_lens import TrainingSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE

    from qscope_plugins import load_sae
    from qscope_plugins.recipes.sae_train import export_qwen_scope
    from qscope_plugins.sae.training import QwenScopeTrainingSAE
    from qscope_plugins.testing.sae_files import write_released_layer

    d, n, k = 32, 128, 4
    state = random_sae_state(d, n, seed=6)
    state["W_dec"] = state["W_dec"] * torch.linspace(0.5, 1.5, n)  # decoder columns of unequal norm, as released
    write_released_layer(tmp_path / "released", 2, state)
    released = load_sae(tmp_path / "released", 2, k=k)
    released.save_model(tmp_path / "saelens")
    sae = TrainingSAE.load_from_disk(tmp_path / "saelens")  # KeyError 'qwen_scope_topk' before
    assert isinstance(sae, QwenScopeTrainingSAE) and isinstance(sae, TopKTrainingSAE)
    assert sae.cfg.k == k and sae.cfg.rescale_acts_by_decoder_norm is False and sae.cfg.apply_b_dec_to_input is False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, d, generator=gen)
    with torch.no_grad():  # the training SAE computes the released SAE's function
        torch.testing.assert_close(sae.encode(x), released.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), released(x), atol=1e-5, rtol=1e-5)

    # Activations that the released SAE reconstructs badly: a few planted directions, k-sparse.
    planted = torch.nn.functional.normalize(torch.randn(8, d, generator=gen), dim=-1)

    def batches():
        while True:
            codes = torch.rand(64, 8, generator=gen) * (torch.rand(64, 8, generator=gen) < 0.4)
            yield 3 * codes @ planted

    def mse(model):
        sample = next(batches())
        with torch.no_grad():
            return float((model(sample) - sample).pow(2).sum(-1).mean())

    before = mse(sae)
    trainer_cfg = SAETrainerConfig(total_training_samples=64 * 150, train_batch_size_samples=64, lr=3e-3, lr_end=3e-3,
                                   n_batches_for_norm_estimate=1, dead_feature_window=50, feature_sampling_window=50)
    from sae_lens.training.sae_trainer import SAETrainer

    trained = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches()).fit()
    after = mse(trained)
    assert after < 0.5 * before, (before, after)

    out = export_qwen_scope(trained, tmp_path / "SAE-Res-Tiny-W0K-L0_4", 2)  # the released layout
    again = load_sae(out, 2, k=k)
    trained.save_inference_model(tmp_path / "inference")
    inference = SAE.load_from_disk(tmp_path / "inference")
    assert type(inference) is type(released)
    with torch.no_grad():
        expected = trained(x)
        torch.testing.assert_close(again(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(again.reconstruct(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(inference(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("loaded_as", ["AutoModelForCausalLM", "multimodal"])
def test_saelens_hf_route_on_both_qwen35_layouts(tmp_path, loaded_as):
    """SAELens's ``load_model("AutoModelForCausalLM", ...)`` (text-only ``model.layers.N``) and a multimodal
    ``HookedProxyLM`` (``model.language_model.layers.N``): the SAE's hook resolves to the layer actually loaded."""
    from sae_lens.load_model import HookedProxyLM, load_model

    from qscope_plugins.testing.tiny_models import _multimodal_from_text

    text = tiny_model("Qwen3_5ForCausalLM", seed=3)
    directory = save_checkpoint(text, tmp_path / "Qwen3.5-Tiny", multimodal=True, tokenizer=tiny_tokenizer())
    group = qscope_plugins.get_group("qwen-scope-3.5-2b-base-w32k-l50")
    sae = qscope_plugins.QwenScopeSAE.from_weights(**random_sae_state(text.config.hidden_size, 256, seed=4), k=8, layer=2,
                                                   metadata={"hf_hook_name": group.hf_hook_name(2)})
    assert sae.cfg.metadata.hf_hook_name == "model.language_model.layers.2"  # the published layout
    if loaded_as == "AutoModelForCausalLM":
        model = load_model("AutoModelForCausalLM", str(directory), device="cpu")
        expected, layers = "model.layers.2", model.model.model.layers
    else:
        model = HookedProxyLM(_multimodal_from_text(text), tiny_tokenizer())
        expected, layers = "model.language_model.layers.2", model.model.model.language_model.layers
    assert integration.hf_hook_name(sae, model) == expected
    integration.use_hf_model(sae, model)
    assert sae.cfg.metadata.hook_name == expected and sae.layer == 2
    store = ActivationsStore.from_sae(model, sae, dataset=Dataset.from_dict({"text": TEXTS}), context_size=10,
                                      store_batch_size_prompts=2)
    tokens = store.get_batch_tokens(2)
    seen = {}
    handle = layers[2].register_forward_hook(lambda m, i, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
    acts = store.get_activations(tokens)
    handle.remove()
    torch.testing.assert_close(acts, seen["h"], atol=1e-5, rtol=1e-5)
