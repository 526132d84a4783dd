"""Rerank the top of any searcher's ranking with a pairwise relevance scorer (here: query likelihood).

:class:`RerankingSearcher` wraps a searcher with the project's one search shape (``search`` / ``batch_search``
returning ``(pid, score)`` best first) and returns the same shape, so reranked rankings evaluate and compose like
every other retriever. Within the top ``depth`` candidates the new score is

    z(first-stage score) + weight * z(scorer score)        (z: z-score within the query's top-depth list)

or the scorer's score alone when ``weight`` is ``None``. Candidates below ``depth`` keep their first-stage order
after the reranked ones. The cost is ``depth`` scorer calls per query, so ``depth`` is the latency knob.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

Ranking = list[tuple[str, float]]


class PairScorer(Protocol):
    def score(self, query: str, passages: Sequence[str]) -> np.ndarray: ...


class BaseSearcher(Protocol):
    def search(self, query: str, k: int) -> Ranking: ...

    def batch_search(self, queries: list[str], k: int) -> list[Ranking]: ...


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def rerank(
    query: str, ranking: Ranking, scorer: PairScorer, passage_text: Callable[[list[str]], list[str]],
    depth: int, weight: float | None = 1.0,
) -> Ranking:
    """The reranked ranking (same pids); see the module docstring for the score."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    head = ranking[:depth]
    if not head:
        return []
    new = np.asarray(scorer.score(query, passage_text([p for p, _ in head])), dtype=np.float64)
    return rerank_with_scores(ranking, new, depth, weight)


def rerank_with_scores(ranking: Ranking, head_scores: np.ndarray, depth: int, weight: float | None = 1.0) -> Ranking:
    """:func:`rerank` with the scorer's scores of ``ranking[:depth]`` already computed (e.g. cached)."""
    head, tail = ranking[:depth], ranking[depth:]
    if len(head_scores) != len(head):
        raise ValueError(f"{len(head_scores)} scores for the {len(head)} candidates of the top {depth}")
    if not head:
        return []
    pids = [p for p, _ in head]
    new = np.asarray(head_scores, dtype=np.float64)
    if weight is not None:
        new = _z(np.array([s for _, s in head], dtype=np.float64)) + weight * _z(new)
    order = np.argsort(-new, kind="stable")
    reranked = [(pids[i], float(new[i])) for i in order]
    if not tail:
        return reranked
    floor = reranked[-1][1]
    return reranked + [(pid, floor - 1.0 - i) for i, (pid, _) in enumerate(tail)]


class PairScoreCache:
    """Append-only JSONL of ``{"qid", "pid", "score"}``: scorer results survive a crash and are reused by reruns.

    Keyed by a description of the scorer (model, prompt, limits) written in the first line; a cache made by
    another scorer is refused rather than mixed.
    """

    def __init__(self, path: str | Path, scorer_key: str) -> None:
        self.path = Path(path)
        self.scorer_key = scorer_key
        self.scores: dict[tuple[str, str], float] = {}
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # a record cut by a crash: drop it so appends stay valid
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
            with self.path.open(encoding="utf-8") as f:
                header = json.loads(f.readline() or "{}")
                if header.get("scorer") != scorer_key:
                    raise ValueError(f"{self.path} holds scores of {header.get('scorer')!r}, not {scorer_key!r}; "
                                     "use another cache file or delete it")
                for line in f:
                    rec = json.loads(line)
                    self.scores[(rec["qid"], rec["pid"])] = float(rec["score"])
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"scorer": scorer_key}) + "\n", encoding="utf-8")

    def get(self, qid: str, pids: Sequence[str]) -> np.ndarray | None:
        try:
            return np.array([self.scores[(qid, p)] for p in pids], dtype=np.float64)
        except KeyError:
            return None

    def add(self, qid: str, pids: Sequence[str], scores: Sequence[float]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for pid, score in zip(pids, scores):
                self.scores[(qid, pid)] = float(score)
                f.write(json.dumps({"qid": qid, "pid": pid, "score": float(score)}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def score_run_heads(
    run: Mapping[str, Ranking], queries: Mapping[str, str], scorer: PairScorer,
    passage_text: Callable[[list[str]], list[str]], depth: int, cache: PairScoreCache, progress: bool = True,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Scorer scores of each query's top ``depth`` (from the cache when present) and the seconds of each query
    that had to be scored (its cost at this depth)."""
    out: dict[str, np.ndarray] = {}
    seconds: list[float] = []
    for qid in tqdm(list(run), desc=f"scoring top {depth}", unit="query", disable=not progress):
        pids = [p for p, _ in run[qid][:depth]]
        cached = cache.get(qid, pids)
        if cached is None:
            start = time.perf_counter()
            cached = np.asarray(scorer.score(queries[qid], passage_text(pids)), dtype=np.float64)
            seconds.append(time.perf_counter() - start)
            cache.add(qid, pids, cached.tolist())
        out[qid] = cached
    return out, seconds


class RerankingSearcher:
    """A searcher whose top-``depth`` is reranked by ``scorer`` (texts from ``passage_text``)."""

    def __init__(self, base: BaseSearcher, scorer: PairScorer, passage_text: Callable[[list[str]], list[str]],
                 depth: int = 10, weight: float | None = 1.0) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.base, self.scorer, self.passage_text = base, scorer, passage_text
        self.depth, self.weight = depth, weight

    def search(self, query: str, k: int) -> Ranking:
        ranking = self.base.search(query, max(k, self.depth))
        return rerank(query, ranking, self.scorer, self.passage_text, self.depth, self.weight)[:k]

    def batch_search(self, queries: list[str], k: int) -> list[Ranking]:
        rankings = self.base.batch_search(queries, max(k, self.depth))
        return [rerank(q, r, self.scorer, self.passage_text, self.depth, self.weight)[:k]
                for q, r in zip(queries, rankings)]


__all__ = ["PairScoreCache", "RerankingSearcher", "rerank", "rerank_with_scores", "score_run_heads"]
