"""Offline teacher scores for distillation: real train queries, their BM25 top ``depth`` in the collection, and the
reranker's query-likelihood score of each (``dense.teacher_data`` holds the format).

Why real train queries and not the synthetic ones: a synthetic query was written by this same SmolLM2 from its
positive passage, so the teacher's likelihood of that pair is inflated by construction and the group's distribution
says little beyond "the positive"; a real train query has no such bias, and it is the query distribution the
evaluation draws from. None of the 50k train queries needs its judged passage in the pool: the teacher labels
whatever the pool has. The selection holdout (the config's held-out train queries) is never scored, nor any train
query whose text equals an evaluation query after case and punctuation are stripped.

The output grows by appending one line per query, fsynced a chunk of queries at a time, in a fixed seeded order, so a
killed run loses at most one chunk and resumes after it, and a file with N groups is always the first N queries of
that order; the manifest beside it is rewritten atomically after every chunk and records the scorer, depth, seed,
exclusions and counts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from dense.atomic import drop_partial_last_line, sha256_file, write_json_atomic
from dense.querygen.prompt import ForbiddenQueries, normalize_query
from dense.teacher_data import TeacherGroup, read_teacher_groups

logger = logging.getLogger(__name__)

Ranking = list[tuple[str, float]]


class LikelihoodScorer(Protocol):
    def score(self, query: str, passages: Sequence[str]) -> np.ndarray: ...

    def query_length(self, query: str) -> int: ...


def manifest_path(out: str | os.PathLike) -> Path:
    return Path(f"{out}.manifest.json")


def teacher_query_order(queries: Mapping[str, str], exclude_qids: Collection[str], forbidden: ForbiddenQueries,
                        seed: int) -> list[str]:
    """Train qids in the order they are scored: a seeded permutation without the excluded ids and without queries
    equal (case and punctuation stripped) to an evaluation query."""
    kept = sorted(q for q, text in queries.items()
                  if q not in exclude_qids and q not in forbidden.qids and normalize_query(text) not in forbidden.texts)
    order = np.random.default_rng(seed).permutation(len(kept))
    return [kept[i] for i in order]


def _done_qids(out: Path) -> list[str]:
    """Qids already in ``out`` (a line cut by a crash is removed first, so appends stay valid)."""
    if not out.is_file():
        return []
    drop_partial_last_line(out)
    return [json.loads(line)["qid"] for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]


def score_teacher_groups(
    order: Sequence[str],
    queries: Mapping[str, str],
    bm25_batch_search: Callable[[list[str], int], list[Ranking]],
    scorer: LikelihoodScorer,
    passage_text: Callable[[list[str]], list[str]],
    out: str | os.PathLike,
    depth: int,
    n_queries: int,
    manifest: Mapping[str, Any],
    chunk: int = 25,
    progress: bool = True,
) -> int:
    """Score the first ``n_queries`` of ``order`` into ``out`` (resuming after what it holds); returns the number of
    groups in the file. ``manifest`` (the scorer's description, depth, seed, ...) must equal the one a previous run
    wrote, or the run is refused rather than mixing two teachers in one file."""
    out = Path(out)
    if depth < 2:
        raise ValueError(f"depth must be >= 2 (a group needs two passages to compare), got {depth}")
    if n_queries > len(order):
        raise ValueError(f"{n_queries} queries asked for, but only {len(order)} train queries are eligible")
    meta_path = manifest_path(out)
    identity = dict(manifest)
    done = _done_qids(out)
    if done:
        if not meta_path.is_file():
            raise ValueError(f"{out} exists without its manifest {meta_path}: delete it or restore the manifest")
        saved = json.loads(meta_path.read_text(encoding="utf-8"))
        if saved.get("identity") != json.loads(json.dumps(identity)):
            raise ValueError(f"{out} was scored with other settings ({meta_path}: {saved.get('identity')!r}); "
                             "use another output file or delete it")
        position = {q: i for i, q in enumerate(order)}
        if any(q not in position for q in done) or [position[q] for q in done] != sorted(position[q] for q in done):
            raise ValueError(f"{out} does not follow this query order (another seed or exclusion list?)")
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = 0.0
    if meta_path.is_file() and done:
        seconds = float(json.loads(meta_path.read_text(encoding="utf-8")).get("seconds", 0.0))
    # resume after the last query written (queries BM25 found < 2 passages for are skipped, so not len(done))
    resume_at = position[done[-1]] + 1 if done else 0
    todo = list(order[resume_at:n_queries])
    n_done, skipped = len(done), 0

    def write_manifest() -> None:
        write_json_atomic(meta_path, {"identity": identity, "groups": n_done, "seconds": round(seconds, 1),
                                      "seconds_per_group": round(seconds / max(n_done, 1), 3)})

    bar = tqdm(total=n_queries, initial=n_done, desc="teacher scores", unit="query", disable=not progress)
    for start in range(0, len(todo), chunk):
        qids = todo[start : start + chunk]
        t0 = time.perf_counter()
        rankings = bm25_batch_search([queries[q] for q in qids], depth)
        lines = []
        for qid, ranking in zip(qids, rankings, strict=True):
            pids = [p for p, _ in ranking[:depth]]
            if len(pids) < 2:
                skipped += 1
                logger.warning("qid %s: BM25 found %d passage(s); no group written", qid, len(pids))
                lines.append(None)
                continue
            scores = scorer.score(queries[qid], passage_text(pids))
            group = TeacherGroup(qid, queries[qid], tuple(pids), tuple(float(s) for s in scores),
                                 scorer.query_length(queries[qid]))
            lines.append(json.dumps(group.to_json(), ensure_ascii=False))
            bar.update(1)
        with out.open("a", encoding="utf-8") as f:
            for line in lines:
                if line is not None:
                    f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        n_done += sum(line is not None for line in lines)
        seconds += time.perf_counter() - t0
        write_manifest()
    bar.close()
    if skipped:
        logger.warning("%d queries had fewer than 2 BM25 results and were left out", skipped)
    write_manifest()
    return n_done


def load_teacher_groups(path: str | os.PathLike, expected_sha256: str, forbidden: ForbiddenQueries,
                        heldout_qids: Collection[str], limit: int = 0, min_passages: int = 2) -> list[TeacherGroup]:
    """A committed teacher file, checked before training on it: its sha256 (when the config gives one), and that
    none of its queries is a held-out train query or an evaluation query; the first ``limit`` groups (0 = all), less
    those with fewer than ``min_passages`` passages (queries BM25 found few passages for; the count is logged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dense.teacher_scores = {str(path)!r} does not exist; make it with "
                                "scripts/score_teacher.py or restore the committed file (git checkout)")
    if expected_sha256 and (actual := sha256_file(path)) != expected_sha256:
        raise ValueError(f"{path}: sha256 {actual} but the config expects {expected_sha256}; restore the committed "
                         "file, or, if it was rescored on purpose, put the new checksum in dense.teacher_scores_sha256")
    groups = read_teacher_groups(path, limit or None)
    heldout = set(heldout_qids)
    for g in groups:
        reason = "a held-out train query (the selection set)" if g.qid in heldout else \
            forbidden.why_forbidden(g.qid, g.query)
        if reason:
            raise ValueError(f"{path}: qid {g.qid} ({g.query!r}) may not be trained on: {reason}")
    if limit and len(groups) < limit:
        raise ValueError(f"dense.teacher_groups = {limit} but {path} holds only {len(groups)} groups")
    kept = [g for g in groups if len(g.pids) >= min_passages]
    if len(kept) < len(groups):
        logger.info("teacher groups: %d of %d kept (%d have fewer than %d passages)", len(kept), len(groups),
                    len(groups) - len(kept), min_passages)
    return kept


def score_teacher_file(root: str | os.PathLike, data_dir: str | os.PathLike, heldout_qids: Collection[str],
                       out: str | os.PathLike, n_queries: int, depth: int = 10, seed: int = 0,
                       train_split: str = "train", command: str = "", progress: bool = True) -> int:
    """:func:`score_teacher_groups` with an artifact directory's BM25 index and rerank scorer (its model, prompt,
    passage cut and dtype) over ``data_dir``'s train queries; returns the number of groups in ``out``."""
    from hybrid.artifacts import stage_dir
    from hybrid.msmarco import MsMarcoDir, PassageStore
    from hybrid.searchers import RerankSettings, bm25_searcher, rerank_scorer

    root = Path(root)
    if n_queries < 1:
        raise ValueError(f"the number of queries to score must be >= 1, got {n_queries}")
    settings = RerankSettings.read(root)
    if settings.model_dir is None or settings.config.scorer != "ql":
        raise ValueError(f"{root} has no query-likelihood rerank stage; run the pipeline with rerank enabled first")
    queries = MsMarcoDir(Path(data_dir)).queries(train_split)
    forbidden = ForbiddenQueries.from_data_dir(data_dir, train_split)
    heldout = set(heldout_qids)
    order = teacher_query_order(queries, heldout, forbidden, seed)
    scorer = rerank_scorer(settings)
    c = settings.config
    manifest = {
        "teacher": "query likelihood, mean log P(query | passage) per query token",
        "model": settings.model_dir.name,
        "max_passage_tokens": c.max_passage_tokens,
        "system_prompt": c.system_prompt,
        "dtype": getattr(scorer, "dtype", "float32"),
        "candidates": f"BM25 top {depth} of the collection",
        "depth": depth,
        "seed": seed,
        "train_queries": len(queries),
        "eligible": len(order),
        "excluded_heldout": len(heldout & set(queries)),
        "excluded_as_evaluation_queries": len(set(queries) - heldout) - len(order),
        "command": command,
    }
    store = PassageStore.open(stage_dir(root, "data"))
    searcher = bm25_searcher(root)
    try:
        return score_teacher_groups(order, queries, searcher.batch_search, scorer, store.get_many, out, depth,
                                    n_queries, manifest, progress=progress)
    finally:
        searcher.close()
