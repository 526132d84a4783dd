"""``hybrid.Retriever``: BM25 + dense candidates merged by the learned fusion model (or an ablation mode).

Everything heavy (JVM + Lucene searcher, encoder, faiss index, fusion model, passage store) is loaded once in
``__init__``; ``search`` only encodes the query, runs the two searches (concurrently) and fuses.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hybrid.artifacts import ArtifactError, artifacts_dir, require_stage, stage_dir
from hybrid.rerank import rerank

logger = logging.getLogger(__name__)

Ranking = list[tuple[str, float]]

MODES = ("sparse", "dense", "rrf", "convex", "hybrid", "rerank")
NEEDS_SPARSE = {"sparse", "rrf", "convex", "hybrid", "rerank"}
NEEDS_DENSE = {"dense", "rrf", "convex", "hybrid", "rerank"}
FUSED = {"rrf", "convex", "hybrid", "rerank"}


@dataclass(frozen=True)
class Result:
    """One retrieved passage: MS MARCO passage id, its text, and a score comparable within the query."""

    document_id: str
    document_text: str
    score: float


def _check_query(query: object) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty or whitespace only; pass the text to search for")
    return query


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


class Retriever:
    """Search the MS MARCO passages indexed by the pipeline.

    ``mode``: ``hybrid`` (learned logistic-regression fusion of BM25 and dense candidates), ``rerank`` (hybrid,
    then its top few reordered by SmolLM2 query likelihood; only when the pipeline's ``rerank`` stage enabled it),
    ``sparse`` (BM25 only), ``dense`` (bi-encoder only), ``rrf`` (reciprocal rank fusion) or ``convex``
    (min-max convex combination with the weight tuned on train queries). ``None`` (default): ``rerank`` when the
    config made it the default (``rerank.default``), else ``hybrid``.
    ``artifacts_dir``: where the pipeline wrote its artifacts (default: env ``HYBRID_ARTIFACTS`` or
    ``<repo>/artifacts``).
    """

    def __init__(self, mode: str | None = None, artifacts_dir: str | Path | None = None) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        self.root = _resolve(artifacts_dir)
        rerank_settings = self._rerank_settings()
        if mode is None:
            mode = "rerank" if rerank_settings.get("default") else "hybrid"
        self.mode = mode
        self.config = require_stage(self.root, "data").get("config", {})  # the pipeline config that built it

        from hybrid.msmarco import PassageStore

        self._passages = PassageStore.open(stage_dir(self.root, "data"))
        self._bm25 = self._load_bm25() if mode in NEEDS_SPARSE else None
        self._dense = self._load_dense() if mode in NEEDS_DENSE else None
        self._fusion = self._load_fusion() if mode in FUSED else None
        self._reranker = self._load_reranker(rerank_settings) if mode == "rerank" else None
        self._rerank_lock = threading.Lock()  # a HF tokenizer shared by threads can fail ("Already borrowed")
        # two workers: BM25 (JNI, releases the GIL in Java) and dense (torch/faiss release it too)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="retriever") if self._fusion else None

    # ---- loading -------------------------------------------------------------------------------------------
    def _load_bm25(self):
        from sparse.bm25 import BM25Searcher

        manifest = require_stage(self.root, "bm25")
        return BM25Searcher(stage_dir(self.root, "bm25"), k1=manifest.get("k1", 0.82), b=manifest.get("b", 0.68))

    def _load_dense(self):
        from dense.encoder import load_encoder
        from dense.searcher import DenseSearcher

        model_manifest = require_stage(self.root, "dense_train")
        require_stage(self.root, "dense_index", expect={"model_fingerprint": model_manifest["model_fingerprint"]})
        encoder = load_encoder(stage_dir(self.root, "dense_train") / "model")
        return DenseSearcher.from_dir(stage_dir(self.root, "dense_index") / "faiss", encoder)

    def _load_fusion(self):
        from hybrid.fusion_stage import FusionArtifacts

        require_stage(self.root, "fusion")
        return FusionArtifacts.load(stage_dir(self.root, "fusion"))

    def _rerank_settings(self) -> dict:
        path = stage_dir(self.root, "rerank") / "settings.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _load_reranker(self, settings: dict):
        from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer

        require_stage(self.root, "rerank")
        if not settings.get("enabled"):
            raise ArtifactError(
                f"mode 'rerank' is not enabled in {self.root}: set rerank.enabled = true in the config and run the "
                "pipeline's rerank stage (scripts/run_pipeline.py --config ... --stages rerank)"
            )
        scorer = QueryLikelihoodScorer.from_dir(
            settings["model_dir"],
            QueryLikelihoodConfig(max_passage_tokens=settings["max_passage_tokens"],
                                  system_prompt=settings.get("system_prompt")),
        )
        weight = None if settings["combine"] == "replace" else float(settings["weight"])
        return scorer, int(settings["depth"]), weight

    # ---- ranking -------------------------------------------------------------------------------------------
    def _candidate_depth(self, k: int) -> int:
        return max(k, self._fusion.depth) if self._fusion else k

    def _rankings(self, query: str, depth: int) -> dict[str, Ranking]:
        futures = {
            "bm25": self._pool.submit(self._bm25.search, query, depth),
            "dense": self._pool.submit(self._dense.search, query, depth),
        }
        return {name: f.result() for name, f in futures.items()}

    def _batch_rankings(self, queries: list[str], depth: int) -> list[dict[str, Ranking]]:
        bm25 = self._bm25.batch_search(queries, depth)
        dense = self._dense.batch_search(queries, depth)
        return [{"bm25": b, "dense": d} for b, d in zip(bm25, dense)]

    def _fuse(self, query: str, rankings: dict[str, Ranking], k: int) -> Ranking:
        f = self._fusion
        if self.mode == "rrf":
            return f.rrf(rankings)[:k]
        if self.mode == "convex":
            return f.convex(rankings)[:k]
        if self.mode == "rerank":
            scorer, depth, weight = self._reranker
            fused = f.hybrid(query, rankings, self._passages.get_many, max(k, depth))
            with self._rerank_lock:
                return rerank(query, fused, scorer, self._passages.get_many, depth, weight)[:k]
        return f.hybrid(query, rankings, self._passages.get_many, k)

    def rank(self, query: str, k: int) -> Ranking:
        """``(pid, score)`` best first, without passage texts (what evaluation needs)."""
        query, k = _check_query(query), _check_k(k)
        if self.mode == "sparse":
            return self._bm25.search(query, k)
        if self.mode == "dense":
            return self._dense.search(query, k)
        return self._fuse(query, self._rankings(query, self._candidate_depth(k)), k)

    def batch_rank(self, queries: Sequence[str], k: int) -> list[Ranking]:
        queries = [_check_query(q) for q in queries]
        k = _check_k(k)
        if not queries:
            return []
        if self.mode == "sparse":
            return self._bm25.batch_search(queries, k)
        if self.mode == "dense":
            return self._dense.batch_search(queries, k)
        all_rankings = self._batch_rankings(queries, self._candidate_depth(k))
        return [self._fuse(q, r, k) for q, r in zip(queries, all_rankings)]

    def _results(self, ranking: Ranking) -> list[Result]:
        texts = self._passages.get_many([pid for pid, _ in ranking])
        return [Result(pid, text, float(score)) for (pid, score), text in zip(ranking, texts)]

    def search(self, query: str, k: int = 10) -> list[Result]:
        """Top-``k`` passages for ``query``, best first (fewer if the corpus is smaller than ``k``)."""
        return self._results(self.rank(query, k))

    def batch_search(self, queries: Sequence[str], k: int = 10) -> list[list[Result]]:
        """:meth:`search` for many queries at once (batched encoding and Lucene threads)."""
        return [self._results(r) for r in self.batch_rank(queries, k)]

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"Retriever(mode={self.mode!r}, artifacts_dir={str(self.root)!r})"


def _resolve(path: str | Path | None) -> Path:
    root = artifacts_dir(path)
    if not root.exists():
        raise ArtifactError(
            f"artifact directory {root} does not exist; run the pipeline first "
            "(`make run`, or `python scripts/run_pipeline.py --config configs/cpu-marco43k.toml`) "
            "or pass artifacts_dir= / set HYBRID_ARTIFACTS"
        )
    return root
