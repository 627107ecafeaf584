"""SAELens sees every Qwen-Scope release through this project's loader and class."""

import pytest
import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_CONFIG_GETTERS, NAMED_PRETRAINED_SAE_LOADERS
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

import qscope_plugins
from qscope_plugins import GROUPS, QwenScopeSAE, load_sae
from qscope_plugins.integrations import saelens as integration
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer


def test_all_releases_use_the_qscope_loader():
    """SAELens's own directory lists every release, under its converter name ``qwen_scope``, which
    now names this project's loader; no other release uses that name."""
    directory = get_pretrained_saes_directory()
    for group in GROUPS:
        entry = directory[group.release]
        assert entry.conversion_func == integration.SAELENS_CONVERTER and entry.repo_id == group.repo_id
        assert entry.saes_map == {f"layer{n}": group.filename(n) for n in range(group.n_layers)}
    assert {r for r, e in directory.items() if e.conversion_func == "qwen_scope"} == {g.release for g in GROUPS}
    for name in ("qscope", "qwen_scope"):
        assert NAMED_PRETRAINED_SAE_LOADERS[name] is integration.qscope_loader
        assert NAMED_PRETRAINED_SAE_CONFIG_GETTERS[name] is integration.qscope_config


def test_register_is_idempotent():
    assert qscope_plugins.register()["saelens"] == []
    assert integration.register() == []


@pytest.mark.slow
def test_from_pretrained_release_name(real_hub_offline, real_group):
    sae = SAE.from_pretrained(real_group.release, "layer0")
    assert isinstance(sae, QwenScopeSAE)
    assert sae.cfg.k == real_group.k and sae.cfg.d_sae == real_group.d_sae and sae.cfg.d_in == real_group.d_model
    meta = sae.cfg.metadata
    assert meta.hook_name == "blocks.0.hook_resid_post"
    assert meta.hf_hook_name == "model.layers.0" and meta.model_name == "Qwen/Qwen3-1.7B-Base"
    direct = load_sae(real_group.repo_id, 0)
    x = torch.randn(3, real_group.d_model)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), direct.encode(x))


def test_qwen35_hook_metadata_uses_the_text_layer_path():
    group = qscope_plugins.get_group("qwen-scope-3.5-2b-base-w32k-l50")
    cfg = integration.qscope_config(group.repo_id, "layer7.sae.pt", "cpu")
    assert cfg["metadata"]["hf_hook_name"] == "model.language_model.layers.7"
    assert cfg["metadata"]["hook_name"] == "blocks.7.hook_resid_post"
    assert cfg["architecture"] == "qwen_scope_topk" and cfg["k"] == 50 and cfg["d_sae"] == 32768


def test_converted_directory_loads_with_load_from_disk(tmp_path):
    from qscope_plugins.sae.convert import convert_layer

    plain = tmp_path / "plain"
    write_released_layer(plain, 1, random_sae_state(48, 384, seed=4))
    original = load_sae(plain, 1, k=8)
    convert_layer(str(plain), 1, tmp_path / "out", k=8)
    loaded = SAE.load_from_disk(tmp_path / "out" / "layer1")
    assert isinstance(loaded, QwenScopeSAE) and loaded.cfg.k == 8
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), original.encode(x))
        torch.testing.assert_close(load_sae(tmp_path / "out", 1).reconstruct(x), original.reconstruct(x))


@pytest.mark.parametrize("host", ["bridge", "hooked"])
def test_sae_transformers_accept_the_sae(tmp_path, host):
    """HookedSAETransformer / SAETransformerBridge splice a QwenScopeSAE in at blocks.n.hook_resid_post."""
    from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model, tiny_tokenizer

    hf = tiny_model("Qwen3ForCausalLM", seed=1)
    save_checkpoint(hf, tmp_path / "model", tokenizer=tiny_tokenizer())
    if host == "bridge":
        from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge

        model = SAETransformerBridge.boot_transformers(str(tmp_path / "model"), device="cpu")
    else:
        from sae_lens import HookedSAETransformer

        model = HookedSAETransformer.from_pretrained_no_processing(str(tmp_path / "model"), device="cpu")
    sae = QwenScopeSAE.from_weights(**random_sae_state(hf.config.hidden_size, 256, seed=5), k=8, layer=1)
    tokens = torch.tensor([[5, 17, 99, 3, 42, 7]])
    captured = {}
    handle = hf.model.layers[1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        clean = hf(tokens).logits
    handle.remove()
    model.add_sae(sae, use_error_term=True)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        expected = sae.encode(captured["h"])
    (acts_name,) = [name for name in cache.keys() if name.endswith("hook_sae_acts_post")]
    assert acts_name.startswith("blocks.1.")
    torch.testing.assert_close(cache[acts_name], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, clean, atol=1e-4, rtol=1e-4)
