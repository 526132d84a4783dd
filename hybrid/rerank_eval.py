"""Offline reranking experiments: rerank a saved run's top with a pair scorer and report against the run.

Reads a run written by the evaluation (``<artifacts>/eval/<mode>.<split>.trec``), scores each judged query's top
``depth`` candidates once (cached in a resumable JSONL, so depths and weights are compared without rescoring),
and prints the ablation table with paired randomisation tests against the base run, plus the measured scoring cost
per query. What it finds decides whether a reranker is worth wiring into :class:`hybrid.Retriever`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hybrid.evaluation import Qrels, aggregate, evaluated_qids, per_query_metrics
from hybrid.rerank import PairScoreCache, PairScorer, rerank_with_scores, score_run_heads
from hybrid.report import ablation_table

logger = logging.getLogger(__name__)

Ranking = list[tuple[str, float]]


@dataclass(frozen=True)
class RerankReport:
    table: str
    metrics: dict[str, dict[str, float]]
    seconds_per_query: list[float]


def rerank_report(
    base_name: str, base_run: Mapping[str, Ranking], queries: Mapping[str, str], qrels: Qrels, scorer: PairScorer,
    passage_text, cache: PairScoreCache, *, depths: Sequence[int], weights: Sequence[float | None],
    rel_level: int = 1, max_queries: int | None = None, progress: bool = True, scorer_name: str = "QL",
) -> RerankReport:
    """Table of the base run and every (depth, weight) reranking, p-values against the base run; ``scorer_name``
    labels the rows (``QL``, ``CE``)."""
    qids = [q for q in evaluated_qids(qrels, rel_level) if q in queries and q in base_run][:max_queries]
    if not qids:
        raise ValueError("no judged query has both a text and a ranking in the base run")
    run = {q: base_run[q] for q in qids}
    sub_qrels = {q: qrels[q] for q in qids}
    heads, seconds = score_run_heads(run, queries, scorer, passage_text, max(depths), cache, progress=progress)
    systems = {base_name: run}
    for depth in sorted(depths):
        for weight in weights:
            label = f"{base_name} + {scorer_name} top{depth}" + (
                f" ({scorer_name} only)" if weight is None else f" (w={weight:g})"
            )
            systems[label] = {q: rerank_with_scores(run[q], heads[q][:depth], depth, weight) for q in qids}
    per_query = {name: per_query_metrics(r, sub_qrels, rel_level) for name, r in systems.items()}
    metrics = {name: aggregate(pq) for name, pq in per_query.items()}
    pairs = [(name, base_name) for name in systems if name != base_name]
    table = ablation_table(metrics, per_query, pairs)
    if seconds:
        s = np.array(seconds)
        logger.info("scoring top %d: median %.2f s, p95 %.2f s per query (%d scored now)", max(depths),
                    np.median(s), np.percentile(s, 95), len(s))
    return RerankReport(table, metrics, seconds)


__all__ = ["RerankReport", "rerank_report"]
