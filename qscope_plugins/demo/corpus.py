"""Synthetic documents with known ground truth: language, topic, code-switches and toxicity.

A document has one main topic and is written in language A or B. In A documents a sentence may
open with a *cue* word ("zoqu , ..."); the rest of that sentence is then in B with a probability
that depends on the topic (high for the first half of the topics, low for the rest), so a model
trained on this text switches under greedy decoding after a cue in some topics and not in others,
and has to read the topic from context to decide. The first word after the cue is always a shared
name, so the decision is taken on a token both languages use. Toxic documents put toxic adjectives
(of the sentence's language) in some adjective slots; no clean document contains one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .lexicon import Language, Lexicon


@dataclass(frozen=True)
class CorpusConfig:
    """How documents are drawn; every field is part of the build's configuration hash."""

    lexicon_seed: int = 1234
    p_doc_b: float = 0.3  # share of documents written in B
    min_sentences: int = 3
    max_sentences: int = 8
    p_stray_topic: float = 0.15  # a sentence about another topic than the document's
    p_long: float = 0.5  # a sentence gets a prepositional phrase
    p_cue: float = 0.2  # an A sentence (not the first) opens with a cue word
    switch_high: float = 0.85  # P(switch | cue) for the first half of the topics
    switch_low: float = 0.1  # ... and for the second half
    p_toxic_doc: float = 0.06
    p_toxic_adj: float = 0.5  # in a toxic document, an adjective slot holds a toxic word

    def switch_prob(self, topic: int, n_topics: int) -> float:
        return self.switch_high if topic < n_topics // 2 else self.switch_low


@dataclass(frozen=True)
class Document:
    """One document and its ground truth."""

    text: str
    lang: str  # "A" or "B": the language the document is written in
    topic: int
    toxic: bool
    switches: int  # sentences of an A document written in B after a cue
    toxic_words: int


def _pick(rng: np.random.Generator, words) -> str:
    return words[int(rng.integers(len(words)))]


class CorpusGenerator:
    """Draws documents and evaluation sets from a lexicon; pure function of (config, seed)."""

    def __init__(self, lexicon: Lexicon, config: CorpusConfig) -> None:
        self.lex = lexicon
        self.cfg = config
        self.n_topics = len(lexicon.a.nouns)

    # -- sentences ---------------------------------------------------------------------------
    def sentence(self, rng: np.random.Generator, lang: str, topic: int, toxic: bool) -> tuple[str, int]:
        """One sentence and its number of toxic words; A is SVO with spaces, B is SOV without."""
        L: Language = self.lex.language(lang)
        n_toxic = 0

        def adj() -> str:
            nonlocal n_toxic
            if toxic and rng.random() < self.cfg.p_toxic_adj:
                n_toxic += 1
                return _pick(rng, L.toxic)
            return _pick(rng, L.adjs[topic])

        name, number = _pick(rng, self.lex.names), str(int(rng.integers(1, 100)))
        verb, first = _pick(rng, L.verbs[topic]), adj() + " " * (lang == "A") + _pick(rng, L.nouns[topic])
        extra = ""
        if rng.random() < self.cfg.p_long:
            other = adj() + " " * (lang == "A") + _pick(rng, L.nouns[topic])
            extra = f" {_pick(rng, L.preps)} {other}" if lang == "A" else other + _pick(rng, L.preps)
        if lang == "A":
            return f"{name} {verb} {number} {first}{extra} .", n_toxic
        return f"{name} {_pick(rng, L.particles)} {number} {_pick(rng, L.counters)}{first}{extra}{verb} .", n_toxic

    def _sentence_topic(self, rng: np.random.Generator, topic: int) -> int:
        return int(rng.integers(self.n_topics)) if rng.random() < self.cfg.p_stray_topic else topic

    # -- documents ---------------------------------------------------------------------------
    def document(self, rng: np.random.Generator, *, lang: str | None = None, topic: int | None = None,
                 toxic: bool | None = None, cues: bool = True) -> Document:
        """One document; unset attributes are drawn. ``cues=False`` gives monolingual text."""
        cfg = self.cfg
        lang = lang or ("B" if rng.random() < cfg.p_doc_b else "A")
        topic = int(rng.integers(self.n_topics)) if topic is None else topic
        toxic = bool(rng.random() < cfg.p_toxic_doc) if toxic is None else toxic
        n = int(rng.integers(cfg.min_sentences, cfg.max_sentences + 1))
        while True:  # a toxic document must contain at least one toxic word
            parts, switches, n_toxic = [], 0, 0
            for i in range(n):
                t, prefix, written = self._sentence_topic(rng, topic), "", lang
                if lang == "A" and cues and i > 0 and rng.random() < cfg.p_cue:
                    switched = rng.random() < cfg.switch_prob(t, self.n_topics)
                    switches += switched
                    prefix, written = f"{_pick(rng, self.lex.a.cues)} , ", "B" if switched else "A"
                text, toxic_words = self.sentence(rng, written, t, toxic)
                parts.append(prefix + text)
                n_toxic += toxic_words
            if n_toxic or not toxic:
                return Document(" ".join(parts), lang, topic, toxic, switches, n_toxic)

    def documents(self, seed: int, n: int, **kwargs) -> list[Document]:
        rng = np.random.default_rng(seed)
        return [self.document(rng, **kwargs) for _ in range(n)]

    def stream(self, seed: int) -> Iterator[Document]:
        """An endless stream of training documents."""
        rng = np.random.default_rng(seed)
        while True:
            yield self.document(rng)

    # -- evaluation sets ---------------------------------------------------------------------
    def switch_prompts(self, seed: int, n: int) -> list[tuple[str, int]]:
        """``(prompt, topic)``: monolingual clean A text ending in a cue, balanced over topics.

        The model's continuation decides whether it switches into B; the ground-truth switch
        probability is :meth:`CorpusConfig.switch_prob` of the topic.
        """
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            topic = i % self.n_topics
            prefix = self.document(rng, lang="A", topic=topic, toxic=False, cues=False).text
            sentences = prefix.split(" . ")[: int(rng.integers(1, 4))]
            out.append((" . ".join(sentences).rstrip(" .") + f" . {_pick(rng, self.lex.a.cues)} ,", topic))
        return out

    def toxicity_set(self, seed: int, n_per_class: int) -> list[Document]:
        """Balanced toxic / clean documents in both languages, in alternating order."""
        rng = np.random.default_rng(seed)
        return [self.document(rng, toxic=bool(i % 2)) for i in range(2 * n_per_class)]
