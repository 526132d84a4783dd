"""Rerank the top of any searcher's ranking with a pairwise relevance scorer (query likelihood or a cross-encoder).

:class:`RerankingSearcher` wraps a searcher with the project's one search shape (``search`` / ``batch_search``
returning ``(pid, score)`` best first) and returns the same shape, so reranked rankings evaluate and compose like
every other retriever. Within the top ``depth`` candidates the new score is

    z(first-stage score) + weight * z(scorer score)        (z: z-score within the query's top-depth list)

or the scorer's score alone when ``weight`` is ``None``. Candidates below ``depth`` keep their first-stage order
after the reranked ones. The cost is ``depth`` scorer calls per query, so ``depth`` is the latency knob, and
:class:`RerankingSearcher`'s per-query time budget bounds it when some candidates turn out slow.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from dense.atomic import drop_partial_last_line, write_text_atomic
from dense.interfaces import check_queries

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
            drop_partial_last_line(self.path)  # a record cut by a crash: dropped so appends stay valid
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
            write_text_atomic(self.path, json.dumps({"scorer": scorer_key}) + "\n")

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


@dataclass(frozen=True)
class BudgetStats:
    """How often a :class:`RerankingSearcher`'s time budget cut reranking short."""

    queries: int  # queries reranked (each ``search``, each query of a ``batch_search``)
    cut: int  # of those, how many stopped before all of the top ``depth`` were scored
    candidates_scored: int

    @property
    def cut_rate(self) -> float:
        return self.cut / self.queries if self.queries else 0.0

    @property
    def scored_per_query(self) -> float:
        return self.candidates_scored / self.queries if self.queries else 0.0


class RerankingSearcher:
    """``inner``'s ranking with its top ``depth`` reordered by ``scorer`` (passage texts from ``passage_text``).

    ``time_budget_s`` (``None``: no limit) caps the seconds each query spends on scoring. Candidates are scored
    up to ``batch_size`` at a time (one by default; a GPU scores a batch in about the time of one), best first;
    before each batch, the searcher takes the slowest cost per candidate seen so far in this query (before the first,
    that of the last query's largest batch) and scores as many of the next candidates as would still finish inside
    the budget (fewer than ``batch_size`` when that is all that fits), and
    stops when not even one would. The candidates scored by then (a prefix of the top) are reordered
    as :func:`rerank_with_scores` does with that shorter depth, and the rest keep ``inner``'s order below them, so the
    answer is always one consistent ranking. The clock starts when reranking starts (after the first stage) and
    includes waiting for the scorer's lock under concurrent calls. :meth:`budget_stats` counts the cuts.
    """

    ESTIMATE_DECAY = 0.96  # per query that scored nothing: see _score_within_budget

    def __init__(self, inner: BaseSearcher, scorer: PairScorer, passage_text: Callable[[list[str]], list[str]],
                 depth: int = 10, weight: float | None = 1.0, time_budget_s: float | None = None,
                 clock: Callable[[], float] = time.perf_counter, batch_size: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None (no limit), got {time_budget_s}")
        self.inner, self.scorer, self.passage_text = inner, scorer, passage_text
        self.depth, self.weight, self.time_budget_s = depth, weight, time_budget_s
        self._clock = clock
        # the scorer's tokenizer cannot be shared by threads ("Already borrowed"); the model runs on all cores anyway
        self._lock = threading.Lock()
        self._queries = self._cut = self._scored = 0
        self._cost_estimate = 0.0  # seconds per candidate in the last query's largest batch: the guess for the next

    def search(self, query: str, k: int) -> Ranking:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self._rerank(query, self.inner.search(query, max(k, self.depth)))[:k]

    def batch_search(self, queries: list[str], k: int) -> list[Ranking]:
        queries = check_queries(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rankings = self.inner.batch_search(queries, max(k, self.depth))
        return [self._rerank(q, r)[:k] for q, r in zip(queries, rankings, strict=True)]

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def budget_stats(self) -> BudgetStats:
        """Counts since construction (or :meth:`reset_budget_stats`)."""
        with self._lock:
            return BudgetStats(self._queries, self._cut, self._scored)

    def reset_budget_stats(self) -> None:
        with self._lock:
            self._queries = self._cut = self._scored = 0

    def warm_up(self, query: str, size: int = 4) -> None:
        """Score ``query``'s top ``size`` once, outside the counts, and take its cost per candidate as the guess for
        the first real query. Without a guess the first query scores a whole batch (all ``depth`` candidates with
        the shipped settings: 2.3 s on a 2-core box, E49); a small batch guesses high, so the first query errs on
        the short side and the next ones adapt. Also pays the first call's one-off costs (the JVM, oneDNN)."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        head = self.inner.search(query, min(size, self.depth, self.batch_size))
        if not head:
            return
        texts = self.passage_text([p for p, _ in head])
        with self._lock:
            before = self._clock()
            self.scorer.score(query, texts)
            self._cost_estimate = (self._clock() - before) / len(texts)

    def _rerank(self, query: str, ranking: Ranking) -> Ranking:
        start = self._clock()
        head = ranking[: self.depth]
        if not head:
            return ranking
        texts = self.passage_text([p for p, _ in head])
        before_lock = self._clock()
        with self._lock:
            scores = self._score_within_budget(query, texts, start, waited=self._clock() - before_lock)
            self._queries += 1
            self._cut += len(scores) < len(head)
            self._scored += len(scores)
        if not scores:
            return ranking
        return rerank_with_scores(ranking, np.asarray(scores, dtype=np.float64), len(scores), self.weight)

    def _score_within_budget(self, query: str, texts: list[str], start: float, waited: float = 0.0) -> list[float]:
        """Scores of the longest prefix of ``texts`` that fits the budget (all of them without one).

        The cost of a candidate is taken to be the slowest per-candidate cost measured in this query (a batch's time
        over its size); before the first batch, the per-candidate cost of the last query's largest batch. Each batch
        holds ``batch_size`` candidates or, when fewer fit in the time left, that many (E22: on a box where a batch of
        5 took ~0.85 s against the 0.75-s budget, 4.45 of 5 were scored per dev query instead of 5 or none, p95 854
        ms). The guess carried to the next query is the largest batch's, not the slowest: a batch has a fixed cost
        besides its candidates, so a short batch that filled the end of the budget costs more per candidate than the
        next query's first batch will, and carrying it over shrank that batch query after query (E49). A query that
        scores nothing shrinks the guess by ``ESTIMATE_DECAY``, so one slow spell cannot switch reranking off for
        good, yet a machine on which not even one candidate fits retries only every ~20 queries, not every third as
        halving did (E19). A query that scored nothing only because it waited ``waited`` seconds for the scorer (another
        thread's query) leaves the guess alone: the wait says nothing about the cost of a candidate, and under
        concurrent calls the decay would otherwise shrink the guess once per waiting thread."""
        scores: list[float] = []
        per_candidate = self._cost_estimate
        wait_cut = (self.time_budget_s is not None and per_candidate > 0
                    and self.time_budget_s - (self._clock() - start) + waited >= per_candidate)
        largest = (0, 0.0)  # (size, cost per candidate) of this query's largest batch so far
        begin = 0
        while begin < len(texts):
            size = min(self.batch_size, len(texts) - begin)
            if self.time_budget_s is not None:
                left = self.time_budget_s - (self._clock() - start)
                if left < 0:  # spent already (no cost guess yet: the first query, or a budget shorter than a tick)
                    break
                if per_candidate > 0:
                    size = min(size, int(left / per_candidate))
            if size < 1:
                break
            batch = texts[begin : begin + size]
            before = self._clock()
            new = np.asarray(self.scorer.score(query, batch), dtype=np.float64)
            if new.shape != (len(batch),):
                raise ValueError(f"the scorer returned {new.shape} scores for {len(batch)} passages")
            cost = (self._clock() - before) / len(batch)
            per_candidate = cost if not scores else max(per_candidate, cost)
            if len(batch) > largest[0]:
                largest = (len(batch), cost)
            scores.extend(float(x) for x in new)
            begin += size
        if scores:
            self._cost_estimate = largest[1]
        elif not wait_cut:
            self._cost_estimate *= self.ESTIMATE_DECAY
        return scores


__all__ = ["BudgetStats", "PairScoreCache", "RerankingSearcher", "rerank", "rerank_with_scores", "score_run_heads"]
