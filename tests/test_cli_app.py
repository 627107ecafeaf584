"""``qscope app`` as a command: it serves on 127.0.0.1 from the CLI, and fails cleanly without its extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from _nano_explorer import index_dir

from qscope_plugins.cli import main


def test_app_without_gradio_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import fails as when the extra is not installed
    assert main(["app"]) == 1  # a missing extra is a runtime error (exit 1), not a wrong command line
    assert capsys.readouterr().err.strip() == "qscope app: error: the app needs Gradio: pip install 'qscope-plugins[app]'"


def test_cli_app_serves_on_localhost(tmp_path):
    """The real command in its own process, on the nnsight backend: nnsight mounts ``save`` on ``object``,
    which breaks anyio's lazily imported classes under Gradio's server unless ``app._compat`` preloads them."""
    pytest.importorskip("gradio")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "qscope_plugins", "app", "--backend", "nnsight", "--layers", "2-3", "--index",
                             str(index_dir()), "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    banner = f"qscope app: serving on http://127.0.0.1:{port}"
    try:
        deadline, page = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, "".join(lines) if proc.poll() is not None else "no answer"
        assert "qscope explorer" in page
        config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read())
        assert {"text", "compare", "steer", "feature", "monitor"} <= {d.get("api_name") for d in config["dependencies"]}
        assert not (tmp_path / "cache").exists()  # --index given: nothing built in the cache
        # Gradio answers requests before launch() returns to the line that prints the banner: wait for it.
        while time.monotonic() < deadline and proc.poll() is None and not any(banner in line for line in lines):
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    assert any(banner in line for line in lines), "".join(lines)


def test_nano_app_builds_its_index_once_in_the_cache(tmp_path, monkeypatch):
    from _nano_explorer import nano

    from qscope_plugins.cli import _explorer, app
    from qscope_plugins.recipes.feature_index import FeatureIndex

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(_explorer, "DEMO_DOCS", 16)  # a small demo corpus keeps the test fast
    backend, saes, _ = nano()
    first = app._nano_index(backend, {3: saes[3]})
    assert first == tmp_path / "qscope" / "nano-index-layers3"
    stamp = (first / "layer3.npz").stat().st_mtime_ns
    assert app._nano_index(backend, {3: saes[3]}) == first  # reused, not rebuilt
    assert (first / "layer3.npz").stat().st_mtime_ns == stamp
    assert FeatureIndex.open(first).config.n_docs == 16
