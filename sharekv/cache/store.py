"""The cache's entries in SQLite: they survive a restart, and the index is rebuilt from them at start."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    tenant TEXT NOT NULL,
    category TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    embedding BLOB NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_exact ON entries (namespace, text_hash);
CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires);
CREATE INDEX IF NOT EXISTS entries_category_used ON entries (category, last_used);
CREATE INDEX IF NOT EXISTS entries_tenant ON entries (tenant);
"""


@dataclass
class Entry:
    id: int
    namespace: str
    tenant: str
    category: str
    text_hash: str
    request: str
    response: str  # JSON: the choices
    created: float
    expires: float
    hits: int
    last_used: float


_COLUMNS = "id, namespace, tenant, category, text_hash, request, response, created, expires, hits, last_used"


class EntryStore:
    """One SQLite file (or ":memory:"); every call holds a lock, so the server's threads can share it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A cache: after a power cut losing the last few hits or answers is fine; an fsync per lookup is not.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, namespace: str, tenant: str, category: str, text_hash: str, request: str, response: str,
               embedding: np.ndarray, now: float, expires: float) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO entries (namespace, tenant, category, text_hash, request, response, embedding, "
                "created, expires, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (namespace, tenant, category, text_hash, request, response,
                 embedding.astype(np.float32).tobytes(), now, expires, now))
            return int(cur.lastrowid)

    def get(self, entry_id: int) -> Entry | None:
        return self.get_many([entry_id]).get(entry_id)

    def get_many(self, entry_ids: list[int]) -> dict[int, Entry]:
        if not entry_ids:
            return {}
        marks = ",".join("?" * len(entry_ids))
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id IN ({marks})", entry_ids).fetchall()
        return {row[0]: Entry(*row) for row in rows}

    def exact(self, namespace: str, text_hash: str, now: float) -> Entry | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE namespace = ? AND text_hash = ? AND "
                                   "expires > ? ORDER BY id DESC LIMIT 1", (namespace, text_hash, now)).fetchone()
        return Entry(*row) if row else None

    def touch(self, entry_id: int, now: float) -> None:
        with self._lock:
            self._db.execute("UPDATE entries SET hits = hits + 1, last_used = ? WHERE id = ?", (now, entry_id))

    def delete(self, where: str, args: tuple) -> list[tuple[str, int]]:
        """Removes the entries matching `where`; returns their (namespace, id)."""
        with self._lock:
            gone = self._db.execute(f"SELECT namespace, id FROM entries WHERE {where}", args).fetchall()
            self._db.execute(f"DELETE FROM entries WHERE {where}", args)
        return [(ns, int(i)) for ns, i in gone]

    def count(self, category: str | None = None) -> int:
        with self._lock:
            if category is None:
                return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM entries WHERE category = ?", (category,)).fetchone()[0]

    def least_recently_used(self, category: str | None, limit: int) -> list[int]:
        with self._lock:
            if category is None:
                rows = self._db.execute("SELECT id FROM entries ORDER BY last_used, id LIMIT ?", (limit,))
            else:
                rows = self._db.execute("SELECT id FROM entries WHERE category = ? ORDER BY last_used, id LIMIT ?",
                                        (category, limit))
            return [int(r[0]) for r in rows.fetchall()]

    def vectors(self, now: float) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(namespace, ids, vectors) of every live entry, namespace by namespace: the index at start."""
        with self._lock:
            rows = self._db.execute("SELECT namespace, id, embedding FROM entries WHERE expires > ? "
                                    "ORDER BY namespace, id", (now,)).fetchall()
        for namespace, group in itertools.groupby(rows, key=lambda row: row[0]):
            group = list(group)
            yield (namespace, np.array([r[1] for r in group], dtype=np.int64),
                   np.stack([np.frombuffer(r[2], dtype=np.float32) for r in group]))

    def bulk_insert(self, rows: list[tuple]) -> None:
        """Rows of (namespace, tenant, category, text_hash, request, response, embedding bytes, created,
        expires, last_used), in one transaction (the latency benchmark fills 100K entries)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO entries (namespace, tenant, category, text_hash, request, response, embedding, "
                "created, expires, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
