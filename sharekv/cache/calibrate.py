"""The learned-threshold mode: thresholds picked from labelled pairs (a stored request, a new one, and whether
one answer is right for both) to serve the most should-hit pairs under a false-hit budget.

Pairs are split in halves by a hash of their id; thresholds are learned on one half and every figure is
reported on the other. Unrelated pairs (each stored request against another pair's new request) set a floor:
no threshold may serve more than 0.5% of them, so traps made only of near misses cannot pull a threshold
down to where unrelated questions clear it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sharekv.cache.contrast import ContrastCheck
from sharekv.cache.embedder import SentenceTransformerEmbedder
from sharekv.cache.policy import CacheConfig, CategoryClassifier, CategoryPolicy, best_threshold, learn_thresholds
from sharekv.cache.semantic import SemanticCache

UNRELATED_BUDGET = 0.005
PAIR_KEY = {"model": "pairs", "endpoint": "/v1/chat/completions", "params": {}, "context": None}
_ANSWER = {"choices": [{"index": 0, "text": "cached", "token_ids": [], "finish_reason": "stop", "stop_reason": None}]}


def split_halves(ids: Sequence[str]) -> tuple[list[int], list[int]]:
    """Indices of the calibration half and the report half, by a hash of each id: the same split in every
    run, whatever the order of the data."""
    calibration, report = [], []
    for i, pair_id in enumerate(ids):
        (calibration if hashlib.sha256(pair_id.encode()).digest()[0] % 2 == 0 else report).append(i)
    return calibration, report


@dataclass
class Pairs:
    ids: list[str]
    groups: np.ndarray  # a label per pair for the report (fow-cache's category, "unrelated", ...)
    cached: list[str]
    new: list[str]
    same: np.ndarray  # one answer is right for both
    unrelated: np.ndarray  # made by pairing a stored request with another pair's new one

    @classmethod
    def of(cls, items: list[dict], seed: int = 0) -> Pairs:
        """Items of {id, a, b, same_answer, [category]}, plus as many unrelated pairs (a derangement)."""
        n = len(items)
        shift = np.random.default_rng(seed).permutation(n)
        partner = {int(shift[k]): int(shift[(k + 1) % n]) for k in range(n)}  # one cycle: nobody meets itself
        ids = [str(i.get("id", k)) for k, i in enumerate(items)]
        groups = [i.get("ambiguous") or i.get("category") or ("should_hit" if i["same_answer"] else "trap")
                  for i in items]
        return cls(ids + [f"unrelated:{ids[k]}" for k in range(n)], np.array(groups + ["unrelated"] * n),
                   [i["a"] for i in items] * 2, [i["b"] for i in items] + [items[partner[k]]["b"] for k in range(n)],
                   np.array([bool(i["same_answer"]) for i in items] + [False] * n),
                   np.array([False] * n + [True] * n))

    @classmethod
    def load_jsonl(cls, path: str) -> Pairs:
        with open(path) as f:
            return cls.of([json.loads(line) for line in f if line.strip()])

    @classmethod
    def fow_cache(cls, limit: int | None = None) -> Pairs:
        """fow-cache's 600 single-question pairs (data CC BY 4.0), or `limit` of them spread evenly over its
        categories (for quick runs)."""
        from fow_cache import load_questions

        items = load_questions()
        if limit is not None and limit < len(items):
            items = items[:: -(-len(items) // limit)][:limit]
        return cls.of(items)


def pair_scores(pairs: Pairs, embedder: SentenceTransformerEmbedder, config: CacheConfig) -> dict:
    """What the cache computes for each pair: cosine, the contrast check's verdict, and the category of the
    stored request."""
    a, b = embedder.embed(pairs.cached), embedder.embed(pairs.new)
    contrast = ContrastCheck(embedder.word_vectors, config.synonym_similarity)
    classifier = CategoryClassifier(config, embedder)
    return {"cosine": np.sum(a * b, axis=1),
            "contrast": [contrast.find(x, y) for x, y in zip(pairs.cached, pairs.new, strict=True)],
            "category": np.array([classifier.classify(v) for v in a])}


def learned_configs(pairs: Pairs, scores: dict, calibration: list[int], base: CacheConfig,
                    budget: float) -> dict[str, CacheConfig]:
    """Three settings learned on the calibration half under `budget` (false hits on the labelled traps):
    one global threshold on similarity alone; one global threshold with the contrast check; and a
    threshold per category with the contrast check (the category-aware policy)."""
    cal = np.array(calibration)
    labelled, unrelated = cal[~pairs.unrelated[cal]], cal[pairs.unrelated[cal]]
    cosine = scores["cosine"]
    guarded = np.where([v is None for v in scores["contrast"]], cosine, -np.inf)

    def floor(values: np.ndarray) -> float:
        return float(np.quantile(values[unrelated], 1 - UNRELATED_BUDGET)) if len(unrelated) else -1.0

    same = pairs.same[labelled]
    plain = best_threshold(cosine[labelled], same, budget, floor(cosine))
    guarded_t = best_threshold(guarded[labelled], same, budget, floor(guarded))
    per_category = learn_thresholds(guarded[labelled], same, scores["category"][labelled], budget, floor(guarded))

    def single(threshold: float, contrast: bool) -> CacheConfig:
        return CacheConfig({"all": CategoryPolicy("all", threshold, base.policy(base.default_category).ttl_seconds,
                                                  1.0)}, "all", base.max_entries, contrast, base.synonym_similarity)

    categories = {name: CategoryPolicy(name, per_category.get(name, per_category["*"]), c.ttl_seconds, c.quota,
                                       c.examples) for name, c in base.categories.items()}
    return {"global threshold": single(plain, False), "global threshold + contrast": single(guarded_t, True),
            "category-aware + contrast": CacheConfig(categories, base.default_category, base.max_entries, True,
                                                     base.synonym_similarity)}


def serve_pairs(pairs: Pairs, indices: list[int], embedder: SentenceTransformerEmbedder,
                config: CacheConfig) -> tuple[np.ndarray, int]:
    """Each pair through the real cache: store the first request, look up the second. Returns whether each
    was served, and how many lookups of a stored request's very text from another tenant were served (must
    be 0). Every pair is its own tenant, so no pair ever sees another's entry."""
    cache = SemanticCache(":memory:", embedder, config)
    served, cross_tenant = [], 0
    for i in indices:
        tenant = f"pair:{pairs.ids[i]}"
        cache.insert(cache.probe(tenant, PAIR_KEY, pairs.cached[i]), _ANSWER)
        served.append(cache.probe(tenant, PAIR_KEY, pairs.new[i]).hit is not None)
        cross_tenant += cache.probe(f"other:{pairs.ids[i]}", PAIR_KEY, pairs.cached[i]).hit is not None
    cache.close()
    return np.array(served), cross_tenant


def calibrate(pairs: Pairs, embedder: SentenceTransformerEmbedder, base: CacheConfig,
              budget: float) -> tuple[CacheConfig, dict]:
    """The category-aware policy learned on the calibration half, and its figures on the report half."""
    calibration, report = split_halves(pairs.ids)
    config = learned_configs(pairs, pair_scores(pairs, embedder, base), calibration, base,
                             budget)["category-aware + contrast"]
    served, cross_tenant = serve_pairs(pairs, report, embedder, config)
    return config, rates(pairs, report, served) | {"cross_tenant_hits": cross_tenant,
                                                   "calibration_pairs": len(calibration), "report_pairs": len(report)}


def rates(pairs: Pairs, indices: list[int], served: np.ndarray) -> dict:
    """Should-hit pairs served, labelled traps served (false hits), unrelated pairs served, precision on the
    labelled pairs, and the served share per group."""
    idx = np.array(indices)
    same, unrelated, groups = pairs.same[idx], pairs.unrelated[idx], pairs.groups[idx]
    traps = ~same & ~unrelated
    labelled_served = served & ~unrelated
    return {"should_hit_served": float(np.mean(served[same])), "false_hit_rate": float(np.mean(served[traps])),
            "unrelated_served": float(np.mean(served[unrelated])) if unrelated.any() else None,
            "precision": int(np.sum(served & same)) / max(1, int(np.sum(labelled_served))),
            "by_group": {str(g): float(np.mean(served[groups == g])) for g in dict.fromkeys(groups)}}


def write_config(config: CacheConfig, path: str) -> None:
    """A config file `CacheConfig.load` reads back (tomllib has no writer; the structure is flat)."""
    lines = [f'default_category = "{config.default_category}"', f"max_entries = {config.max_entries}", "",
             "[contrast]", f"enabled = {str(config.contrast).lower()}",
             f"synonym_similarity = {config.synonym_similarity}"]
    for c in config.categories.values():
        lines += ["", f"[categories.{c.name}]", f"threshold = {c.threshold:.6f}", f"ttl_seconds = {c.ttl_seconds:g}",
                  f"quota = {c.quota:g}", f"examples = {json.dumps(c.examples, ensure_ascii=False)}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
