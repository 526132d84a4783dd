"""RRF and convex-combination baselines, and tuning the convex weight."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.baselines import convex, rrf, tune_convex_weight
from fusion.normalise import FillPolicy

RANKINGS = {
    "bm25": [("a", 10.0), ("b", 8.0), ("c", 6.0)],
    "dense": [("b", 0.9), ("d", 0.5)],
}


def test_rrf_matches_a_hand_computation() -> None:
    fused = dict(rrf(RANKINGS, k=60))
    expected = {"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 63, "d": 1 / 62}
    assert fused == pytest.approx(expected)
    assert [pid for pid, _ in rrf(RANKINGS, k=60)] == ["b", "a", "d", "c"]
    # depth 1: a and b tie at 1/(k+1); ties keep first-appearance order (bm25 listed first).
    assert rrf(RANKINGS, k=10, depth=1) == [("a", 1 / 11), ("b", 1 / 11)]
    assert rrf({}) == []


def test_convex_matches_a_hand_computation() -> None:
    # min-max: bm25 a=1, b=.5, c=0 ; dense b=1, d=0. Missing: bm25 fill 0, dense fill 0.
    fused = dict(convex(RANKINGS, {"bm25": 0.3, "dense": 0.7}, norm="minmax"))
    assert fused == pytest.approx({"a": 0.3, "b": 0.3 * 0.5 + 0.7, "c": 0.0, "d": 0.0})
    # z: bm25 z = [1.2247, 0, -1.2247]; dense z = [1, -1]; missing gets the list's min z.
    zb = 2 / np.std([10.0, 8.0, 6.0])
    fused_z = dict(convex(RANKINGS, {"bm25": 1.0, "dense": 1.0}, norm="z"))
    assert fused_z == pytest.approx({"a": zb - 1, "b": 0 + 1, "c": -zb - 1, "d": -zb - 1})
    # one std below the minimum for missing candidates.
    fused_fill = dict(convex(RANKINGS, {"bm25": 1.0, "dense": 1.0}, norm="z", missing_fill=FillPolicy(std_below=1.0)))
    assert fused_fill["d"] == pytest.approx((-zb - 1) + -1) and fused_fill["a"] == pytest.approx(zb + (-1 - 1))
    with pytest.raises(ValueError, match=r"\['rerank'\] that have no ranking"):
        convex(RANKINGS, {"bm25": 0.5, "rerank": 0.5})


def one_sided_queries(n: int, right: str) -> tuple[dict, dict]:
    """Queries where ``right`` always ranks the relevant passage first and the other retriever ranks it last.

    The wrong passage is the other retriever's top hit and a close second for ``right`` (min-max 0.99), so any
    weight below ~0.99 on ``right`` lets it win: only the extreme grid point is optimal.
    """
    other = "dense" if right == "bm25" else "bm25"
    rankings, qrels = {}, {}
    for i in range(n):
        rel, bad = f"q{i}-rel", f"q{i}-bad"
        fillers = [f"q{i}-f{j}" for j in range(5)]
        good_list = [(rel, 10.0), (bad, 9.9)] + list(zip(fillers, np.linspace(5.0, 0.0, 5).tolist()))
        other_list = [(bad, 1.0)] + list(zip(fillers, np.linspace(0.9, 0.2, 5).tolist())) + [(rel, 0.0)]
        rankings[f"q{i}"] = {right: good_list, other: other_list}
        qrels[f"q{i}"] = {rel: 1, bad: 0}
    return rankings, qrels


@pytest.mark.parametrize(("right", "best_weight"), [("bm25", 1.0), ("dense", 0.0)])
def test_convex_tuning_picks_the_retriever_that_is_always_right(right: str, best_weight: float) -> None:
    rankings, qrels = one_sided_queries(8, right)
    best, table = tune_convex_weight(rankings, qrels, retrievers=("bm25", "dense"), metric="mrr@10")
    assert best == best_weight
    assert len(table) == 21 and dict(table)[best_weight] == 1.0
    assert max(v for w, v in table if w != best_weight) < 1.0
    best_r1, table_r1 = tune_convex_weight(rankings, qrels, metric="r@1", grid=[0.0, 0.5, 1.0])
    assert best_r1 == best_weight and dict(table_r1)[0.5] == 0.0


def test_tuning_ties_take_the_middle_and_bad_inputs_are_refused() -> None:
    rankings = {"q": {"bm25": [("rel", 1.0)], "dense": [("rel", 1.0)]}}
    best, table = tune_convex_weight(rankings, {"q": {"rel": 1}}, grid=[0.0, 0.25, 0.5, 0.75, 1.0])
    assert best == 0.5 and all(v == 1.0 for _, v in table)
    with pytest.raises(ValueError, match="exactly two"):
        tune_convex_weight(rankings, {"q": {"rel": 1}}, retrievers=("bm25", "dense", "rerank"))
    with pytest.raises(ValueError, match="no training query"):
        tune_convex_weight(rankings, {"other": {"rel": 1}})
    with pytest.raises(ValueError, match="unknown metric"):
        tune_convex_weight(rankings, {"q": {"rel": 1}}, metric="ndcg")  # type: ignore[arg-type]
