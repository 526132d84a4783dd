"""Contracts between the dense modules: the encoder the rest of ``dense/`` codes against, the searcher shape every
retriever in the project shares, and the errors raised when a dense artifact is missing or stale.

Kept free of torch and faiss imports so that anything can import it cheaply.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

Ranking = list[tuple[str, float]]
"""``[(pid, score), ...]``, best first (higher score is better)."""


@runtime_checkable
class TextEncoder(Protocol):
    """A bi-encoder: queries and passages may be encoded differently (prefixes, max lengths) into one space."""

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        ...

    def encode_queries(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 array of shape ``(len(texts), dim)``, row ``i`` for ``texts[i]``."""
        ...

    def encode_passages(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 array of shape ``(len(texts), dim)``, row ``i`` for ``texts[i]``."""
        ...


@runtime_checkable
class Searcher(Protocol):
    """The one search shape shared by BM25, dense, fused and reranked retrievers."""

    def search(self, query: str, k: int) -> Ranking: ...

    def batch_search(self, queries: list[str], k: int) -> list[Ranking]: ...


class ArtifactMismatchError(ValueError):
    """A saved dense artifact was built from other inputs (model, corpus, settings) than the caller expects."""


class IncompleteArtifactError(FileNotFoundError):
    """A dense artifact directory lacks a file or its final manifest (the stage never finished)."""


class EncodingResumeError(ValueError):
    """A partial corpus encoding cannot be resumed because the model, corpus or layout changed since it began."""


def check_queries(queries: object) -> list[str]:
    """``queries`` as a list; a single ``str`` (iterable, so it would be searched character by character) is a
    ``TypeError``. The one check every searcher's ``batch_search`` makes."""
    if isinstance(queries, (str, bytes)):
        raise TypeError("batch_search takes a list of queries, not one string; use search() for a single query")
    return list(queries)  # type: ignore[call-overload]
