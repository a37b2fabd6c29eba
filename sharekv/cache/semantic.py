"""The semantic response cache: exact match first, then the nearest stored requests of the same namespace,
served when the best one clears its category's threshold and shows no contrast with the new request.

A namespace is everything that must be equal for a stored answer to be right at all: the tenant (never mixed
into the embedded text), the model, the endpoint, the sampling parameters and, when only the last user
message is embedded, the conversation before it. Each namespace has its own index, so another tenant's
entries are never candidates.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sharekv.cache.contrast import ContrastCheck
from sharekv.cache.embedder import Embedder
from sharekv.cache.index import NamespaceIndex
from sharekv.cache.policy import CacheConfig, CategoryClassifier
from sharekv.cache.store import Entry, EntryStore

CANDIDATES = 8  # nearest entries looked at; the first that clears its threshold and the contrast check wins


def normalized(text: str) -> str:
    """The exact-match form: case and runs of whitespace do not matter."""
    return re.sub(r"\s+", " ", text.strip().lower())


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class CacheHit:
    entry_id: int
    similarity: float  # 1.0 for an exact match
    category: str
    exact: bool
    response: dict


@dataclass
class Probe:
    """A lookup's result, kept so that storing the answer after a miss needs no second embedding."""

    tenant: str
    namespace: str
    text: str
    text_hash: str
    category: str | None  # given by the request, or found by the classifier when it embedded
    vector: np.ndarray | None
    hit: CacheHit | None = None


@dataclass
class LookupRecord:
    outcome: str  # "exact" | "semantic" | "miss"
    seconds: float
    embed_seconds: float  # of `seconds`, spent in the embedder: the request, and new words the contrast
    # check looked up (0 for an exact match)
    similarity: float | None  # of the served entry, or of the nearest one on a miss


@dataclass
class CacheStats:
    """Totals the metrics mirror (lookups by outcome are counted by the listeners)."""

    contrast_refusals: int = 0
    evictions: dict[str, int] = field(default_factory=lambda: {"ttl": 0, "quota": 0, "capacity": 0,
                                                              "invalidated": 0})


class SemanticCache:
    def __init__(self, path: str, embedder: Embedder, config: CacheConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or CacheConfig.load()
        self.embedder = embedder
        self.clock = clock
        self.store = EntryStore(path)
        self.index = NamespaceIndex(embedder.dim)
        self.classifier = CategoryClassifier(self.config, embedder)
        self.contrast = (ContrastCheck(embedder.word_vectors, self.config.synonym_similarity)
                         if self.config.contrast else None)
        self.stats = CacheStats()
        self._floor = min(c.threshold for c in self.config.categories.values())  # nothing below is ever served
        self.listeners: list[Callable[[LookupRecord], None]] = []
        self._lock = threading.RLock()
        self.purge_expired()
        for namespace, ids, vectors in self.store.vectors(self.clock()):
            self.index.add_many(namespace, ids, vectors)

    @staticmethod
    def namespace(tenant: str, key: dict) -> str:
        return _digest({"tenant": tenant, "key": key})

    def __len__(self) -> int:
        return self.store.count()

    def probe(self, tenant: str, key: dict, text: str, category: str | None = None) -> Probe:
        """Looks the request up; `probe.hit` is the answer to serve, or None."""
        start = time.perf_counter()
        spent = self.embedder.seconds_spent
        embedded_before = spent()
        namespace = self.namespace(tenant, key)
        probe = Probe(tenant, namespace, text, _digest(normalized(text)), category, None)
        now = self.clock()
        exact = self.store.exact(namespace, probe.text_hash, now)
        if exact is not None:
            probe.hit = self._serve(exact, 1.0, True, now)
            self._record(LookupRecord("exact", time.perf_counter() - start, 0.0, 1.0))
            return probe
        probe.vector = self.embedder.embed([text])[0]
        if probe.category is None:
            probe.category = self.classifier.classify(probe.vector)
        nearest, refused = None, False
        with self._lock:
            candidates = self.index.search(namespace, probe.vector, CANDIDATES, self._floor)
        entries = self.store.get_many([entry_id for entry_id, _ in candidates])
        for entry_id, similarity in candidates:
            nearest = similarity if nearest is None else nearest
            entry = entries.get(entry_id)
            if entry is None:
                continue
            if entry.expires <= now:
                self._drop("id = ?", (entry.id,), "ttl")
                continue
            if similarity < self.config.policy(entry.category).threshold:
                continue
            if self.contrast is not None and self.contrast.find(entry.request, text) is not None:
                refused = True
                continue
            probe.hit = self._serve(entry, similarity, False, now)
            self._record(LookupRecord("semantic", time.perf_counter() - start, spent() - embedded_before, similarity))
            return probe
        if refused:
            self.stats.contrast_refusals += 1
        self._record(LookupRecord("miss", time.perf_counter() - start, spent() - embedded_before, nearest))
        return probe

    def _serve(self, entry: Entry, similarity: float, exact: bool, now: float) -> CacheHit:
        self.store.touch(entry.id, now)
        return CacheHit(entry.id, similarity, entry.category, exact, json.loads(entry.response))

    def _record(self, record: LookupRecord) -> None:
        for listener in self.listeners:
            listener(record)

    def insert(self, probe: Probe, response: dict) -> int:
        """Stores the answer to a probed request that missed."""
        if probe.vector is None:
            probe.vector = self.embedder.embed([probe.text])[0]
        category = probe.category or self.classifier.classify(probe.vector)
        policy = self.config.policy(category)
        now = self.clock()
        with self._lock:
            self.purge_expired()
            self._make_room(policy.name, policy.quota)
            entry_id = self.store.insert(probe.namespace, probe.tenant, policy.name, probe.text_hash, probe.text,
                                         json.dumps(response, ensure_ascii=False), probe.vector, now,
                                         now + policy.ttl_seconds)
            self.index.add(probe.namespace, entry_id, probe.vector)
        return entry_id

    def _make_room(self, category: str, quota: float) -> None:
        limit = self.config.max_entries
        over_quota = self.store.count(category) - int(quota * limit) + 1
        if over_quota > 0:
            self._drop_ids(self.store.least_recently_used(category, over_quota), "quota")
        over = self.store.count() - limit + 1
        if over > 0:
            self._drop_ids(self.store.least_recently_used(None, over), "capacity")

    def _drop_ids(self, ids: list[int], reason: str) -> None:
        if ids:
            self._drop(f"id IN ({','.join('?' * len(ids))})", tuple(ids), reason)

    def _drop(self, where: str, args: tuple, reason: str) -> int:
        """Deletes the entries matching `where` from the store and the index; counts them under `reason`."""
        with self._lock:
            by_namespace: dict[str, list[int]] = {}
            for namespace, entry_id in self.store.delete(where, args):
                by_namespace.setdefault(namespace, []).append(entry_id)
            for namespace, ids in by_namespace.items():
                self.index.remove(namespace, ids)
        removed = sum(len(ids) for ids in by_namespace.values())
        self.stats.evictions[reason] += removed
        return removed

    def purge_expired(self) -> int:
        return self._drop("expires <= ?", (self.clock(),), "ttl")

    def invalidate(self, entry_id: int | None = None, tenant: str | None = None, category: str | None = None) -> int:
        """Removes the entries matching every given field (at least one); returns how many."""
        clauses = [(c, v) for c, v in (("id", entry_id), ("tenant", tenant), ("category", category)) if v is not None]
        if not clauses:
            raise ValueError("invalidate by id, tenant or category (at least one)")
        return self._drop(" AND ".join(f"{c} = ?" for c, _ in clauses), tuple(v for _, v in clauses), "invalidated")

    def close(self) -> None:
        self.store.close()
