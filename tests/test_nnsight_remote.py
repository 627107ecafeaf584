"""The real remote path: nnsight's own RemoteBackend against a loopback NDIF (tests/mock_ndif.py).

The server runs each request in a worker process where sae_lens, transformer_lens and
qscope_plugins cannot be imported, so these tests pass only if everything a trace needs is
shipped with the request (``qscope_plugins.remote`` by value, plain tensors) and nothing else.
"""

from __future__ import annotations

import functools
import types

import nnsight
import numpy as np
import pytest
import torch
from mock_ndif import MockNDIF, model_key
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.modeling.transformers import TransformersModel
from nnsight.schema.config import CONFIG

from qscope_plugins import QwenScopeSAE, remote
from qscope_plugins.backends import Intervention
from qscope_plugins.backends.hf import HFBackend
from qscope_plugins.backends.nnsight import NNsightBackend
from qscope_plugins.integrations import nnsight as integration
from qscope_plugins.integrations.nnsight import RemoteRequestError
from qscope_plugins.nnsight_api import encoder_rows, steering
from qscope_plugins.testing.sae_files import random_sae_state
from qscope_plugins.testing.tiny_models import save_checkpoint, tiny_model, tiny_tokenizer

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def ndif():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CONFIG.APP, "REMOTE_LOGGING", False)  # no status spinner in test output
        with MockNDIF() as server:
            yield server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_model("Qwen3ForCausalLM"), tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def model(checkpoint):
    """The client's model, loaded here too so every remote result can be compared with a local run."""
    return TransformersModel(str(checkpoint), task="text-generation", dispatch=True)


@pytest.fixture
def to_ndif(ndif, checkpoint):
    return RemoteBackend(model_key(checkpoint), host=ndif.host)


@pytest.fixture(scope="module")
def sae():
    return QwenScopeSAE.from_weights(**random_sae_state(64, 256, seed=2), k=8, layer=2)


def test_remote_trace_equals_local(model, sae, to_ndif, ndif):
    push = steering(model, 1, sae=sae, features={7: 6.0, 40: -3.0}, positions=[0, -1])
    sent = len(ndif.received)
    with model.trace(PROMPT, backend=to_ndif):
        hidden = nnsight.save(remote.apply(model, [push], read=[0, 1, 3]))
        logits = model.lm_head.output.save()
    assert len(ndif.received) == sent + 1
    with model.trace(PROMPT):
        local_hidden = nnsight.save(remote.apply(model, [push], read=[0, 1, 3]))
        local_logits = model.lm_head.output.save()
    assert sorted(hidden) == [0, 1, 3]
    for n in hidden:
        torch.testing.assert_close(hidden[n], local_hidden[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, local_logits, rtol=0, atol=1e-6)


def test_remote_generation_equals_local(model, sae, to_ndif):
    push = steering(model, 2, sae=sae, features=[3, 9], positions=[-1])

    def run(**kwargs):
        with model.generate(max_new_tokens=6, do_sample=False, **kwargs) as tracer:
            with tracer.invoke(PROMPT):
                remote.generate_steered(model, tracer, [push], 6)
            with tracer.invoke():
                ids = tracer.result.save()
        return ids

    steered = run(backend=to_ndif)
    assert steered.tolist() == run().tolist()
    with model.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
        plain = tracer.result.save()
    assert steered.tolist() != plain.tolist()


def test_remote_residuals_are_encoded_locally_and_subset_pre_activations_travel(model, sae, to_ndif):
    rows = encoder_rows(model, 2, sae, features=[1, 50, 200])
    with model.trace(PROMPT, backend=to_ndif):
        h = remote.residual(model, 2).save()
        pre = remote.pre_activations(model, rows).save()
    with model.trace(PROMPT):
        local_codes = nnsight.save(remote.encode(model, 2, sae))
    codes = sae.encode_sparse(h)  # after download, here
    assert torch.equal(codes.indices, local_codes.indices)
    torch.testing.assert_close(codes.values, local_codes.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(pre, sae.encode_pre(h)[..., [1, 50, 200]], rtol=1e-5, atol=1e-5)


def test_server_has_no_sae_lens(model, to_ndif):
    with pytest.raises(RemoteError, match="ModuleNotFoundError: import of sae_lens halted"):
        with model.trace(PROMPT, backend=to_ndif):
            import sae_lens  # noqa: F401

            h = remote.residual(model, 0).save()


def test_full_sae_is_refused_before_anything_is_sent(model, sae, to_ndif, ndif):
    sent = len(ndif.received)
    with pytest.raises(RemoteRequestError, match="captures `sae`, a full SAE"):
        with model.trace(PROMPT, backend=to_ndif):
            codes = remote.encode(model, 2, sae).save()
    assert len(ndif.received) == sent


def test_local_simulation_equals_local(model, sae):
    push = steering(model, 1, sae=sae, features=[5], positions=None)
    with model.trace(PROMPT, remote="local"):
        simulated = nnsight.save(remote.apply(model, [push], read=[1, 2]))
    with model.trace(PROMPT):
        local = nnsight.save(remote.apply(model, [push], read=[1, 2]))
    for n in (1, 2):
        assert torch.equal(simulated[n], local[n])


def test_nnsight_backend_over_ndif_equals_hf_hooks(model, checkpoint, ndif):
    tokenizer = tiny_tokenizer()
    hf = HFBackend(tiny_model("Qwen3ForCausalLM"), tokenizer)
    over_ndif = NNsightBackend(model, tokenizer, nnsight_backend=RemoteBackend(model_key(checkpoint), host=ndif.host))
    g = torch.Generator().manual_seed(1)
    edits = [Intervention(1, vector=4 * torch.randn(64, generator=g), positions=(0, -1)),
             Intervention(3, vector=4 * torch.randn(64, generator=g), positions=())]
    prompts = ["hello world", "a longer prompt, padded", "hi"]
    expected = [g.token_ids for g in hf.generate(prompts, max_new_tokens=5, interventions=edits)]
    assert [g.token_ids for g in over_ndif.generate(prompts, max_new_tokens=5, interventions=edits)] == expected
    (local,) = hf.residuals(prompts, [1, 3], interventions=edits)
    (remote_batch,) = over_ndif.residuals(prompts, [1, 3], interventions=edits)
    for n in (1, 3):
        torch.testing.assert_close(remote_batch.tokens(n), local.tokens(n), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="runs only additive"):
        over_ndif.generate(prompts, max_new_tokens=2, interventions=[Intervention(1, fn=lambda h: 2 * h)])


# ---------------------------------------------------------------- the guard walks what nnsight serializes
class _Holder:
    def __init__(self, sae) -> None:
        self.sae = sae


_GLOBAL_FOR_HELPER: object = None


def _sae_routes(sae):
    """Each way a block can reach an SAE without naming it: (route, what the block captures)."""
    return {
        "lambda closure": lambda h: sae.encode(h),
        "bound method": sae.encode,
        "functools.partial": functools.partial(torch.matmul, other=sae.W_enc),
        "SimpleNamespace": types.SimpleNamespace(sae=sae),
        "object attribute": _Holder(sae),
    }


@pytest.mark.parametrize("route", ["lambda closure", "bound method", "functools.partial", "SimpleNamespace",
                                   "object attribute", "global read by a helper"])
def test_an_sae_reached_indirectly_is_refused_before_anything_is_sent(model, sae, to_ndif, ndif, route, monkeypatch):
    if route == "global read by a helper":
        monkeypatch.setitem(globals(), "_GLOBAL_FOR_HELPER", sae)

        def helper(h):  # nested, so nnsight ships it by source, with the globals it reads
            return _GLOBAL_FOR_HELPER.encode(h)

        via = helper
    else:
        via = _sae_routes(sae)[route]
    sent = len(ndif.received)
    with pytest.raises(RemoteRequestError, match=r"captures `via`, which holds (a full SAE \(QwenScopeSAE|a module "
                                                 r"parameter of shape \(64, 256\))"):
        with model.trace(PROMPT, backend=to_ndif):
            h = remote.residual(model, 2)
            out = (via(h) if callable(via) else via).save()
    assert len(ndif.received) == sent


def _trace_input_of(n_bytes: int) -> torch.Tensor:
    return torch.empty(1, n_bytes // 8 + 1, dtype=torch.long)  # never touched: costs no memory


@pytest.mark.parametrize("route", ["numpy array", "tensor in a namespace", "global read by a helper", "bytes",
                                   "trace input"])
def test_requests_over_128_mib_are_refused_before_anything_is_sent(model, to_ndif, ndif, route, monkeypatch):
    n = integration.MAX_REQUEST_BYTES + 4 * 2**20  # 132 MiB
    via = None
    prompt = PROMPT
    if route == "numpy array":
        via = np.zeros(n, dtype=np.uint8)
    elif route == "tensor in a namespace":
        via = types.SimpleNamespace(w=torch.empty(n // 4 + 1))
    elif route == "global read by a helper":
        monkeypatch.setitem(globals(), "_GLOBAL_FOR_HELPER", torch.empty(n // 4 + 1))

        def helper():
            return _GLOBAL_FOR_HELPER

        via = helper
    elif route == "bytes":
        via = bytes(n)
    else:
        prompt = {"input_ids": _trace_input_of(n)}
    sent = len(ndif.received)
    with pytest.raises(RemoteRequestError, match=r"(captures 13\d\.\d MiB of tensors \(limit 128\.0 MiB|"
                                                 r"larger than 128\.0 MiB once serialized)"):
        with model.trace(prompt, backend=to_ndif):
            h = remote.residual(model, 0).save()
            keep = via
    assert len(ndif.received) == sent


def test_small_requests_still_travel_and_report_their_size(model, to_ndif, ndif):
    small = types.SimpleNamespace(w=torch.ones(64))
    sent = len(ndif.received)
    with model.trace(PROMPT, backend=to_ndif):
        h = (remote.residual(model, 0) + small.w).save()
    assert len(ndif.received) == sent + 1
    assert len(ndif.received[-1]["blob"]) < 64 * 1024
    with model.trace(PROMPT):
        local = (remote.residual(model, 0) + small.w).save()
    torch.testing.assert_close(h, local, rtol=0, atol=1e-6)
