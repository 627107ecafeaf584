"""nnsight traces through qscope_plugins.remote equal HF forward hooks and TransformerLens, fp32.

Every architecture: residuals at every layer (vs HF hooks, TransformerBridge and
HookedTransformer ``hook_resid_post``) and steered greedy generation (vs an HF hook) token for
token. Qwen3 alone: the published multimodal Qwen3.5 layout, in-trace encoding, splicing with
the error term kept, subset pre-activations, and a device_map-sharded model.
"""

from __future__ import annotations

import nnsight
import pytest
import torch
from nnsight.modeling.transformers import TransformersModel
from transformer_lens import HookedTransformer
from transformer_lens.model_bridge import TransformerBridge

from qscope_plugins import QwenScopeSAE, remote
from qscope_plugins.nnsight_api import encoder_rows, steering
from qscope_plugins.testing.sae_files import random_sae_state
from qscope_plugins.testing.tiny_models import ARCHITECTURES, save_checkpoint, tiny_model, tiny_tokenizer

PROMPT = "Steering vectors, layer by layer"
N_LAYERS = 4


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def input_ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def wrap(hf, tokenizer) -> TransformersModel:
    return TransformersModel(hf, tokenizer=tokenizer, task="text-generation")


def hf_residuals(hf, input_ids) -> dict[int, torch.Tensor]:
    """The reference: forward hooks on every decoder layer of a plain HF model."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda module, args, out, n=n: captured.__setitem__(n, out))
        for n, layer in enumerate(remote.layer_module(hf, n) for n in range(N_LAYERS))
    ]
    with torch.no_grad():
        hf(input_ids)
    for handle in handles:
        handle.remove()
    return captured


def hf_steered_generate(hf, input_ids, layer, vector, positions, max_new_tokens) -> list[int]:
    """The reference: an HF hook adding ``vector`` at prompt ``positions``, then to every new token."""
    calls = []

    def hook(module, args, out):
        calls.append(1)
        if len(calls) > 1:
            return out + vector
        mask = torch.zeros(out.shape[1])
        mask[list(positions)] = 1.0
        return out + mask[None, :, None] * vector

    handle = remote.layer_module(hf, layer).register_forward_hook(hook)
    with torch.no_grad():
        ids = hf.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    handle.remove()
    return ids[0].tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_residuals_equal_hf_hooks_and_transformer_lens(arch, tokenizer, input_ids, tmp_path):
    expected = hf_residuals(tiny_model(arch), input_ids)
    model = wrap(tiny_model(arch), tokenizer)
    with model.trace(input_ids):
        got = nnsight.save(remote.residuals(model, range(N_LAYERS)))
    checkpoint = save_checkpoint(tiny_model(arch), tmp_path, tokenizer=tokenizer)
    bridge = TransformerBridge.boot_transformers(str(checkpoint), hf_model=tiny_model(arch), device="cpu")
    hooked = HookedTransformer.from_pretrained_no_processing(
        str(checkpoint), hf_model=tiny_model(arch), device="cpu", dtype=torch.float32
    )
    caches = [tl.run_with_cache(input_ids)[1] for tl in (bridge, hooked)]
    assert sorted(got) == list(range(N_LAYERS))
    for n in range(N_LAYERS):
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-5)
        # the bridge runs HF's own modules: as tight as nnsight; HookedTransformer re-implements the
        # layers, within 1e-4 as every HookedTransformer parity test (the Gated DeltaNet chunk rule of
        # transformers 5.9 lands 1.5e-5 away in fp32)
        torch.testing.assert_close(caches[0][f"blocks.{n}.hook_resid_post"], got[n], rtol=0, atol=1e-5)
        torch.testing.assert_close(caches[1][f"blocks.{n}.hook_resid_post"], got[n], rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_steered_generation_equals_hf_hook_token_for_token(arch, tokenizer, input_ids):
    vector = 4 * torch.randn(64, generator=torch.Generator().manual_seed(5))
    positions, steps = (0, -2, -1), 8
    expected = hf_steered_generate(tiny_model(arch), input_ids, 2, vector, positions, steps)
    model = wrap(tiny_model(arch), tokenizer)
    push = steering(model, 2, vector=vector, positions=positions)
    with model.generate(max_new_tokens=steps, do_sample=False, pad_token_id=0) as tracer:
        with tracer.invoke(input_ids):
            remote.generate_steered(model, tracer, [push], steps)
        with tracer.invoke():
            ids = tracer.result.save()
    assert ids[0].tolist() == expected
    unsteered = hf_steered_generate(tiny_model(arch), input_ids, 2, 0 * vector, positions, steps)
    assert expected != unsteered  # the edit changed the continuation


@pytest.mark.parametrize("arch", ["Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"])
def test_published_multimodal_layout(arch, tokenizer, input_ids, tmp_path):
    import transformers

    checkpoint = save_checkpoint(tiny_model(arch), tmp_path, multimodal=True, tokenizer=tokenizer)
    conditional = getattr(transformers, arch.replace("ForCausalLM", "ForConditionalGeneration"))
    model = wrap(conditional.from_pretrained(checkpoint, dtype=torch.float32), tokenizer)
    assert remote.layout(model) == remote.Layout("model.language_model.layers", N_LAYERS, 64)
    with model.trace(input_ids):
        got = nnsight.save(remote.residuals(model, range(N_LAYERS)))
    expected = hf_residuals(tiny_model(arch), input_ids)
    for n in range(N_LAYERS):
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def sae():
    return QwenScopeSAE.from_weights(**random_sae_state(64, 256, seed=4), k=8, layer=2)


def test_encode_inside_a_local_trace(tokenizer, input_ids, sae):
    model = wrap(tiny_model("Qwen3ForCausalLM"), tokenizer)
    with model.trace(input_ids):
        codes = nnsight.save(remote.encode(model, 2, sae))
    expected = sae.encode_sparse(hf_residuals(tiny_model("Qwen3ForCausalLM"), input_ids)[2])
    assert torch.equal(codes.indices, expected.indices)
    torch.testing.assert_close(codes.values, expected.values, rtol=0, atol=1e-6)


def test_subset_pre_activations(tokenizer, input_ids, sae):
    model = wrap(tiny_model("Qwen3ForCausalLM"), tokenizer)
    rows = encoder_rows(model, 2, sae, features=[0, 17, 255])
    with model.trace(input_ids):
        pre = remote.pre_activations(model, rows).save()
    h = hf_residuals(tiny_model("Qwen3ForCausalLM"), input_ids)[2]
    torch.testing.assert_close(pre, sae.encode_pre(h)[..., [0, 17, 255]], rtol=1e-5, atol=1e-5)


def test_splice_keeps_the_error_term(tokenizer, input_ids, sae):
    hf = tiny_model("Qwen3ForCausalLM")
    with torch.no_grad():
        plain = hf(input_ids).logits
    model = wrap(tiny_model("Qwen3ForCausalLM"), tokenizer)
    with model.trace(input_ids):
        codes = remote.splice(model, 2, sae).save()
        unedited = model.lm_head.output.save()
    torch.testing.assert_close(unedited, plain, rtol=0, atol=1e-5)  # reconstruction + error = the residual
    assert (codes != 0).sum(-1).max() <= sae.k

    def boost(z):
        z[..., 17] = 25.0
        return z

    def hook(module, args, out):
        z = sae.encode(out)
        return sae.decode(boost(z.clone())) + (out - sae.decode(z))

    handle = remote.layer_module(hf, 2).register_forward_hook(hook)
    with torch.no_grad():
        expected = hf(input_ids).logits
    handle.remove()
    with model.trace(input_ids):
        remote.splice(model, 2, sae, boost)
        edited = model.lm_head.output.save()
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-5)
    assert (edited - plain).abs().max() > 1e-2


def test_device_map_sharded_model(tokenizer, input_ids, tmp_path):
    """accelerate splits the model between CPU and disk offload (its hooks stream layers 1 and 3 in)."""
    checkpoint = save_checkpoint(tiny_model("Qwen3ForCausalLM"), tmp_path / "ckpt", tokenizer=tokenizer)
    shards = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
              "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    sharded = TransformersModel(
        str(checkpoint), task="text-generation", dispatch=True, device_map=shards,
        offload_folder=str(tmp_path / "offload"), dtype=torch.float32,
    )
    assert next(sharded._module.model.layers[1].parameters()).device.type == "meta"  # held on disk
    vector = 3 * torch.randn(64, generator=torch.Generator().manual_seed(6))
    push = steering(sharded, 1, vector=vector, positions=[-1])
    with sharded.trace(input_ids):
        got = nnsight.save(remote.apply(sharded, [push], read=range(N_LAYERS)))
    whole = wrap(tiny_model("Qwen3ForCausalLM"), tokenizer)
    with whole.trace(input_ids):
        expected = nnsight.save(remote.apply(whole, [push], read=range(N_LAYERS)))
    for n in range(N_LAYERS):
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-6)
    with sharded.generate(max_new_tokens=5, do_sample=False, pad_token_id=0) as tracer:
        with tracer.invoke(input_ids):
            remote.generate_steered(sharded, tracer, [push], 5)
        with tracer.invoke():
            ids = tracer.result.save()
    assert ids[0].tolist() == hf_steered_generate(tiny_model("Qwen3ForCausalLM"), input_ids, 1, vector, (-1,), 5)
