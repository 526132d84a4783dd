"""Latency benchmark of ``Retriever.search``: one query at a time after a warm-up, with BM25-only search at k=100
measured in the same run (the ratio the project's goal is stated in) and a breakdown of where the time goes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hybrid.evaluation import LatencyStats, markdown_table, measure_latency
from hybrid.retriever import Retriever


def _time_each(fn: Callable[[str], object], queries: Sequence[str]) -> float:
    """Median milliseconds of ``fn(q)`` over the queries."""
    ms = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        ms.append((time.perf_counter() - start) * 1000)
    return float(np.median(ms))


def component_breakdown(retriever: Retriever, queries: Sequence[str], k: int) -> dict[str, float]:
    """Median ms of each part of a fused search, measured separately (they overlap in the real call)."""
    parts: dict[str, float] = {}
    depth = retriever._candidate_depth(k)
    if retriever._bm25 is not None:
        parts[f"bm25 search (k={depth})"] = _time_each(lambda q: retriever._bm25.search(q, depth), queries)
    if retriever._dense is not None:
        encoder = retriever._dense._encoder
        parts["dense query encoding"] = _time_each(lambda q: encoder.encode_queries([q]), queries)
        parts[f"dense search incl. encoding (k={depth})"] = _time_each(
            lambda q: retriever._dense.search(q, depth), queries)
    if retriever._fusion is not None:
        rankings = {q: retriever._rankings(q, depth) for q in queries}
        parts[f"fusion ({retriever.mode})"] = _time_each(lambda q: retriever._fuse(q, rankings[q], k), queries)
    ranked = {q: retriever.rank(q, k) for q in queries}
    parts["passage text lookup"] = _time_each(lambda q: retriever._results(ranked[q]), queries)
    return parts


def benchmark(artifacts: str | Path | None, queries: Sequence[str], k: int = 10,
              modes: Sequence[str] = ("hybrid",), warmup: int = 10) -> tuple[str, dict]:
    """Markdown tables (latency per mode + BM25-only at k=100, then the breakdown) and the raw numbers."""
    rows, raw = [], {}
    baseline = Retriever(mode="sparse", artifacts_dir=artifacts)
    bm25 = measure_latency(baseline, queries, 100, warmup)
    raw["bm25-only k=100"] = asdict(bm25)
    rows.append(_row("bm25-only (k=100)", bm25, bm25))
    breakdowns = {}
    for mode in modes:
        retriever = Retriever(mode=mode, artifacts_dir=artifacts)
        stats = measure_latency(retriever, queries, k, warmup)
        raw[mode] = asdict(stats)
        rows.append(_row(f"{mode} (k={k})", stats, bm25))
        breakdowns[mode] = component_breakdown(retriever, list(queries)[:50], k)
        retriever.close()
    raw["breakdown_ms"] = breakdowns
    cols = ["system", "p50 ms", "p95 ms", "p99 ms", "queries/s", "p95 / bm25 p95", "n"]
    table = markdown_table(rows, cols)
    lines = [table, "", "Median ms per component (measured one by one on 50 queries; bm25 and dense overlap in "
             "a real search, which runs them concurrently):", ""]
    for mode, parts in breakdowns.items():
        lines.append(markdown_table([{"component": f"{mode}: {n}", "ms": v} for n, v in parts.items()],
                                    ["component", "ms"]))
    return "\n".join(lines), raw


def _row(name: str, s: LatencyStats, bm25: LatencyStats) -> dict:
    return {"system": name, "p50 ms": s.p50_ms, "p95 ms": s.p95_ms, "p99 ms": s.p99_ms,
            "queries/s": s.qps, "p95 / bm25 p95": s.p95_ms / bm25.p95_ms, "n": s.n}
