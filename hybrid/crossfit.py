"""Out-of-fold fused runs on the held-out train queries, so choices made on them compare against a fair baseline.

The fusion stage fits its model (and tunes the convex weight) on the same held-out train queries that every later
choice is made on (rerank depth and combination, ...). Against those queries the fitted ``hybrid`` and ``convex``
runs are in-sample, i.e. better than they will be on new queries, which biases any comparison with them. Here the
queries are split into folds; each fold's runs come from a model fitted and a weight tuned on the other folds only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from fusion.baselines import tune_convex_weight
from fusion.normalise import Ranking
from fusion.searcher import ConvexStrategy, LearnedStrategy
from fusion.training import train_fusion
from hybrid.fusion_stage import FusionArtifacts

Rankings = Mapping[str, Mapping[str, Ranking]]  # qid -> retriever name -> ranking


def folds_of(qids: list[str], n_folds: int, seed: int) -> list[list[str]]:
    """``qids`` split into ``n_folds`` disjoint folds of (nearly) equal size, drawn by ``seed``."""
    if n_folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {n_folds}")
    order = sorted(qids)
    random.Random(seed).shuffle(order)
    return [sorted(order[i::n_folds]) for i in range(n_folds)]


def crossfit_runs(
    fusion: FusionArtifacts,
    queries: Mapping[str, str],
    rankings: Rankings,
    qrels: Mapping[str, Mapping[str, int]],
    passage_text: Callable[[list[str]], list[str]],
    n_folds: int = 2,
    seed: int = 0,
    C: float = 1.0,
) -> dict[str, dict[str, Ranking]]:
    """``{"hybrid": run, "convex": run}`` over all ``queries``, each query ranked by a model fitted (a weight
    tuned) without it, with the fusion stage's features, depth and fill policy."""
    first, second = fusion.settings.retrievers[:2]
    runs: dict[str, dict[str, Ranking]] = {"hybrid": {}, "convex": {}}
    qids = [q for q in queries if q in rankings]
    for fold in folds_of(qids, n_folds, seed):
        held = set(fold)
        fit = [q for q in qids if q not in held]
        model, _ = train_fusion({q: queries[q] for q in fit}, {q: rankings[q] for q in fit},
                                {q: qrels[q] for q in fit if q in qrels}, fusion.builder, passage_text, C=C,
                                progress=False)
        weight, _ = tune_convex_weight({q: rankings[q] for q in fit}, {q: qrels[q] for q in fit if q in qrels},
                                       fusion.settings.retrievers, metric="mrr@10", missing_fill=fusion.fill,
                                       depth=fusion.depth)
        learned = LearnedStrategy(model, fusion.builder, passage_text)
        convex = ConvexStrategy({first: weight, second: 1.0 - weight}, fusion.settings.convex_norm, fusion.fill)
        for q in fold:
            runs["hybrid"][q] = learned.fuse(queries[q], rankings[q])
            runs["convex"][q] = convex.fuse(queries[q], rankings[q])
    return runs


def crossfit_holdout_runs(root, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
                          n_folds: int = 2, seed: int = 0, C: float = 1.0) -> dict[str, dict[str, Ranking]]:
    """:func:`crossfit_runs` with the first-stage candidates, fusion features and passages of an artifact
    directory (the fused searcher's own candidates, so the runs are what ``Retriever`` would rank)."""
    from hybrid.artifacts import stage_dir
    from hybrid.passage_store import PassageStore
    from hybrid.searchers import fused_searcher

    store = PassageStore.open(stage_dir(root, "data"))
    searcher = fused_searcher(root, "hybrid", store.get_many)
    fusion = FusionArtifacts.load(stage_dir(root, "fusion"))
    try:
        rankings = {q: searcher.candidates(text) for q, text in queries.items()}
    finally:
        searcher.close()
    return crossfit_runs(fusion, queries, rankings, qrels, store.get_many, n_folds, seed, C)


__all__ = ["crossfit_holdout_runs", "crossfit_runs", "folds_of"]
