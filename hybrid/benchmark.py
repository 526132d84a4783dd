"""Latency benchmark of ``Retriever.search``: one query at a time after a warm-up, with BM25-only search at k=100
measured in the same run (the ratio the project's goal is stated in), p50/p95/p99, how often a reranking mode's
time budget cut it short, and a breakdown of where the time goes (through the composed searchers' public parts)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dense.searcher import DenseSearcher
from fusion.searcher import FusedSearcher
from hybrid.artifacts import machine
from hybrid.evaluation import LatencyStats, budgeted_searcher, markdown_table, measure_latency
from hybrid.rerank import BudgetStats, RerankingSearcher
from hybrid.retriever import Retriever

BREAKDOWN_QUERIES = 50


def _time_each(fn: Callable[[str], object], queries: Sequence[str]) -> float:
    """Median milliseconds of ``fn(q)`` over the queries."""
    ms = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        ms.append((time.perf_counter() - start) * 1000)
    return float(np.median(ms))


def component_breakdown(retriever: Retriever, queries: Sequence[str], k: int) -> dict[str, float]:
    """Median ms of each part of the mode's composed searcher, measured separately (in a real call the two first
    stages overlap, and reranking includes its first stage)."""
    parts: dict[str, float] = {}
    searcher = retriever.searcher
    if isinstance(searcher, RerankingSearcher):
        parts[f"rerank incl. first stage (depth {searcher.depth})"] = _time_each(
            lambda q: searcher.search(q, k), queries)
        searcher = searcher.inner
    if isinstance(searcher, FusedSearcher):
        depth = searcher.depth
        parts[f"bm25 search (k={depth})"] = _time_each(lambda q: searcher.sparse.search(q, depth), queries)
        _dense_parts(parts, searcher.dense, depth, queries)
        candidates = {q: searcher.candidates(q) for q in queries}
        parts[f"fusion ({retriever.mode})"] = _time_each(lambda q: searcher.strategy.fuse(q, candidates[q]), queries)
    elif isinstance(searcher, DenseSearcher):
        _dense_parts(parts, searcher, k, queries)
    ranked = {q: retriever.rank(q, k) for q in queries}
    parts["passage text lookup"] = _time_each(lambda q: retriever.passages.get_many([p for p, _ in ranked[q]]),
                                              queries)
    return parts


def _dense_parts(parts: dict[str, float], dense: DenseSearcher, k: int, queries: Sequence[str]) -> None:
    parts["dense query encoding"] = _time_each(lambda q: dense.encoder.encode_queries([q]), queries)
    parts[f"dense search incl. encoding (k={k})"] = _time_each(lambda q: dense.search(q, k), queries)


def benchmark(artifacts: str | Path | None, queries: Sequence[str], k: int = 10,
              modes: Sequence[str] = ("hybrid",), warmup: int = 10) -> tuple[str, dict]:
    """Markdown tables (latency per mode + BM25-only at k=100, then the breakdown) and the raw numbers.

    For a reranking mode the table also gives the share of timed queries whose time budget cut reranking short, and
    how many candidates it scored per query (what the budget buys on this box)."""
    rows, raw = [], {}
    baseline = Retriever(mode="sparse", artifacts_dir=artifacts)
    bm25 = measure_latency(baseline, queries, 100, warmup)
    raw["bm25-only k=100"] = asdict(bm25)
    rows.append(_row("bm25-only (k=100)", bm25, bm25))
    breakdowns = {}
    for mode in modes:
        retriever = Retriever(mode=mode, artifacts_dir=artifacts)
        stats, budget = _timed(retriever, queries, k, warmup)
        cut_rate = budget.cut_rate if budget is not None else None
        scored = budget.scored_per_query if budget is not None else None
        raw[mode] = asdict(stats) | ({"budget_cut_rate": cut_rate, "candidates_scored_per_query": scored}
                                     if budget is not None else {})
        rows.append(_row(f"{mode} (k={k})", stats, bm25) | {"budget cut %": _percent(cut_rate),
                                                               "scored / query": scored})
        breakdowns[mode] = component_breakdown(retriever, list(queries)[:BREAKDOWN_QUERIES], k)
        retriever.close()
    raw["breakdown_ms"] = breakdowns
    raw["machine"] = machine()
    cols = ["system", "p50 ms", "p95 ms", "p99 ms", "queries/s", "p95 / bm25 p95", "budget cut %", "scored / query",
            "n"]
    table = markdown_table(rows, cols)
    note = (f"Median ms per component (measured one by one on {BREAKDOWN_QUERIES} queries; bm25 and dense overlap "
            "in a real search, which runs them concurrently):")
    box = raw["machine"]
    lines = [f"Machine: {box['cpu']}, {box['logical_cpus']} logical CPUs"
             + (f", GPU {', '.join(box['gpus'])}" if box.get("gpus") else ""), "", table, "", note, ""]
    for mode, parts in breakdowns.items():
        lines.append(markdown_table([{"component": f"{mode}: {n}", "ms": v} for n, v in parts.items()],
                                    ["component", "ms"]))
    return "\n".join(lines), raw


def _timed(retriever: Retriever, queries: Sequence[str], k: int,
           warmup: int) -> tuple[LatencyStats, BudgetStats | None]:
    """Latency of ``retriever.search`` after ``warmup`` untimed queries, and the reranker's budget counts over the
    timed ones (``None`` when the mode does not rerank)."""
    queries = list(queries)
    warm = max(0, min(warmup, len(queries) - 1))
    for q in queries[:warm]:
        retriever.search(q, k)
    reranker = budgeted_searcher(retriever)
    if reranker is not None:
        reranker.reset_budget_stats()
    stats = measure_latency(retriever, queries[warm:], k, warmup=0)
    return stats, reranker.budget_stats() if reranker is not None else None


def _percent(rate: float | None) -> str | None:
    return None if rate is None else f"{100.0 * rate:.1f}"


def _row(name: str, s: LatencyStats, bm25: LatencyStats) -> dict:
    return {"system": name, "p50 ms": s.p50_ms, "p95 ms": s.p95_ms, "p99 ms": s.p99_ms,
            "queries/s": s.qps, "p95 / bm25 p95": s.p95_ms / bm25.p95_ms, "n": s.n}
