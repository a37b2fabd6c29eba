"""Per-category cache policy: similarity threshold, lifetime and quota, read from a TOML file; a nearest-
centroid classifier over each category's labelled examples; and thresholds learned from labelled pairs."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sharekv.cache.embedder import Embedder

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "semantic_cache.toml")


@dataclass
class CategoryPolicy:
    name: str
    threshold: float  # cosine a stored request needs to be served for a new one
    ttl_seconds: float
    quota: float  # share of max_entries this category may hold before its own entries are evicted first
    examples: list[str] = field(default_factory=list)


@dataclass
class CacheConfig:
    categories: dict[str, CategoryPolicy]
    default_category: str
    max_entries: int = 100_000
    contrast: bool = True
    synonym_similarity: float = 0.5

    @classmethod
    def load(cls, path: str | None = None) -> CacheConfig:
        with open(path or DEFAULT_CONFIG, "rb") as f:
            raw = tomllib.load(f)
        try:
            categories = {name: CategoryPolicy(name, float(c["threshold"]), float(c.get("ttl_seconds", math.inf)),
                                               float(c.get("quota", 1.0)), list(c.get("examples", [])))
                          for name, c in raw["categories"].items()}
        except KeyError as e:
            raise ValueError(f"{path or DEFAULT_CONFIG}: every category needs a {e.args[0]!r}") from e
        default = raw.get("default_category", next(iter(categories)))
        if default not in categories:
            raise ValueError(f"default_category {default!r} is not one of the categories {sorted(categories)}")
        for c in categories.values():
            if not -1 <= c.threshold <= 1 or c.ttl_seconds <= 0 or not 0 < c.quota <= 1:
                raise ValueError(f"category {c.name!r}: threshold must be a cosine in [-1, 1], ttl_seconds > 0, "
                                 "quota in (0, 1]")
        contrast = raw.get("contrast", {})
        return cls(categories, default, int(raw.get("max_entries", 100_000)), bool(contrast.get("enabled", True)),
                   float(contrast.get("synonym_similarity", 0.5)))

    def policy(self, category: str) -> CategoryPolicy:
        return self.categories.get(category, self.categories[self.default_category])


class CategoryClassifier:
    """Nearest centroid: the category whose examples' mean embedding is closest. Categories without examples
    are only reached by name."""

    def __init__(self, config: CacheConfig, embedder: Embedder) -> None:
        self.names, centroids = [], []
        for c in config.categories.values():
            if c.examples:
                mean = embedder.embed(c.examples).mean(axis=0)
                centroids.append(mean / np.linalg.norm(mean))
                self.names.append(c.name)
        self.centroids = np.stack(centroids) if centroids else np.zeros((0, embedder.dim), np.float32)
        self.default = config.default_category

    def classify(self, vector: np.ndarray) -> str:
        if not self.names:
            return self.default
        return self.names[int(np.argmax(self.centroids @ vector))]


def best_threshold(scores: np.ndarray, same: np.ndarray, max_false_hit: float, floor: float = -1.0) -> float:
    """The lowest threshold (most should-hit pairs served), never below `floor`, whose
    false-hit rate on the traps stays within `max_false_hit`. `scores` are the similarities at which each
    pair would be served (-inf where the contrast check refuses it); `same` marks the should-hit pairs."""
    candidates = np.unique(scores[np.isfinite(scores) & (scores >= floor)])
    traps = scores[~same]
    best = 1.0 + 1e-6  # serves nothing
    for t in candidates[::-1]:  # high to low: false hits only grow
        if len(traps) and float(np.mean(traps >= t)) > max_false_hit:
            break
        best = float(t)
    return best


def learn_thresholds(scores: np.ndarray, same: np.ndarray, categories: Sequence[str], max_false_hit: float,
                     floor: float = -1.0, min_pairs: int = 30) -> dict[str, float]:
    """Each category's threshold by `best_threshold` on its own pairs, when it has at least `min_pairs`
    should-hit pairs and as many traps (fewer make a noisy threshold); the others take the threshold
    learned on all pairs, under the key "*"."""
    categories = np.asarray(categories)
    learned = {"*": best_threshold(scores, same, max_false_hit, floor)}
    for name in np.unique(categories):
        mask = categories == name
        if (same[mask]).sum() >= min_pairs and (~same[mask]).sum() >= min_pairs:
            learned[str(name)] = best_threshold(scores[mask], same[mask], max_false_hit, floor)
    return learned
