"""``hybrid.Retriever``: BM25 + dense candidates merged by the learned fusion model (or an ablation mode).

The mode's composition of searchers (:mod:`hybrid.searchers`: BM25, dense, fused, reranked) and the passage store are
built once in ``__init__``; ``search`` checks its arguments, makes one call to that searcher and attaches the texts.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dense.interfaces import check_queries
from hybrid.artifacts import ArtifactError, artifacts_dir, require_stage, stage_dir
from hybrid.searchers import MODES, RerankSettings, Searcher, build_searcher
from sparse.bm25 import MAX_QUERY_CHARS

logger = logging.getLogger(__name__)

Ranking = list[tuple[str, float]]


@dataclass(frozen=True)
class Result:
    """One retrieved passage: MS MARCO passage id, its text, and a score comparable within the query."""

    document_id: str
    document_text: str
    score: float


def _check_query(query: object) -> str:
    """The query every mode searches: cut at ``MAX_QUERY_CHARS`` characters, as BM25 cuts it anyway, so the dense
    encoder and the reranker do not tokenize megabytes to keep their first 32 tokens."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty or whitespace only; pass the text to search for")
    query = query[:MAX_QUERY_CHARS]
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: neither Lucene nor the tokenizers accept it
        raise ValueError(f"query is not valid Unicode text ({e.reason} at character {e.start}); "
                         "decode the bytes it came from with errors='replace'") from None
    return query


def _check_queries(queries: object) -> list[str]:
    return [_check_query(q) for q in check_queries(queries)]


def _check_k(k: object) -> int:
    """``k`` as a plain int; any integer type is accepted (e.g. numpy's), floats and bools are not."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


class Retriever:
    """Search the MS MARCO passages indexed by the pipeline.

    ``mode``: ``hybrid`` (learned logistic-regression fusion of BM25 and dense candidates), ``rerank`` (hybrid,
    then its top few reordered by SmolLM2 query likelihood within a time budget; only when the pipeline's
    ``rerank`` stage enabled it), ``sparse`` (BM25 only), ``dense`` (bi-encoder only), ``rrf`` (reciprocal rank
    fusion) or ``convex`` (min-max convex combination with the weight tuned on train queries). ``None`` (default):
    ``rerank`` when the config made it the default (``rerank.default``), else ``hybrid``.
    ``artifacts_dir``: where the pipeline wrote its artifacts (default: env ``HYBRID_ARTIFACTS`` or
    ``<repo>/artifacts``); it may be copied or moved as a whole. Passage texts are read from the collection the
    ``data`` stage indexed; if that has moved, ``$MSMARCO_DIR`` names its new directory.

    ``searcher`` is the mode's composed searcher (``(pid, score)`` rankings); the answer to ``search(q, k)`` is the
    first ``k`` of one ranking per query, whatever ``k`` is (up to the candidates a mode has), except where the
    ``rerank`` mode's time budget binds: then how many candidates are reordered depends on the time each call measures.
    """

    def __init__(self, mode: str | None = None, artifacts_dir: str | Path | None = None) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        self.root = _resolve(artifacts_dir)
        rerank = RerankSettings.read(self.root)
        self.mode = mode if mode is not None else ("rerank" if rerank.config.default else "hybrid")
        self.config = require_stage(self.root, "data").get("config", {})  # the pipeline config that built it

        self.passages = _open_passages(self.root)
        self.searcher: Searcher = build_searcher(self.mode, self.root, self.passages.get_many, rerank)

    def rank(self, query: str, k: int) -> Ranking:
        """``(pid, score)`` best first, without passage texts (what evaluation needs)."""
        return self.searcher.search(_check_query(query), _check_k(k))

    def batch_rank(self, queries: Sequence[str], k: int) -> list[Ranking]:
        """:meth:`rank` for a list of queries."""
        queries = _check_queries(queries)
        k = _check_k(k)
        return self.searcher.batch_search(queries, k) if queries else []

    def _results(self, ranking: Ranking) -> list[Result]:
        texts = self.passages.get_many([pid for pid, _ in ranking])
        return [Result(pid, text, float(score)) for (pid, score), text in zip(ranking, texts)]

    def search(self, query: str, k: int = 10) -> list[Result]:
        """Top-``k`` passages for ``query``, best first (fewer if the mode has fewer candidates than ``k``)."""
        return self._results(self.rank(query, k))

    def batch_search(self, queries: Sequence[str], k: int = 10) -> list[list[Result]]:
        """:meth:`search` for a list of queries at once (batched encoding and Lucene threads)."""
        return [self._results(r) for r in self.batch_rank(queries, k)]

    def close(self) -> None:
        """Release the searchers' threads and index handles; the retriever is unusable afterwards."""
        close = getattr(self.searcher, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"Retriever(mode={self.mode!r}, artifacts_dir={str(self.root)!r})"


def _open_passages(root: Path):
    """The data stage's passage store. Its texts are read from the collection it was built from; when that file is
    gone (the data directory moved, or the artifacts were copied to another machine) and ``$MSMARCO_DIR`` holds a
    ``collection.tsv``, that one is read instead, after the store's size and content checks accept it."""
    from hybrid.passage_store import PassageStore

    store_dir = stage_dir(root, "data")
    try:
        return PassageStore.open(store_dir)
    except FileNotFoundError as missing:
        moved = Path(os.environ.get("MSMARCO_DIR", "")) / "collection.tsv"
        if not os.environ.get("MSMARCO_DIR") or not moved.is_file():
            raise FileNotFoundError(f"{missing} Or set MSMARCO_DIR to the data directory that holds it now.") from None
        logger.info("passage texts: the recorded collection is gone; reading %s (MSMARCO_DIR)", moved)
        return PassageStore.open(store_dir, collection_tsv=moved)


def _resolve(path: str | Path | None) -> Path:
    root = artifacts_dir(path)
    if not root.exists():
        raise ArtifactError(
            f"artifact directory {root} does not exist; run the pipeline first "
            "(`make run`, or `python scripts/run_pipeline.py --config configs/cpu-marco43k.toml`) "
            "or pass artifacts_dir= / set HYBRID_ARTIFACTS"
        )
    return root
