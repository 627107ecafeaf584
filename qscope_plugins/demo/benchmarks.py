"""Synthetic benchmarks with planted topic overlap and redundancy, and a panel of synthetic models.

A benchmark item is the start of a language-A sentence, built from an *item seed* (a fixed choice
of verb, adjectives, nouns and preposition within one topic, and of where the item stops) with a
fresh name and number. A benchmark draws ``n_seeds`` item seeds from per-topic pools shared by all benchmarks,
and cycles through them for its ``n_items`` items. So:

* **redundancy** is planted by ``n_seeds``: few seeds means many near-duplicates, which add
  nothing to a model ranking (performance redundancy) and few new SAE features (footprint);
* **topic overlap** is planted by shared topics: benchmarks on the same topic draw from the same
  seed pool, and a narrow benchmark's topics can be a subset of a broad one's (like GSM8K / MATH).

The model panel plants skills: model ``m`` scores ``sigmoid(ability_m + skill_{m,t} +
affinity_{m,s} - difficulty_s + noise)`` on an item of seed ``s`` in topic ``t`` (an expected
accuracy, as when each item is sampled several times), with a small per-item noise. Items of one
seed therefore rank models alike, which is what makes near-duplicates redundant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lexicon import Lexicon


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    topics: tuple[int, ...]
    n_seeds: int


DEFAULT_SPECS = (  # redundancy planted in steps: more item seeds over more topics; topics overlap
    BenchmarkSpec("food-mini", (0,), 2),
    BenchmarkSpec("sport-mini", (1,), 3),
    BenchmarkSpec("food-lite", (0,), 4),
    BenchmarkSpec("weather-lite", (2,), 6),
    BenchmarkSpec("food-sport", (0, 1), 8),
    BenchmarkSpec("music-travel", (3, 4), 12),
    BenchmarkSpec("weather-money", (2, 5), 16),
    BenchmarkSpec("food-sport-weather", (0, 1, 2), 24),
    BenchmarkSpec("music-travel-money", (3, 4, 5), 32),
    BenchmarkSpec("four-topics", (0, 2, 3, 5), 48),
    BenchmarkSpec("five-topics", (0, 1, 2, 3, 4), 80),
    BenchmarkSpec("everything", (0, 1, 2, 3, 4, 5), 160),
)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmark suite and model panel; part of the build's configuration hash."""

    seed: int = 7
    n_items: int = 160
    seeds_per_topic: int = 48
    n_models: int = 24
    ability_sd: float = 0.2
    skill_sd: float = 0.3
    affinity_sd: float = 1.5
    difficulty_sd: float = 1.0
    item_noise: float = 0.5  # sd of the per-(model, item) logit noise around the seed's logit
    specs: tuple[BenchmarkSpec, ...] = DEFAULT_SPECS


@dataclass(frozen=True)
class Benchmark:
    name: str
    items: tuple[str, ...]
    seeds: np.ndarray  # global item-seed id of every item
    topics: np.ndarray  # topic of every item


@dataclass(frozen=True)
class Suite:
    benchmarks: tuple[Benchmark, ...]
    scores: dict[str, np.ndarray]  # name -> (n_models, n_items) per-item scores in (0, 1)


def _pick(rng: np.random.Generator, words) -> str:
    return words[int(rng.integers(len(words)))]


def build_suite(lex: Lexicon, cfg: BenchmarkConfig) -> Suite:
    """All benchmarks and the panel's per-item correctness, a pure function of ``cfg``."""
    rng = np.random.default_rng(cfg.seed)
    a, n_topics = lex.a, len(lex.a.nouns)
    templates = []  # global seed id = topic * seeds_per_topic + j
    for t in range(n_topics):
        for _ in range(cfg.seeds_per_topic):
            words = ["{name}", _pick(rng, a.verbs[t]), "{number}", _pick(rng, a.adjs[t]), _pick(rng, a.nouns[t]),
                     _pick(rng, a.preps), _pick(rng, a.adjs[t]), _pick(rng, a.nouns[t])]
            templates.append(" ".join(words[: int(rng.integers(4, len(words) + 1))]))
    n_seeds = len(templates)
    ability = rng.normal(0, cfg.ability_sd, (cfg.n_models, 1))
    skill = rng.normal(0, cfg.skill_sd, (cfg.n_models, n_topics))
    affinity = rng.normal(0, cfg.affinity_sd, (cfg.n_models, n_seeds))
    difficulty = rng.normal(0, cfg.difficulty_sd, n_seeds)
    seed_logit = ability + skill[:, np.arange(n_seeds) // cfg.seeds_per_topic] + affinity - difficulty
    benchmarks, scores = [], {}
    for spec in cfg.specs:
        per_topic = -(-spec.n_seeds // len(spec.topics))
        if per_topic > cfg.seeds_per_topic:
            raise ValueError(f"benchmark {spec.name}: {spec.n_seeds} seeds need more than "
                             f"{cfg.seeds_per_topic} per topic")
        pool = [t * cfg.seeds_per_topic + j for t in spec.topics
                for j in rng.choice(cfg.seeds_per_topic, per_topic, replace=False)]
        chosen = rng.permutation(pool)[: spec.n_seeds]
        seeds = chosen[np.arange(cfg.n_items) % spec.n_seeds]
        topics = seeds // cfg.seeds_per_topic
        items = tuple(templates[s].format(name=_pick(rng, lex.names), number=int(rng.integers(1, 100)))
                      for s in seeds)
        logit = seed_logit[:, seeds] + rng.normal(0, cfg.item_noise, (cfg.n_models, cfg.n_items))
        scores[spec.name] = 1 / (1 + np.exp(-logit))
        benchmarks.append(Benchmark(spec.name, items, seeds, topics))
    return Suite(tuple(benchmarks), scores)
