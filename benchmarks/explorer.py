"""Feature explorer speed on the nano model (issue 19, item 5): index, feature pages, the app's tabs.

    python benchmarks/explorer.py              # CPU; pin to 2 cores with: taskset -c 0,1 python ...
    python benchmarks/explorer.py --threads 1  # torch intra-op threads (a loaded shared machine: 1 is faster)

Targets on 2 CPU cores: the index of the nano SAEs (all 4 layers) over the demo corpus in < 60 s;
a feature page from the index in < 0.5 s; the first response of each app tab < 2 s after the app is
up. Side by side with the index it times a bare residual capture of the same corpus (the floor any
index pays), and the page is timed cold (index opened, layer loaded) and warm. The tabs are called
through Gradio's HTTP API with ``gradio_client`` (as the browser does), each tab's first call after
launch. Prints one JSON object with the machine, versions and ratios to the targets.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qscope_plugins.cli._explorer import DEMO_DATA, load_corpus  # noqa: E402
from qscope_plugins.demo.assets import ASSETS, MODEL_DIR, SAE_DIR, corpus_generator, read_manifest  # noqa: E402


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from qscope_plugins.backends import load_backend
    from qscope_plugins.recipes.feature_index import FeatureIndex, build_index
    from qscope_plugins.recipes.feature_pages import feature_page
    from qscope_plugins.sae import load_sae

    k = int(read_manifest()["sae"]["k"])
    backend = load_backend(str(ASSETS / MODEL_DIR))
    saes = {n: load_sae(ASSETS / SAE_DIR, n, k=k) for n in range(4)}
    texts, described = load_corpus(DEMO_DATA, "nano")
    out: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                            f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}",
                 "versions": {"python": platform.python_version(), "torch": torch.__version__}, "corpus": described}

    start = time.perf_counter()
    tokens = 0
    for rb in backend.residuals(texts, list(saes), batch_size=16):
        tokens += int(rb.mask.sum())
    capture_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_index(backend, saes, texts, Path(tmp) / "index", model="nano", sae_source="nano")
        index_s = time.perf_counter() - start
        out["index"] = {"seconds": round(index_s, 2), "target_s": 60, "ratio_to_target": round(index_s / 60, 3),
                        "tokens": tokens, "bare_capture_s": round(capture_s, 2),
                        "index_over_capture": round(index_s / capture_s, 2),
                        "bytes": sum(p.stat().st_size for p in (Path(tmp) / "index").iterdir())}

        start = time.perf_counter()
        index = FeatureIndex.open(Path(tmp) / "index")
        feature_page(index, 3, 459)
        cold = time.perf_counter() - start
        warm = []
        for f in range(0, 512, 8):
            start = time.perf_counter()
            feature_page(index, 3, f)
            warm.append(time.perf_counter() - start)
        out["feature_page"] = {"cold_s": round(cold, 4), "warm_median_s": round(statistics.median(warm), 4),
                               "warm_max_s": round(max(warm), 4), "target_s": 0.5,
                               "ratio_to_target_cold": round(cold / 0.5, 3)}
        out["app"] = _tabs(backend, saes, k, index)
    print(json.dumps(out, indent=1))


def _tabs(backend, saes, k, index) -> dict:
    import socket

    from gradio_client import Client

    from qscope_plugins.app.explorer import Explorer
    from qscope_plugins.app.gradio_app import launch
    from qscope_plugins.recipes.classifier import FeatureClassifier

    gen = corpus_generator()
    b_text = gen.documents(900, 2, lang="B", toxic=False, cues=False)[1].text
    a_text = gen.documents(901, 1, lang="A", toxic=False, cues=False)[0].text
    prompt = gen.switch_prompts(902, 1)[0][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    explorer = Explorer(backend, saes, model=str(ASSETS / MODEL_DIR), sae=str(ASSETS / SAE_DIR), k=k, index=index)
    start = time.perf_counter()
    demo = launch(explorer, port=port, block=False)
    up = time.perf_counter() - start
    layers = [str(n) for n in sorted(saes)]
    with tempfile.TemporaryDirectory() as tmp:
        clf = Path(tmp) / "language.json"
        FeatureClassifier((459,), (3,), 512).save(clf)
        calls = {
            "text": ((b_text, layers, 5, False, True), "/text"),
            "compare": ((False, b_text, a_text, layers, 5, True, False, False, False), "/compare"),
            "steer": ((prompt, "3", "459", "Custom", 0.0, "all", True, "clamp", 40), "/steer"),
            "feature": (("3", 459), "/feature"),
            "monitor": ((str(clf), b_text), "/monitor"),
        }
        try:
            start = time.perf_counter()
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            connect = time.perf_counter() - start
            first = {}
            for name, (args, api) in calls.items():
                start = time.perf_counter()
                client.predict(*args, api_name=api)
                first[name] = round(time.perf_counter() - start, 3)
        finally:
            demo.close()
    return {"launch_s": round(up, 2), "client_connect_s": round(connect, 3), "first_response_s": first,
            "target_s": 2.0, "max_ratio_to_target": round(max(first.values()) / 2.0, 3),
            "steer_note": "Steer generates 40 greedy tokens twice (baseline and steered)"}


if __name__ == "__main__":
    main()
