"""A fused searcher over two first-stage searchers, as Pyserini's ``HybridSearcher`` sits over its Lucene and faiss
searchers: the same ``search(query, k)`` / ``batch_search(queries, k)`` shape, ``(pid, score)`` best first.

What the fusion sees never depends on ``k``: each first-stage searcher is asked for its top ``depth`` (the depth the
fusion model and the convex weight were fitted at), the strategy ranks the union of those lists, and ``search``
returns the first ``k`` of that one ranking (fewer when the union is smaller). So ``search(q, 10)`` is always
``search(q, 1000)[:10]``, and an evaluation at k=1000 ranks exactly as a user's k=10 does.

The strategies are small objects with one method, ``fuse(query, rankings) -> Ranking``: :class:`RRFStrategy`,
:class:`ConvexStrategy` (min-max convex combination) and :class:`LearnedStrategy` (the logistic-regression model).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from dense.interfaces import check_queries
from fusion.baselines import convex, rrf
from fusion.features import DEFAULT_RRF_K, FeatureBuilder, PassageText
from fusion.model import FusionModel
from fusion.normalise import FillPolicy, Norm, Ranking


class Searcher(Protocol):
    def search(self, query: str, k: int) -> Ranking: ...

    def batch_search(self, queries: list[str], k: int) -> list[Ranking]: ...


class FusionStrategy(Protocol):
    """Merges one query's first-stage rankings (``{retriever name: ranking}``) into one ranking, best first."""

    def fuse(self, query: str, rankings: Mapping[str, Ranking]) -> Ranking: ...


@dataclass(frozen=True)
class RRFStrategy:
    """Reciprocal rank fusion, ``sum 1 / (k + rank)``."""

    k: int = DEFAULT_RRF_K

    def fuse(self, query: str, rankings: Mapping[str, Ranking]) -> Ranking:
        return rrf(rankings, k=self.k)


@dataclass(frozen=True)
class ConvexStrategy:
    """``sum_r w_r * norm_r(score)`` with fixed weights (tuned on training queries), missing scores filled."""

    weights: Mapping[str, float]
    norm: Norm = "minmax"
    fill: FillPolicy = field(default_factory=FillPolicy)

    def fuse(self, query: str, rankings: Mapping[str, Ranking]) -> Ranking:
        return convex(rankings, self.weights, self.norm, self.fill)


@dataclass(frozen=True)
class LearnedStrategy:
    """The learned fusion model over the candidates' features (``passage_text`` only when the builder has no
    lexicon)."""

    model: FusionModel
    builder: FeatureBuilder
    passage_text: PassageText

    def fuse(self, query: str, rankings: Mapping[str, Ranking]) -> Ranking:
        return self.model.fuse(self.builder.build(query, rankings, self.passage_text))


class FusedSearcher:
    """``strategy`` over the top ``depth`` of ``sparse`` and ``dense`` (named ``names``), searched concurrently."""

    def __init__(
        self, sparse: Searcher, dense: Searcher, strategy: FusionStrategy, depth: int,
        names: tuple[str, str] = ("bm25", "dense"),
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.sparse, self.dense, self.strategy, self.depth, self.names = sparse, dense, strategy, depth, names
        # two workers: BM25 (JNI) and dense (torch/faiss) both release the GIL, so the two searches overlap
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fused-search")

    def candidates(self, query: str) -> dict[str, Ranking]:
        """Each first-stage searcher's top ``depth`` for ``query`` (what :meth:`search` fuses)."""
        sparse = self._pool.submit(self.sparse.search, query, self.depth)
        dense = self._pool.submit(self.dense.search, query, self.depth)
        return {self.names[0]: sparse.result(), self.names[1]: dense.result()}

    def search(self, query: str, k: int) -> Ranking:
        """The fused ranking's first ``k`` (fewer when the candidates are fewer)."""
        _check_k(k)
        return self.strategy.fuse(query, self.candidates(query))[:k]

    def batch_search(self, queries: list[str], k: int) -> list[Ranking]:
        """:meth:`search` for many queries: each first stage searches the whole batch at once."""
        queries = check_queries(queries)
        _check_k(k)
        if not queries:
            return []
        sparse = self.sparse.batch_search(queries, self.depth)
        dense = self.dense.batch_search(queries, self.depth)
        return [self.strategy.fuse(q, {self.names[0]: s, self.names[1]: d})[:k]
                for q, s, d in zip(queries, sparse, dense, strict=True)]

    def close(self) -> None:
        """Stop the worker threads and close the first-stage searchers that can be closed."""
        self._pool.shutdown(wait=False)
        for searcher in (self.sparse, self.dense):
            close = getattr(searcher, "close", None)
            if callable(close):
                close()


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


__all__ = ["ConvexStrategy", "FusedSearcher", "FusionStrategy", "LearnedStrategy", "RRFStrategy"]
