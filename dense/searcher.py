"""Dense retrieval: encode the query, search the faiss index, map row ids back to pids."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dense.corpus_encoding import PIDS_FILE, read_pids
from dense.faiss_index import UseGpu, describe, is_gpu_index, load_index
from dense.interfaces import ArtifactMismatchError, Ranking, TextEncoder, check_queries

logger = logging.getLogger(__name__)

DEFAULT_QUERY_BATCH_SIZE = 64
# The deepest ranking the project asks a searcher for (the evaluation's k); see DenseSearcher's search_depth.
DEFAULT_SEARCH_DEPTH = 1000


class DenseSearcher:
    """``search(query, k)`` / ``batch_search(queries, k)`` over a faiss index, scores = inner products.

    Safe to call from several threads at once. faiss allows concurrent searches on CPU indexes (search is a const
    operation) but not on GPU indexes, which therefore get a lock. Query encoding takes a lock as well: a torch
    forward pass in eval/no_grad mode is re-entrant, but a Hugging Face fast tokenizer shared by threads can fail
    with "RuntimeError: Already borrowed", and torch already spreads one forward pass over the cores.

    ``search_depth``: every search asks the index for ``max(k, search_depth)`` neighbours and keeps the first
    ``k``. An approximate index explores more for a larger request (faiss HNSW searches with
    ``efSearch = max(efSearch, k)``), so without this floor ``search(q, 10)`` and ``search(q, 1000)[:10]`` could
    differ; with it, every ``k <= search_depth`` gets a prefix of the same ranking. The cost of a deeper request is
    a setting of the searcher, not a side effect of ``k``: a fused searcher that always asks for its top 100 builds
    its dense searcher with ``search_depth=100``.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        index: faiss.Index,
        pids: Sequence[str],
        *,
        query_batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
        search_depth: int = DEFAULT_SEARCH_DEPTH,
    ) -> None:
        if search_depth < 1:
            raise ValueError(f"search_depth must be >= 1, got {search_depth}")
        if index.ntotal != len(pids):
            raise ValueError(f"the index holds {index.ntotal} vectors but {len(pids)} pids were given")
        if encoder.dim != index.d:
            raise ValueError(
                f"the encoder makes {encoder.dim}-d vectors but the index holds {index.d}-d vectors; use the model "
                "the index was built with, or rerun the corpus encoding and dense index stages"
            )
        self._encoder = encoder
        self._index = index
        self._pids = pids
        self._query_batch_size = query_batch_size
        self.search_depth = search_depth
        self._encode_lock = threading.Lock()
        self._search_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if is_gpu_index(index) else contextlib.nullcontext()
        )

    @classmethod
    def from_dir(
        cls,
        index_dir: str | Path,
        encoder: TextEncoder,
        *,
        expected: Mapping[str, Any] | None = None,
        use_gpu: UseGpu = "auto",
        query_batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
        search_depth: int = DEFAULT_SEARCH_DEPTH,
    ) -> DenseSearcher:
        """Load ``index.faiss`` and ``pids.txt`` from ``index_dir``; ``expected`` and ``use_gpu`` as in ``load_index``.

        With the default ``use_gpu="auto"`` a flat index is searched on the GPU (float16) when faiss-gpu sees one;
        GPU searches take at most k=2048 (a faiss limit).
        """
        index_dir = Path(index_dir)
        index, _ = load_index(index_dir, expected, use_gpu=use_gpu)
        pids_path = index_dir / PIDS_FILE
        if not pids_path.exists():
            raise FileNotFoundError(f"{pids_path}: missing next to the index; rerun the dense index stage")
        pids = read_pids(pids_path)
        if len(pids) != index.ntotal:
            raise ArtifactMismatchError(
                f"{pids_path}: {len(pids)} pids but the index holds {index.ntotal} vectors; rerun the dense index stage"
            )
        logger.info("dense searcher ready: %s from %s", describe(index), index_dir)
        return cls(encoder, index, pids, query_batch_size=query_batch_size, search_depth=search_depth)

    @property
    def encoder(self) -> TextEncoder:
        """The query encoder (e.g. to time query encoding on its own)."""
        return self._encoder

    @property
    def count(self) -> int:
        """Number of indexed passages."""
        return len(self._pids)

    def search(self, query: str, k: int) -> Ranking:
        """Top ``k`` ``(pid, score)`` for one query, best first (fewer when the corpus is smaller); for
        ``k <= search_depth`` the first ``k`` of one fixed ranking."""
        return self.batch_search([query], k)[0]

    def batch_search(self, queries: list[str], k: int) -> list[Ranking]:
        """One ranking per query, in order."""
        queries = check_queries(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        with self._encode_lock:
            vectors = self._encoder.encode_queries(list(queries), batch_size=self._query_batch_size)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(queries), self._index.d):
            raise ValueError(
                f"encoder.encode_queries returned shape {vectors.shape} for {len(queries)} queries; expected "
                f"({len(queries)}, {self._index.d})"
            )
        with self._search_lock:
            scores, ids = self._index.search(vectors, min(max(k, self.search_depth), self._index.ntotal))
        scores, ids = scores[:, :k], ids[:, :k]
        pids = self._pids
        # faiss pads with id -1 when it finds fewer than k neighbours; pids[-1] would silently be the last pid.
        return [
            [(pids[i], s) for s, i in zip(row_scores, row_ids, strict=True) if i >= 0]
            for row_scores, row_ids in zip(scores.tolist(), ids.tolist(), strict=True)
        ]
