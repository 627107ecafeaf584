"""Shared fixtures: no network, an offline hub cache, and one Qwen-Scope layer file at its real size."""

import socket

import pytest
import torch

from qscope_plugins.catalog import get_group
from qscope_plugins.testing.sae_files import make_fake_hub_repo, random_sae_state

REAL_RELEASE = "qwen-scope-3-1.7b-base-w32k-l50"

# The suite runs tiny models, where intra-op threading costs more than it saves (and a shared
# 2-core CI machine makes it far worse); benchmarks, not tests, measure threaded speed.
torch.set_num_threads(1)


def use_offline_cache(monkeypatch, cache) -> None:
    """Point huggingface_hub at ``cache`` with downloads disabled (env for subprocesses too)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection raises (use with ``pytest.mark.usefixtures("no_network")``)."""

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache with downloads disabled; returns its directory."""
    cache = tmp_path / "hub"
    cache.mkdir()
    use_offline_cache(monkeypatch, cache)
    return cache


@pytest.fixture(scope="session")
def real_group():
    return get_group(REAL_RELEASE)


@pytest.fixture(scope="session")
def real_size_hub(tmp_path_factory):
    """A hub cache holding layer 0 of Qwen3-1.7B-Base W32K L0_50 at its released shape (~537 MB)."""
    cache = tmp_path_factory.mktemp("real_hub")
    group = get_group(REAL_RELEASE)
    make_fake_hub_repo(cache, group.repo_id, {0: random_sae_state(group.d_model, group.d_sae, seed=3)})
    return cache


@pytest.fixture
def real_hub_offline(real_size_hub, monkeypatch):
    use_offline_cache(monkeypatch, real_size_hub)
    return real_size_hub
