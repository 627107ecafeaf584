"""Issue 18 item 3: the full SAE and a feature subset satisfy one protocol, in one orientation."""

import pytest
import torch

from qscope_plugins.sae import FeatureSubset, QwenScopeSAE, SparseAutoencoder, load_feature_subset, load_sae
from qscope_plugins.sae.convert import convert
from qscope_plugins.testing.sae_files import random_sae_state, write_released_layer

D_MODEL, D_SAE, K = 24, 256, 6
IDS = [200, 3, 77, 150]


@pytest.fixture(scope="module", params=["released", "converted"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_released_layer(root / "src", 1, random_sae_state(D_MODEL, D_SAE, seed=5))
    source = root / "src"
    if request.param == "converted":
        convert(str(source), root / "conv", [1], k=K)
        source = root / "conv" / "layer1"
    return load_sae(source, 1, k=K), load_feature_subset(source, 1, IDS, k=K)


def test_both_types_satisfy_the_protocol_in_the_same_orientation(pair):
    full, subset = pair
    assert isinstance(full, QwenScopeSAE) and isinstance(subset, FeatureSubset)
    for sae, n in ((full, D_SAE), (subset, len(IDS))):
        assert isinstance(sae, SparseAutoencoder)
        assert (sae.d_in, sae.d_sae, sae.k) == (D_MODEL, D_SAE, K)
        assert tuple(sae.W_enc.shape) == (D_MODEL, n) and tuple(sae.W_dec.shape) == (n, D_MODEL)
        assert tuple(sae.b_enc.shape) == (n,) and tuple(sae.b_dec.shape) == (D_MODEL,)
        assert sae.metadata["sae_source"] and "qwen_scope_group" in sae.metadata
    assert full.complete and not subset.complete
    assert not isinstance(object(), SparseAutoencoder)
    # the subset's columns / rows are the full SAE's at those ids
    torch.testing.assert_close(subset.W_enc, full.W_enc.detach()[:, IDS], rtol=0, atol=0)
    torch.testing.assert_close(subset.W_dec, full.W_dec.detach()[IDS], rtol=0, atol=0)
    torch.testing.assert_close(subset.b_enc, full.b_enc.detach()[IDS], rtol=0, atol=0)


def test_subset_encode_and_decode_equal_the_full_sae_restricted_to_its_ids(pair):
    full, subset = pair
    x = torch.randn(5, 7, D_MODEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(subset.encode_pre(x), full.encode_pre(x)[..., IDS], rtol=1e-6, atol=1e-6)
        values = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(1))
        indices = torch.tensor(IDS[1:])[torch.randperm(3)].expand(5, 7, 3)
        torch.testing.assert_close(subset.decode_sparse(values, indices), full.decode_sparse(values, indices),
                                   rtol=1e-5, atol=1e-6)
    for method in ("directions", "encoder_rows"):
        mine, theirs = getattr(subset, method)([150, 3]), getattr(full, method)([150, 3])
        for a, b in zip(mine if method == "encoder_rows" else (mine,), theirs if method == "encoder_rows" else (theirs,)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="needs every encoder row"):
        subset.encode_sparse(x)
    with pytest.raises(KeyError, match=r"feature 4 was not loaded \(loaded: \[200, 3, 77, 150\]\)"):
        subset.decode_sparse(values[..., :1], torch.full((5, 7, 1), 4))
    with pytest.raises(KeyError, match="feature 5 was not loaded"):
        subset.encoder_rows([5])
