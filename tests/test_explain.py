"""``qscope explain`` against a loopback OpenAI-compatible endpoint that the test starts itself."""

from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from _nano_explorer import LANGUAGE_FEATURE, index_dir

from qscope_plugins.cli import main
from qscope_plugins.recipes.explain import PROMPT_VERSION, OpenAICompatible, detection_score, explain_feature
from qscope_plugins.recipes.feature_index import FeatureIndex
from qscope_plugins.recipes.feature_pages import feature_page

CJK = re.compile(r"[\u3400-\u9fff]")


class FakeLLM(BaseHTTPRequestHandler):
    """Explains every feature as the B language, and detects it by the presence of a CJK character
    (``always_yes``: answers Yes to everything, a useless explanation's detector)."""

    always_yes = False
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        prompt = body["messages"][0]["content"]
        if "In one short sentence" in prompt:
            answer = "Text written in language B (CJK ideographs)."
        else:
            excerpt = prompt.split("excerpt?", 1)[1]
            answer = "Yes" if self.always_yes or CJK.search(excerpt) else "No"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    FakeLLM.requests, FakeLLM.always_yes = [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture
def index(tmp_path):
    """A private copy of the shared index (explanations are written into it)."""
    shutil.copytree(index_dir(), tmp_path / "index")
    return FeatureIndex.open(tmp_path / "index")


def test_explanation_is_scored_and_stored_with_provenance(endpoint, index):
    layer, feature = LANGUAGE_FEATURE
    explainer = OpenAICompatible(endpoint, "fake-llm")
    record = explain_feature(index, layer, feature, explainer, n_explain=6, n_random=3, n_detect=8)
    assert record["explanation"] == "Text written in language B (CJK ideographs)."
    score = record["score"]
    assert score["n_active"] == 8 and score["n_silent"] == 8
    assert score["balanced_accuracy"] >= 0.75  # the language feature fires in B text, silent windows are mostly A
    assert record["prompt_version"] == PROMPT_VERSION and record["explainer"] == f"openai-compatible:fake-llm@{endpoint}"
    used = record["contexts"]
    assert len(used["explain_active"]) == 6 and len(used["explain_silent"]) == 3
    shown = {c["doc"] for c in used["explain_active"]}
    assert not shown & {c["doc"] for c in used["detect_active"]}  # held-out documents only
    paths = {path for path, _ in FakeLLM.requests}
    assert paths == {"/v1/chat/completions"} and len(FakeLLM.requests) == 1 + 16
    explain_prompt = FakeLLM.requests[0][1]
    assert explain_prompt["model"] == "fake-llm" and "<<" in explain_prompt["messages"][0]["content"]
    stored = json.loads(index.explanation_path(layer, feature).read_text())
    assert stored == record
    page = feature_page(index, layer, feature)
    assert page.explanation["explanation"] == record["explanation"]


def test_a_detector_that_always_says_yes_scores_one_half(endpoint, index):
    FakeLLM.always_yes = True
    layer, feature = LANGUAGE_FEATURE
    record = explain_feature(index, layer, feature, OpenAICompatible(endpoint, "fake"), n_detect=5, save=False)
    assert record["score"]["balanced_accuracy"] == 0.5
    assert not index.explanation_path(layer, feature).exists()
    assert detection_score([(1, True), (1, False), (0, False), (0, False)])["balanced_accuracy"] == 0.75


def test_cli_explain_then_dashboard_shows_it(endpoint, index, tmp_path, capsys):
    layer, feature = LANGUAGE_FEATURE
    directory = str(index.directory)
    args = ["explain", "--index", directory, "--features", f"{layer}:{feature}", "--explainer", endpoint,
            "--explainer-model", "fake", "--n-detect", "4", "--json"]
    assert main(args) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["feature"] == feature and line["explanation"].startswith("Text written in language B")
    n = len(FakeLLM.requests)
    assert main(args + ["--skip-done"]) == 0 and len(FakeLLM.requests) == n
    assert main(["dashboard", "--index", directory, "--features", f"{layer}:{feature}", "--output-dir",
                 str(tmp_path / "dash")]) == 0
    assert "Text written in language B" in (tmp_path / "dash" / f"layer{layer}" / f"feature{feature}.html").read_text()
    assert main(["explain", "--index", directory, "--features", f"{layer}:1", "--explainer", endpoint]) == 2
    assert "--explainer-model is required" in capsys.readouterr().err


def test_unreachable_endpoint_is_one_error_line(index, capsys):
    layer, feature = LANGUAGE_FEATURE
    # a port nothing listens on (bound, then closed)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["explain", "--index", str(index.directory), "--features", f"{layer}:{feature}",
               "--explainer", f"http://127.0.0.1:{port}/v1", "--explainer-model", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith(f"qscope explain: error: layer {layer} feature {feature}: explainer endpoint")
    assert len(err.splitlines()) == 1
    assert not index.explanation_path(layer, feature).exists()


def test_local_transformers_explainer_is_greedy_generation_of_the_prompt():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qscope_plugins.demo.assets import ASSETS, MODEL_DIR
    from qscope_plugins.recipes.explain import LocalTransformers

    path = str(ASSETS / MODEL_DIR)
    explainer = LocalTransformers(path, max_new_tokens=6)
    prompt = "Duki zepi 91 zanfar ginrer . virbuna ,"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert explainer.complete(prompt) == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() != ""
    assert explainer.name == f"transformers:{path}"
