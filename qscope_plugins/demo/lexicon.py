"""The two invented languages of the nano corpus, drawn from a seed.

Language ``A`` is written in Latin letters with spaces (SVO); language ``B`` in CJK ideographs
without spaces between words (SOV), like Chinese. Both share names, digits and punctuation, so a
model cannot tell the language from those tokens alone: "which language am I writing" has to be
carried in the residual stream, which is what makes a *language feature* worth finding.

Every topic has word-for-word translations (noun ``i`` of topic ``t`` in A means noun ``i`` of
topic ``t`` in B), so topic features can be shared across scripts. Two small closed classes carry
the planted ground truth: *cue* words (A only; "in other words") that usually announce a switch
into B, and *toxic* adjectives (both languages) that mark toxic documents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

TOPICS = ("food", "sport", "weather", "music", "travel", "money")
"""Human-readable topic labels (the words themselves are invented)."""

CJK = re.compile(r"[\u4e00-\u9fff]")
"""Any character of language B's script (the CJK Unified Ideographs block)."""

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "", "n", "r", "s"]
_CJK_FIRST, _CJK_LAST = 0x4E00, 0x9FA5


@dataclass(frozen=True)
class Language:
    """One language's words; content words are indexed ``[topic][i]`` and aligned across languages."""

    name: str
    nouns: tuple[tuple[str, ...], ...]
    verbs: tuple[tuple[str, ...], ...]
    adjs: tuple[tuple[str, ...], ...]
    preps: tuple[str, ...]
    toxic: tuple[str, ...]
    particles: tuple[str, ...] = ()  # B: topic particles after the subject name
    counters: tuple[str, ...] = ()  # B: measure words after a number
    cues: tuple[str, ...] = ()  # A: discourse markers that announce a switch into B


@dataclass(frozen=True)
class Lexicon:
    """Both languages plus the vocabulary they share."""

    a: Language
    b: Language
    names: tuple[str, ...]

    def language(self, code: str) -> Language:
        return {"A": self.a, "B": self.b}[code]


class _Words:
    """Draws unique words from a seeded generator (a word is never reused across classes).

    B words are built from a small pool of ideographs, as Chinese words are compounds of common
    characters; a small pool also keeps each character a single token for a small BPE vocabulary.
    """

    def __init__(self, rng: np.random.Generator, cjk_pool: int) -> None:
        self.rng = rng
        self.used: set[str] = set()
        codes = rng.choice(_CJK_LAST - _CJK_FIRST + 1, size=cjk_pool, replace=False) + _CJK_FIRST
        self.pool = [chr(int(c)) for c in codes]

    def _unique(self, make) -> str:
        while True:
            word = make()
            if word not in self.used:
                self.used.add(word)
                return word

    def latin(self, syllables: int) -> str:
        def make() -> str:
            return "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                for _ in range(syllables)
            )

        return self._unique(make)

    def cjk(self, chars: int) -> str:
        return self._unique(lambda: "".join(self.rng.choice(self.pool) for _ in range(chars)))

    def many(self, n: int, make, *args) -> tuple[str, ...]:
        return tuple(make(*args) for _ in range(n))

    def classes(self, make, n_topics: int, per_topic: dict[str, tuple[int, int]],
                shared: dict[str, tuple[int, int]]) -> dict[str, tuple]:
        """``{class: words}`` drawn in the order given: ``per_topic`` classes get ``n_topics`` tuples of
        ``count`` words, ``shared`` classes one tuple; ``(count, length)`` sizes each class's words."""
        out: dict[str, tuple] = {
            name: tuple(self.many(count, make, length) for _ in range(n_topics))
            for name, (count, length) in per_topic.items()
        }
        out.update({name: self.many(count, make, length) for name, (count, length) in shared.items()})
        return out


def build_lexicon(seed: int, *, n_topics: int = len(TOPICS), nouns: int = 10, verbs: int = 5, adjs: int = 5,
                  names: int = 12, cues: int = 3, toxic: int = 3, cjk_pool: int = 96) -> Lexicon:
    """Draw both languages' vocabularies; the same seed always gives the same words."""
    words = _Words(np.random.default_rng(seed), cjk_pool)
    a = Language("A", **words.classes(
        words.latin, n_topics, {"nouns": (nouns, 2), "verbs": (verbs, 2), "adjs": (adjs, 2)},
        {"preps": (3, 1), "toxic": (toxic, 2), "cues": (cues, 3)},
    ))
    b = Language("B", **words.classes(
        words.cjk, n_topics, {"nouns": (nouns, 2), "verbs": (verbs, 1), "adjs": (adjs, 1)},
        {"preps": (3, 1), "toxic": (toxic, 2), "particles": (4, 1), "counters": (3, 1)},
    ))
    shared = tuple(w.capitalize() for w in words.many(names, words.latin, 2))
    return Lexicon(a, b, shared)
