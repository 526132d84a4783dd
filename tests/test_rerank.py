"""Reranking the top of a ranking: order within depth, untouched tail, the interpolation, the search shape."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid.rerank import RerankingSearcher, rerank

TEXTS = {"a": "alpha", "b": "beta", "c": "gamma", "d": "delta"}
RANKING = [("a", 4.0), ("b", 3.0), ("c", 2.0), ("d", 1.0)]


class LengthScorer:
    """Prefers passages whose text contains the query word; counts calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score(self, query, passages):
        self.calls.append(list(passages))
        return np.array([1.0 if query in p else 0.0 for p in passages])


def texts(pids):
    return [TEXTS[p] for p in pids]


def test_scorer_alone_reorders_only_the_top_depth() -> None:
    scorer = LengthScorer()
    out = rerank("gamma", RANKING, scorer, texts, depth=3, weight=None)
    assert [p for p, _ in out] == ["c", "a", "b", "d"]
    assert scorer.calls == [["alpha", "beta", "gamma"]]  # only the top 3 were scored
    scores = [s for _, s in out]
    assert scores == sorted(scores, reverse=True)


def test_interpolation_keeps_the_first_stage_when_the_scorer_is_flat() -> None:
    out = rerank("zzz", RANKING, LengthScorer(), texts, depth=4, weight=1.0)
    assert [p for p, _ in out] == ["a", "b", "c", "d"]


def test_interpolation_weighs_both_signals() -> None:
    # first-stage z of a..d: +1.34,+0.45,-0.45,-1.34; scorer z for "delta": d=+1.73, others -0.58
    assert [p for p, _ in rerank("delta", RANKING, LengthScorer(), texts, 4, weight=1.0)][:2] == ["a", "d"]
    assert [p for p, _ in rerank("delta", RANKING, LengthScorer(), texts, 4, weight=5.0)][0] == "d"


def test_searcher_shape_and_bad_depth() -> None:
    class Base:
        def search(self, q, k):
            return RANKING[:k]

        def batch_search(self, qs, k):
            return [RANKING[:k] for _ in qs]

    s = RerankingSearcher(Base(), LengthScorer(), texts, depth=2, weight=None)
    assert [p for p, _ in s.search("beta", 1)] == ["b"]
    assert [[p for p, _ in r] for r in s.batch_search(["beta", "alpha"], 3)] == [["b", "a", "c"], ["a", "b", "c"]]
    assert rerank("x", [], LengthScorer(), texts, 3) == []
    with pytest.raises(ValueError, match="depth"):
        RerankingSearcher(Base(), LengthScorer(), texts, depth=0)


def test_score_cache_resumes_and_refuses_another_scorer(tmp_path) -> None:
    from hybrid.rerank import PairScoreCache, score_run_heads

    run = {"q1": RANKING, "q2": RANKING[::-1]}
    queries = {"q1": "beta", "q2": "alpha"}
    scorer = LengthScorer()
    cache = PairScoreCache(tmp_path / "s.jsonl", "length-v1")
    heads, seconds = score_run_heads(run, queries, scorer, texts, 2, cache, progress=False)
    assert heads["q1"].tolist() == [0.0, 1.0] and len(seconds) == 2
    with (tmp_path / "s.jsonl").open("a") as f:
        f.write('{"qid": "q3", "pid"')  # a record cut by a crash
    again = PairScoreCache(tmp_path / "s.jsonl", "length-v1")
    heads2, seconds2 = score_run_heads(run, queries, LengthScorer(), texts, 2, again, progress=False)
    assert seconds2 == [] and {q: h.tolist() for q, h in heads2.items()} == {q: h.tolist() for q, h in heads.items()}
    again.add("q3", ["a"], [0.5])  # appends after the cut record was dropped
    assert PairScoreCache(tmp_path / "s.jsonl", "length-v1").get("q3", ["a"]).tolist() == [0.5]
    with pytest.raises(ValueError, match="not 'other'"):
        PairScoreCache(tmp_path / "s.jsonl", "other")
