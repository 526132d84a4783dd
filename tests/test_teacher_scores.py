"""Offline teacher scores: which train queries are scored, a killed run resumes into the same file, a file scored
with other settings is refused, and a committed file is checked before training on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dense.atomic import sha256_file
from dense.querygen.prompt import ForbiddenQueries, normalize_query
from dense.teacher_data import read_teacher_groups
from hybrid.teacher_scores import load_teacher_groups, manifest_path, score_teacher_groups, teacher_query_order

QUERIES = {f"q{i}": f"query number {i}" for i in range(12)}
FORBIDDEN = ForbiddenQueries(qids=frozenset({"d1"}), texts=frozenset({normalize_query("Query number 3?")}))


class FakeScorer:
    """Scores a passage by how many of the query's words it shares; counts the passages it scored."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.fail_after = 0, fail_after

    def query_length(self, query: str) -> int:
        return len(query.split())

    def score(self, query: str, passages: list[str]) -> np.ndarray:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of a chunk
        words = set(query.split())
        return np.array([-1.0 / (1 + len(words & set(p.split()))) for p in passages])


def _bm25(queries: list[str], k: int) -> list[list[tuple[str, float]]]:
    return [[(f"p{(int(q.split()[-1]) + j) % 20}", 10.0 - j) for j in range(k)] for q in queries]


def _texts(pids: list[str]) -> list[str]:
    return [f"passage {p} number {p[1:]}" for p in pids]


def test_order_skips_heldout_and_evaluation_queries_and_is_seeded() -> None:
    order = teacher_query_order(QUERIES, {"q5"}, FORBIDDEN, seed=0)
    assert set(order) == set(QUERIES) - {"q5", "q3"}  # q3's text equals an evaluation query, case/punct stripped
    assert order == teacher_query_order(QUERIES, {"q5"}, FORBIDDEN, seed=0)
    assert order != teacher_query_order(QUERIES, {"q5"}, FORBIDDEN, seed=1)


def test_a_killed_run_resumes_into_the_same_file(tmp_path: Path) -> None:
    order = teacher_query_order(QUERIES, set(), FORBIDDEN, seed=0)
    meta = {"teacher": "fake", "depth": 4}
    straight = tmp_path / "straight.jsonl"
    assert score_teacher_groups(order, QUERIES, _bm25, FakeScorer(), _texts, straight, 4, 8, meta, chunk=3,
                                progress=False) == 8
    killed = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        score_teacher_groups(order, QUERIES, _bm25, FakeScorer(fail_after=4), _texts, killed, 4, 8, meta, chunk=3,
                             progress=False)
    assert len(read_teacher_groups(killed)) == 3  # the first chunk was written, the second was lost
    resumed = FakeScorer()
    assert score_teacher_groups(order, QUERIES, _bm25, resumed, _texts, killed, 4, 8, meta, chunk=3,
                                progress=False) == 8
    assert resumed.calls == 5 and killed.read_text() == straight.read_text()
    groups = read_teacher_groups(killed)
    assert [g.qid for g in groups] == order[:8] and all(len(g.pids) == 4 for g in groups)
    assert groups[0].query_tokens == 3
    saved = json.loads(manifest_path(killed).read_text())
    assert saved["groups"] == 8 and saved["identity"] == meta
    # growing the file later continues the same order
    assert score_teacher_groups(order, QUERIES, _bm25, FakeScorer(), _texts, killed, 4, 10, meta, progress=False) == 10
    with pytest.raises(ValueError, match="other settings"):
        score_teacher_groups(order, QUERIES, _bm25, FakeScorer(), _texts, killed, 4, 11, {**meta, "depth": 5},
                             progress=False)
    with pytest.raises(ValueError, match="does not follow this query order"):
        score_teacher_groups(order[::-1], QUERIES, _bm25, FakeScorer(), _texts, killed, 4, 11, meta, progress=False)
    with pytest.raises(ValueError, match="only 11 train queries"):
        score_teacher_groups(order, QUERIES, _bm25, FakeScorer(), _texts, killed, 4, 12, meta, progress=False)


def test_a_committed_file_is_checked_before_training(tmp_path: Path) -> None:
    order = teacher_query_order(QUERIES, set(), ForbiddenQueries(), seed=0)
    path = tmp_path / "teacher.jsonl"
    score_teacher_groups(order, QUERIES, _bm25, FakeScorer(), _texts, path, 3, 6, {"t": 1}, progress=False)
    digest = sha256_file(path)
    assert len(load_teacher_groups(path, digest, ForbiddenQueries(), set())) == 6
    assert [g.qid for g in load_teacher_groups(path, "", ForbiddenQueries(), set(), limit=2)] == order[:2]
    assert load_teacher_groups(path, digest, ForbiddenQueries(), set(), min_passages=4) == []  # depth 3 < 4
    with pytest.raises(ValueError, match="holds only 6 groups"):
        load_teacher_groups(path, "", ForbiddenQueries(), set(), limit=7)
    with pytest.raises(ValueError, match="sha256"):
        load_teacher_groups(path, "0" * 64, ForbiddenQueries(), set())
    with pytest.raises(ValueError, match="held-out train query"):
        load_teacher_groups(path, digest, ForbiddenQueries(), {order[2]})
    forbidden = ForbiddenQueries(texts=frozenset({normalize_query(QUERIES[order[4]].upper() + "!")}))
    with pytest.raises(ValueError, match="forbidden"):
        load_teacher_groups(path, digest, forbidden, set())
    with pytest.raises(FileNotFoundError, match="score_teacher"):
        load_teacher_groups(tmp_path / "none.jsonl", "", ForbiddenQueries(), set())
