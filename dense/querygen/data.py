"""The MS MARCO inputs of query generation, read through the one reader :mod:`dense.msmarco_files`.

Errors are :class:`dense.msmarco_files.DataFormatError` naming the file and line.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from dense.msmarco_files import iter_tsv_rows
from dense.msmarco_files import read_qrels as read_graded_qrels
from dense.querygen.prompt import FewShotExample

logger = logging.getLogger(__name__)


def iter_tsv(path: str | Path) -> Iterator[tuple[str, str]]:
    """``(id, text)`` rows of a two-column TSV (``collection.tsv``, ``queries.<split>.tsv``), in file order."""
    kind = "passage" if Path(path).name.startswith("collection") else "query"
    return iter_tsv_rows(path, kind)


def read_tsv(path: str | Path, ids: Collection[str] | None = None) -> dict[str, str]:
    """``{id: text}`` of a two-column TSV, restricted to ``ids`` when given."""
    return {i: t for i, t in iter_tsv(path) if ids is None or i in ids}


def read_qrels(path: str | Path, min_grade: int = 1) -> dict[str, list[str]]:
    """``{qid: [pid, ...]}`` of TREC qrels (``qid 0 pid grade``) with grade >= ``min_grade``, in file order."""
    graded = read_graded_qrels(path)
    relevant = {qid: [pid for pid, grade in judged.items() if grade >= min_grade] for qid, judged in graded.items()}
    return {qid: pids for qid, pids in relevant.items() if pids}


def read_collection_pids(path: str | Path) -> list[str]:
    """All pids of ``collection.tsv`` in file order (reads ids only)."""
    return [i for i, _ in iter_tsv(path)]


def sample_pids(pids: list[str], max_passages: int | None, seed: int) -> list[str]:
    """``max_passages`` pids drawn without replacement by ``seed`` (all when ``None``), in collection order."""
    if max_passages is None or max_passages >= len(pids):
        return list(pids)
    chosen = set(random.Random(seed).sample(pids, max_passages))
    return [p for p in pids if p in chosen]


def train_examples(
    passages: Mapping[str, str], queries_path: str | Path, qrels_path: str | Path
) -> list[FewShotExample]:
    """Real train (query, positive passage) pairs whose passage is in ``passages``, sorted by (qid, pid).

    On marco43k that is 383 pairs of 369 queries: the only supervised pairs with their passage in the pool.
    """
    queries = read_tsv(queries_path)
    qrels = read_qrels(qrels_path)
    examples = [
        FewShotExample(qid=qid, query=queries[qid], pid=pid, passage=passages[pid])
        for qid, pids in qrels.items()
        if qid in queries
        for pid in pids
        if pid in passages
    ]
    if not examples:
        raise ValueError(
            f"no train pair of {qrels_path} has its positive passage in the collection ({len(passages)} passages); "
            "check that --train-qrels and --collection belong to the same data directory"
        )
    examples.sort(key=lambda e: (e.qid, e.pid))
    logger.info("%d train pairs (%d queries) have their positive in the collection", len(examples),
                len({e.qid for e in examples}))
    return examples
