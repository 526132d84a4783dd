"""Build a labelled training set of fusion features from qrels, and fit the fusion model on it."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from fusion.features import FeatureBuilder, PassageText
from fusion.model import FusionModel
from fusion.normalise import Ranking

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSetStats:
    """What went into (and was left out of) a fusion training set."""

    queries_in: int
    queries_used: int
    dropped_no_qrels: int  # no qrel with grade >= min_grade at all
    dropped_no_positive_candidate: int  # relevant passages exist but no retriever put one in its top-depth
    candidates: int
    positives: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def build_training_set(
    queries: Mapping[str, str],
    rankings: Mapping[str, Mapping[str, Ranking]],
    qrels: Mapping[str, Mapping[str, int]],
    builder: FeatureBuilder,
    passage_text: PassageText,
    progress: bool = True,
    min_grade: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, TrainingSetStats]:
    """Feature rows for every query's candidates, labelled 1 when the qrel grade is ``>= min_grade``.

    Queries without any positive among their candidates teach the model nothing about ranking and are dropped
    (counted in the stats). Returns ``(X float32 (n, f), y int8 (n,), groups (n,) qid strings, stats)``; ``groups``
    keeps rows of one query together for query-level cross-validation.
    """
    absent = [q for q in queries if q not in rankings]
    if absent:
        raise ValueError(
            f"{len(absent)} of {len(queries)} training queries have no rankings (e.g. {absent[:5]}); "
            "run the retrievers on every training query before building the fusion training set"
        )
    blocks_X: list[np.ndarray] = []
    blocks_y: list[np.ndarray] = []
    blocks_g: list[np.ndarray] = []
    no_qrels = no_positive = 0
    start = time.perf_counter()
    for qid, query in tqdm(queries.items(), desc="fusion features", unit="query", disable=not progress):
        relevant = {pid for pid, grade in qrels.get(qid, {}).items() if grade >= min_grade}
        if not relevant:
            no_qrels += 1
            continue
        cands = builder.build(query, rankings[qid], passage_text)
        y = np.fromiter((pid in relevant for pid in cands.pids), dtype=np.int8, count=len(cands))
        if not y.any():
            no_positive += 1
            continue
        blocks_X.append(cands.X)
        blocks_y.append(y)
        blocks_g.append(np.full(len(cands), qid, dtype=object))
    elapsed = time.perf_counter() - start
    n_features = len(builder.feature_names)
    X = np.concatenate(blocks_X) if blocks_X else np.empty((0, n_features), dtype=np.float32)
    y = np.concatenate(blocks_y) if blocks_y else np.empty(0, dtype=np.int8)
    groups = np.concatenate(blocks_g).astype(str) if blocks_g else np.empty(0, dtype=str)
    stats = TrainingSetStats(
        queries_in=len(queries),
        queries_used=len(blocks_X),
        dropped_no_qrels=no_qrels,
        dropped_no_positive_candidate=no_positive,
        candidates=len(y),
        positives=int(y.sum()),
    )
    logger.info(
        "fusion training set: %d rows (%d positive) from %d/%d queries in %.1f s (%.1f queries/s); dropped %d "
        "without qrels, %d without a relevant candidate",
        stats.candidates,
        stats.positives,
        stats.queries_used,
        stats.queries_in,
        elapsed,
        len(queries) / elapsed if elapsed > 0 else float("inf"),
        no_qrels,
        no_positive,
    )
    return X, y, groups, stats


def train_fusion(
    queries: Mapping[str, str],
    rankings: Mapping[str, Mapping[str, Ranking]],
    qrels: Mapping[str, Mapping[str, int]],
    builder: FeatureBuilder,
    passage_text: PassageText,
    C: float = 1.0,
    balanced: bool = False,
    progress: bool = True,
    min_grade: int = 1,
) -> tuple[FusionModel, TrainingSetStats]:
    """Build the training set and fit a :class:`FusionModel`; the stats are also kept in ``model.metadata``."""
    X, y, _, stats = build_training_set(queries, rankings, qrels, builder, passage_text, progress, min_grade)
    if stats.queries_used == 0:
        raise ValueError(
            f"no training query has a relevant passage among its candidates ({stats.as_dict()}); "
            "check that the qrels' qids/pids match the rankings and that depth is large enough"
        )
    model = FusionModel(builder.feature_names, C=C, balanced=balanced).fit(X, y)
    model.metadata = {
        "training_set": stats.as_dict(),
        "depth": builder.depth,
        "retrievers": list(builder.retrievers),
        "rrf_k": builder.rrf_k,
        "missing_fill": asdict(builder.missing_fill),
        "analyzer": builder.analyzer.to_dict(),
        "min_grade": min_grade,
    }
    return model, stats


__all__ = ["TrainingSetStats", "build_training_set", "train_fusion"]
