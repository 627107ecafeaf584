"""Synthetic documents with known ground truth: language, topic, code-switches and toxicity.

A document has one main topic and is written in language A or B. In an A document a sentence may
open with a *cue* word and a comma ("zoqu , ..."); in documents about the first half of the topics
the document then switches to B for good, with high probability, and in the other half it almost
never does. A model trained on this text therefore switches under greedy decoding after a cue in
some topics and not in others, and must read the topic from context to decide. Names, digits and
punctuation are shared by both languages, and the tokens right after a cue (the comma, a name) are
shared ones, so "the text is now in B" has to be a state of the residual stream on shared tokens
(a language *feature*), not a property of the current token.

Toxic documents put toxic adjectives (of the sentence's language) in some adjective slots and end
a sentence holding one with "!" (clean documents use "!" only rarely), so toxicity is also
visible on a token both languages share. No clean document contains a toxic word.
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
    p_long: float = 0.5  # a sentence gets a comma and a prepositional phrase
    p_cue: float = 0.2  # an A sentence (not the first) opens with a cue word
    switch_high: float = 0.9  # P(switch | cue) in documents about the first half of the topics
    switch_low: float = 0.05  # ... and about the second half
    p_toxic_doc: float = 0.08
    p_toxic_adj: float = 0.5  # in a toxic document, an adjective slot holds a toxic word
    p_exclaim: float = 0.03  # a sentence without a toxic word ends with "!"

    def switch_prob(self, topic: int, n_topics: int) -> float:
        return self.switch_high if topic < n_topics // 2 else self.switch_low


@dataclass(frozen=True)
class Document:
    """One document and its ground truth."""

    text: str
    lang: str  # "A" or "B": the language the document starts in
    topic: int
    toxic: bool
    switched: bool  # an A document that switched to B after a cue
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

        sep = " " if lang == "A" else ""
        name, number, verb = _pick(rng, self.lex.names), str(int(rng.integers(1, 100))), _pick(rng, L.verbs[topic])
        first = adj() + sep + _pick(rng, L.nouns[topic])
        extra = ""
        if rng.random() < self.cfg.p_long:
            other = adj() + sep + _pick(rng, L.nouns[topic])
            extra = f" , {_pick(rng, L.preps)} {other}" if lang == "A" else f" , {other}{_pick(rng, L.preps)}"
        end = "!" if n_toxic or rng.random() < self.cfg.p_exclaim else "."
        if lang == "A":
            return f"{name} {verb} {number} {first}{extra} {end}", n_toxic
        return f"{name} {_pick(rng, L.particles)} {number} {_pick(rng, L.counters)}{first}{extra}{verb} {end}", n_toxic

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
            parts, current, n_toxic = [], lang, 0
            for i in range(n):
                prefix = ""
                if current == "A" and cues and i > 0 and rng.random() < cfg.p_cue:
                    prefix = f"{_pick(rng, self.lex.a.cues)} , "
                    if rng.random() < cfg.switch_prob(topic, self.n_topics):
                        current = "B"
                text, toxic_words = self.sentence(rng, current, self._sentence_topic(rng, topic), toxic)
                parts.append(prefix + text)
                n_toxic += toxic_words
            if n_toxic or not toxic:
                return Document(" ".join(parts), lang, topic, toxic, current != lang, n_toxic)

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
        """``(prompt, topic)``: monolingual clean A text ending in a cue and its comma.

        Topics are balanced; the ground-truth switch probability after the cue is
        :meth:`CorpusConfig.switch_prob` of the topic, and the model's continuation shows whether
        it switches into B.
        """
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            topic = i % self.n_topics
            sentences = [self.sentence(rng, "A", self._sentence_topic(rng, topic), False)[0]
                         for _ in range(int(rng.integers(1, 4)))]
            out.append((" ".join(sentences) + f" {_pick(rng, self.lex.a.cues)} ,", topic))
        return out

    def toxicity_set(self, seed: int, n_per_class: int) -> list[Document]:
        """Balanced toxic / clean documents in both languages, in alternating order."""
        rng = np.random.default_rng(seed)
        return [self.document(rng, toxic=bool(i % 2)) for i in range(2 * n_per_class)]
