"""Auto-interpretation of SAE features (Qwen-Scope report section 3.2; the Delphi pipeline's recipe).

An explainer LLM reads a feature's top-activating contexts (activating tokens marked ``<<like this>>``,
with their activations) and a few random contexts where it is silent, and writes a short
description. The description is then scored by **detection**: the same LLM, given only the
explanation, says for each held-out context (activating ones from every activation quantile, and
non-activating ones) whether the feature fires in it; the score is the balanced accuracy.

The explainer is anything with ``complete(prompt) -> str``: :class:`OpenAICompatible` (any
``/v1/chat/completions`` server the user runs: vLLM, TGI, Ollama, ...) or :class:`LocalTransformers`
(a local ``transformers`` causal LM). Results are stored with provenance (explainer, prompt version,
the contexts used) as ``<index>/explanations/layer{n}/{feature}.json``, atomically.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from .feature_index import FeatureIndex
from .feature_pages import Context, feature_page, random_contexts
from .._io import write_json

PROMPT_VERSION = "qscope-explain-1"

EXPLAIN = """You are interpreting one feature of a sparse autoencoder on a language model.
Below are text excerpts where the feature activates. Tokens where it is active are marked <<like this>>, \
with the activation in brackets. Then come excerpts where it is not active at all.

Active excerpts:
{active}

Inactive excerpts:
{inactive}

In one short sentence, say what the feature detects. Answer with the sentence only."""

DETECT = """A feature of a language model is described as: "{explanation}"

Does the feature activate anywhere in this excerpt?

{text}

Answer with one word: Yes or No."""


class Explainer(Protocol):
    name: str

    def complete(self, prompt: str) -> str: ...


@dataclass
class OpenAICompatible:
    """An OpenAI-compatible chat endpoint, e.g. ``http://127.0.0.1:8000/v1`` (vLLM, TGI, Ollama).

    The API key, if the server wants one, is read from ``api_key_env`` (never stored).
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_tokens: int = 128

    @property
    def name(self) -> str:
        return f"openai-compatible:{self.model}@{self.base_url}"

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = json.loads(response.read())
        except urllib.error.URLError as err:
            raise RuntimeError(f"explainer endpoint {url} failed: {err}") from err
        try:
            return str(data["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"explainer endpoint {url} returned no choices[0].message.content") from None


class LocalTransformers:
    """A local ``transformers`` causal LM (hub id or directory), greedy, with its chat template if any."""

    def __init__(self, model: str, device: str = "cpu", max_new_tokens: int = 64) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"transformers:{model}"
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def complete(self, prompt: str) -> str:
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = self.model.generate(ids.to(self.device), max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def render(context: Context, page, marks: bool = True) -> str:
    """A context as text; with ``marks``, active tokens as ``<<token>>(activation)``."""
    parts = []
    for text, act in zip(page.text(context.token_ids), context.acts):
        parts.append(f"<<{text}>>({act:.1f})" if marks and act > 0 and text else text)
    return "".join(parts)


def _yes(answer: str) -> bool:
    word = re.findall(r"[a-z]+", answer.lower())
    return bool(word) and word[0] in ("yes", "true", "1")


def explain_feature(index: FeatureIndex, layer: int, feature: int, explainer: Explainer, *,
                    n_explain: int = 10, n_random: int = 5, n_detect: int = 10, seed: int = 0,
                    save: bool = True) -> dict:
    """Explain and score one feature; the stored record (also returned).

    Explanation contexts: the top ``n_explain`` (one per document) and ``n_random`` silent ones.
    Detection: ``n_detect`` held-out activating contexts drawn across the activation quantiles
    (from documents not shown to the explainer) and ``n_detect`` silent ones, balanced accuracy.
    """
    page = feature_page(index, layer, feature, n_top=n_explain, n_quantiles=n_detect, per_quantile=1, seed=seed)
    if not page.top:
        raise ValueError(f"feature {feature} at layer {layer} never activates in the indexed corpus")
    shown_docs = {c.doc for c in page.top}
    silent = random_contexts(index, layer, feature, n_random + n_detect, seed=seed)
    shown_silent, held_silent = silent[:n_random], silent[n_random:]
    held_active = [c for q in page.quantiles for c in q["contexts"] if c.doc not in shown_docs][:n_detect]
    prompt = EXPLAIN.format(active="\n".join(f"- {render(c, page)}" for c in page.top),
                            inactive="\n".join(f"- {render(c, page)}" for c in shown_silent))
    started = time.time()
    lines = explainer.complete(prompt).strip().splitlines()
    explanation = lines[0].strip() if lines else ""
    if not explanation:
        raise RuntimeError(f"the explainer returned an empty explanation for layer {layer} feature {feature}")
    answers = []
    for label, ctx in [(1, c) for c in held_active] + [(0, c) for c in held_silent]:
        said = _yes(explainer.complete(DETECT.format(explanation=explanation, text=render(ctx, page, False))))
        answers.append((label, said))
    score = detection_score(answers)
    record = {
        "layer": layer, "feature": feature, "explanation": explanation, "explainer": explainer.name,
        "prompt_version": PROMPT_VERSION, "score": score, "seconds": round(time.time() - started, 3),
        "contexts": {
            "explain_active": [_ref(c) for c in page.top], "explain_silent": [_ref(c) for c in shown_silent],
            "detect_active": [_ref(c) for c in held_active], "detect_silent": [_ref(c) for c in held_silent],
        },
        "index": {"model": index.config.model, "sae_source": index.config.sae_source,
                  "data_hash": index.config.data_hash},
    }
    if save:
        path = index.explanation_path(layer, feature)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record, ensure_ascii=False)
    return record


def _ref(c: Context) -> dict:
    return {"doc": c.doc, "start": c.start, "length": len(c.token_ids), "peak": c.peak}


def detection_score(answers: list[tuple[int, bool]]) -> dict:
    """Balanced accuracy of yes/no answers on ``(label, said_yes)`` pairs (labels 1 = activating)."""
    pos = [said for label, said in answers if label == 1]
    neg = [said for label, said in answers if label == 0]
    tpr = sum(pos) / len(pos) if pos else float("nan")
    tnr = sum(not s for s in neg) / len(neg) if neg else float("nan")
    return {"balanced_accuracy": (tpr + tnr) / 2, "true_positive_rate": tpr, "true_negative_rate": tnr,
            "n_active": len(pos), "n_silent": len(neg)}
