"""Unlearned fusion baselines over plain rankings: reciprocal rank fusion and a convex combination.

Pure functions of ``{retriever_name: Ranking}``; every searcher wraps them. Ties in the fused score keep the order in
which candidates first appear (retrievers in mapping order, then by rank), so results are deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import ir_measures
import numpy as np

from fusion.normalise import FillPolicy, Norm, Ranking, normalise, split_ranking

logger = logging.getLogger(__name__)

Metric = Literal["mrr@10", "r@1"]
METRICS: tuple[str, ...] = ("mrr@10", "r@1")
DEFAULT_GRID = np.linspace(0.0, 1.0, 21)


def rrf(rankings: Mapping[str, Ranking], k: int = 60, depth: int | None = None) -> Ranking:
    """Reciprocal rank fusion (Cormack et al. 2009): ``sum_r 1 / (k + rank_r(d))`` over the lists containing ``d``."""
    if k < 0:
        raise ValueError(f"RRF k must be >= 0, got {k}")
    fused: dict[str, float] = {}
    for name, ranking in rankings.items():
        pids, _ = split_ranking(name, ranking, depth)
        for rank, pid in enumerate(pids, start=1):
            fused[pid] = fused.get(pid, 0.0) + 1.0 / (k + rank)
    return _sorted(fused)


def convex(
    rankings: Mapping[str, Ranking],
    weights: Mapping[str, float],
    norm: Norm = "minmax",
    missing_fill: FillPolicy = FillPolicy(),
    depth: int | None = None,
) -> Ranking:
    """``sum_r w_r * norm_r(d)`` over the retrievers named in ``weights`` (other rankings are ignored).

    Scores are normalised within each (top-``depth``) list; a candidate absent from a list gets that list's
    ``missing_fill`` value in the same normalisation (default: the list's worst value, as Pyserini does).
    """
    absent = [r for r in weights if r not in rankings]
    if absent:
        raise ValueError(f"convex: weights name retrievers {absent} that have no ranking (have {sorted(rankings)})")
    if not weights:
        raise ValueError("convex: weights is empty; give one weight per retriever to fuse")
    lists = {r: split_ranking(r, rankings[r], depth) for r in weights}
    fused: dict[str, float] = {}
    for pids, _ in lists.values():
        for pid in pids:
            fused.setdefault(pid, 0.0)
    for r, (pids, scores) in lists.items():
        w = float(weights[r])
        values = dict(zip(pids, normalise(scores, norm).tolist()))
        fill = missing_fill.fill(scores).normalised(norm)
        for pid in fused:
            fused[pid] += w * values.get(pid, fill)
    return _sorted(fused)


def tune_convex_weight(
    train_rankings: Mapping[str, Mapping[str, Ranking]],
    qrels: Mapping[str, Mapping[str, int]],
    retrievers: Sequence[str] = ("bm25", "dense"),
    grid: Sequence[float] | np.ndarray = DEFAULT_GRID,
    metric: Metric = "mrr@10",
    norm: Norm = "minmax",
    missing_fill: FillPolicy = FillPolicy(),
    depth: int | None = None,
    min_grade: int = 1,
) -> tuple[float, list[tuple[float, float]]]:
    """Grid-search the weight ``w`` of the first retriever (the second gets ``1 - w``) on training queries.

    Returns ``(best_w, [(w, metric_value), ...])``. Only queries with rankings and at least one qrel of grade
    ``>= min_grade`` count. When several weights tie for the best value, the middle one of them is taken (the
    centre of a plateau is the choice least sensitive to noise). Metrics: ``mrr@10`` (reciprocal rank of the
    first relevant passage in the top 10) and ``r@1`` (share of relevant passages retrieved at rank 1),
    computed with ``ir_measures``.
    """
    if len(retrievers) != 2:
        raise ValueError(f"tune_convex_weight tunes one weight between exactly two retrievers, got {list(retrievers)}")
    measure = _measure(metric, min_grade)
    grid = [float(w) for w in grid]
    if not grid:
        raise ValueError("the weight grid is empty")
    qids = [q for q in train_rankings if any(g >= min_grade for g in qrels.get(q, {}).values())]
    if not qids:
        raise ValueError(
            f"no training query has both rankings and a qrel with grade >= {min_grade} "
            f"({len(train_rankings)} queries ranked, {len(qrels)} with qrels); check that qids match"
        )
    logger.info("tuning convex weight of %s vs %s on %d queries (%s)", retrievers[0], retrievers[1], len(qids), metric)
    eval_qrels = {q: {pid: int(g) for pid, g in qrels[q].items()} for q in qids}
    first, second = retrievers
    table: list[tuple[float, float]] = []
    for w in grid:
        run = {
            q: _rank_scores(convex(train_rankings[q], {first: w, second: 1.0 - w}, norm, missing_fill, depth))
            for q in qids
        }
        value = float(ir_measures.calc_aggregate([measure], eval_qrels, run)[measure])
        table.append((w, value))
    best_value = max(v for _, v in table)
    tied = [w for w, v in table if v == best_value]
    best = tied[(len(tied) - 1) // 2]
    logger.info("best %s weight %.3f: %s = %.4f", first, best, metric, best_value)
    return best, table


def _measure(metric: str, min_grade: int) -> ir_measures.Measure:
    if metric == "mrr@10":
        return ir_measures.RR(rel=min_grade) @ 10
    if metric == "r@1":
        return ir_measures.R(rel=min_grade) @ 1
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def _rank_scores(ranking: Ranking) -> dict[str, float]:
    """Run entry for ir_measures scored by position, so its tie-breaking (by docid) cannot reorder our ties.

    An empty ranking becomes one dummy entry so the query still counts (as a miss) in the average.
    """
    if not ranking:
        return {"__no_candidates__": 0.0}
    return {pid: float(len(ranking) - i) for i, (pid, _) in enumerate(ranking)}


def _sorted(fused: dict[str, float]) -> Ranking:
    # sorted() is stable, so ties keep first-appearance order (dicts keep insertion order).
    return sorted(fused.items(), key=lambda item: -item[1])


__all__ = ["DEFAULT_GRID", "METRICS", "Metric", "convex", "rrf", "tune_convex_weight"]
