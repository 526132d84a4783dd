"""Reranking the top of a ranking: order within depth, untouched tail, the interpolation, the search shape."""

from __future__ import annotations

import time

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


# ---- the time budget ------------------------------------------------------------------------------------------------

FUSED = [(f"p{i}", 10.0 - i) for i in range(8)]  # the first stage's ranking: p0 best


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedScorer:
    """Prefers later passages (p7 > p6 > ...); each passage scored advances ``clock`` by the next of ``costs``."""

    def __init__(self, clock: FakeClock, costs: list[float]) -> None:
        self.clock, self.costs, self.scored = clock, list(costs), []

    def score(self, query, passages):
        out = []
        for p in passages:
            self.clock.now += self.costs.pop(0) if len(self.costs) > 1 else self.costs[0]
            self.scored.append(p)
            out.append(float(p[1:]))
        return np.array(out)


class FixedBase:
    def search(self, q, k):
        return FUSED[:k]

    def batch_search(self, qs, k):
        return [FUSED[:k] for _ in qs]


def budgeted(costs: list[float], budget: float | None, depth: int = 5):
    clock = FakeClock()
    scorer = TimedScorer(clock, costs)
    searcher = RerankingSearcher(FixedBase(), scorer, lambda pids: list(pids), depth=depth, weight=None,
                                 time_budget_s=budget, clock=clock)
    return searcher, scorer


def pids(ranking):
    return [p for p, _ in ranking]


def assert_consistent(ranking):
    assert sorted(pids(ranking)) == sorted(pids(FUSED)) and len(set(pids(ranking))) == len(ranking)
    assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)


def test_candidates_are_scored_until_the_next_would_not_fit():
    searcher, scorer = budgeted([0.3], budget=1.0)
    out = searcher.search("q", 8)
    # 0.3 + 0.3 + 0.3 = 0.9 spent; a fourth (0.3 more) would end at 1.2 > 1.0
    assert scorer.scored == ["p0", "p1", "p2"]
    assert pids(out) == ["p2", "p1", "p0", "p3", "p4", "p5", "p6", "p7"]  # the scored prefix reordered, rest fused
    assert_consistent(out)
    stats = searcher.budget_stats()
    assert (stats.queries, stats.cut, stats.candidates_scored, stats.cut_rate) == (1, 1, 3, 1.0)


def test_without_a_cut_the_whole_depth_is_reranked():
    searcher, _ = budgeted([0.1], budget=1.0)
    out = searcher.search("q", 8)
    assert pids(out)[:5] == ["p4", "p3", "p2", "p1", "p0"] and pids(out)[5:] == ["p5", "p6", "p7"]
    assert searcher.budget_stats().cut == 0
    unlimited, _ = budgeted([5.0], budget=None)
    assert pids(unlimited.search("q", 8))[:5] == ["p4", "p3", "p2", "p1", "p0"]


def test_a_slow_first_candidate_stops_scoring_and_the_fused_order_stays():
    searcher, scorer = budgeted([0.6, 0.1], budget=1.0)
    out = searcher.search("q", 8)
    assert scorer.scored == ["p0"]  # 0.6 spent, and the next is taken to cost 0.6 as well
    assert pids(out) == pids(FUSED)
    assert_consistent(out)


def test_the_last_query_cost_guards_the_first_candidate_and_recovers():
    searcher, scorer = budgeted([0.6, 0.3], budget=0.5)
    searcher.search("q1", 8)  # first candidate: no estimate yet, scored (0.6); the second is not tried
    assert scorer.scored == ["p0"]
    out = searcher.search("q2", 8)  # 0.6 expected > 0.5: nothing is scored, the fused ranking comes back as is
    assert scorer.scored == ["p0"] and out == FUSED
    n = 2
    while scorer.scored == ["p0"] and n < 50:  # each cut query shrinks the guess by ESTIMATE_DECAY
        searcher.search(f"q{n + 1}", 8)
        n += 1
    assert scorer.scored[1:] == ["p0"]  # 0.6 x 0.96^k <= 0.5: scoring resumes, after a few cut queries, not at once
    assert 0.6 * searcher.ESTIMATE_DECAY ** (n - 2) <= 0.5 < 0.6 * searcher.ESTIMATE_DECAY ** (n - 3)
    stats = searcher.budget_stats()
    assert (stats.queries, stats.cut) == (n, n)
    searcher.reset_budget_stats()
    assert searcher.budget_stats().queries == 0


def test_a_query_cut_by_waiting_for_the_scorer_leaves_the_guess_alone():
    """Under concurrent calls a query may spend its budget waiting for another's scoring: that says nothing about
    what a candidate costs, so the guess must not decay once per waiting thread (8 threads: 0.96^7, ~25% too low)."""

    class WaitingLock:  # entering it takes `wait` seconds of the fake clock, as a contended lock would
        def __init__(self, clock: FakeClock) -> None:
            self.clock, self.wait = clock, 0.0

        def __enter__(self):
            self.clock.now += self.wait

        def __exit__(self, *exc):
            return False

    searcher, scorer = budgeted([0.3], budget=0.75)
    searcher._lock = lock = WaitingLock(scorer.clock)
    searcher.search("q1", 8)  # two candidates fit (0.6 s): the guess is 0.3 s each
    assert searcher._cost_estimate == pytest.approx(0.3)
    lock.wait = 0.6  # 0.15 s left after the wait: nothing fits
    assert searcher.search("q2", 8) == FUSED
    assert searcher._cost_estimate == pytest.approx(0.3)
    lock.wait = 0.0
    searcher._cost_estimate = 0.9  # a guess over the whole budget: nothing fits with or without a wait, so it decays
    searcher.search("q3", 8)
    assert searcher._cost_estimate == pytest.approx(0.9 * searcher.ESTIMATE_DECAY)


class SizeCountingScorer(TimedScorer):
    """A :class:`TimedScorer` that records the size of each batch it is asked to score."""

    def __init__(self, clock: FakeClock, costs: list[float]) -> None:
        super().__init__(clock, costs)
        self.sizes: list[int] = []

    def score(self, query, passages):
        self.sizes.append(len(passages))
        return super().score(query, passages)


def test_a_batch_that_no_longer_fits_shrinks_to_what_does():
    """A machine where the whole batch costs more than the budget reranks the prefix that fits, not nothing."""
    clock = FakeClock()
    scorer = SizeCountingScorer(clock, [0.17])
    searcher = RerankingSearcher(FixedBase(), scorer, lambda p: list(p), depth=5, weight=None, time_budget_s=0.75,
                                 clock=clock, batch_size=5)
    searcher.search("q1", 8)  # no estimate yet: the whole batch of 5 is scored (0.85 s, over the budget)
    out = searcher.search("q2", 8)  # 0.17 s per candidate: 4 fit in 0.75 s (0.68 s)
    assert scorer.sizes == [5, 4]
    assert pids(out) == ["p3", "p2", "p1", "p0", "p4", "p5", "p6", "p7"]
    assert clock.now == pytest.approx(0.85 + 0.68)
    stats = searcher.budget_stats()
    assert (stats.queries, stats.cut, stats.candidates_scored) == (2, 1, 9)


def test_the_next_query_is_sized_by_the_largest_batch_not_by_a_short_trailing_one():
    """A batch costs a fixed part plus a part per candidate, so a short batch at the end of the budget costs more per
    candidate than a full one: carried over, its cost would shrink the next query's first batch (E49)."""

    class OverheadScorer:
        def __init__(self, clock: FakeClock) -> None:
            self.clock, self.sizes = clock, []

        def score(self, query, passages):
            self.sizes.append(len(passages))
            self.clock.now += 0.05 + 0.1 * len(passages)  # 50 ms per call, 100 ms per candidate
            return np.array([float(p[1:]) for p in passages])

    clock = FakeClock()
    scorer = OverheadScorer(clock)
    searcher = RerankingSearcher(FixedBase(), scorer, lambda p: list(p), depth=8, weight=None, time_budget_s=0.75,
                                 clock=clock, batch_size=8)
    searcher.search("q1", 8)  # no estimate yet: all 8 in one batch (0.85 s), 0.10625 s per candidate
    for q in ("q2", "q3", "q4"):
        searcher.search(q, 8)
    # each later query: 7 x 0.10625 = 0.74 s fits; the batch of 7 then takes 0.75 s (0.107 s per candidate) and
    # nothing is left for a trailing batch; the next query is sized by that batch again, so it stays at 7
    assert scorer.sizes == [8, 7, 7, 7]
    scorer.sizes.clear()
    slow = RerankingSearcher(FixedBase(), scorer, lambda p: list(p), depth=8, weight=None, time_budget_s=0.9,
                             clock=clock, batch_size=8)
    slow.search("q1", 8)  # one batch of 8 (0.85 s)
    slow.search("q2", 8)  # 8 fit by the guess (0.85 s) ...
    slow._cost_estimate = 0.1  # ... say the box got faster: 9 would be guessed to fit, the depth caps it at 8
    slow.search("q3", 8)
    assert scorer.sizes == [8, 8, 8]


def test_a_warm_up_sizes_the_first_query_and_is_not_counted():
    clock = FakeClock()
    scorer = SizeCountingScorer(clock, [0.17])
    searcher = RerankingSearcher(FixedBase(), scorer, lambda p: list(p), depth=5, weight=None, time_budget_s=0.75,
                                 clock=clock, batch_size=5)
    searcher.warm_up("any query", size=2)  # 2 candidates at 0.17 s: the guess
    assert scorer.sizes == [2] and searcher.budget_stats().queries == 0
    searcher.search("q1", 8)  # without the warm-up all 5 would be scored (0.85 s, over the budget), as in
    assert scorer.sizes == [2, 4]  # test_a_batch_that_no_longer_fits_shrinks_to_what_does; now the 4 that fit
    assert searcher.budget_stats().candidates_scored == 4
    with pytest.raises(ValueError, match="size"):
        searcher.warm_up("q", size=0)


def test_the_budget_runs_on_the_real_clock():
    class SleepingScorer:
        def score(self, query, passages):
            time.sleep(0.1)
            return np.array([float(p[1:]) for p in passages])

    searcher = RerankingSearcher(FixedBase(), SleepingScorer(), lambda p: list(p), depth=5, weight=None,
                                 time_budget_s=0.29)
    out = searcher.search("q", 8)
    # 0.1 s each: at most two fit in 0.29 s (a third would end at 0.3 s or later); on a busy box a sleep can run
    # long enough that only one does. Either way the real clock cut the list, and the unscored keep their order.
    scored = searcher.budget_stats().candidates_scored
    assert scored in (1, 2)
    assert pids(out) == (["p1", "p0"] if scored == 2 else ["p0", "p1"]) + ["p2", "p3", "p4", "p5", "p6", "p7"]


def test_batch_search_applies_the_budget_per_query_and_refuses_a_string():
    searcher, _ = budgeted([0.3], budget=1.0)
    out = searcher.batch_search(["a", "b"], 4)
    assert [pids(r) for r in out] == [["p2", "p1", "p0", "p3"]] * 2
    assert searcher.budget_stats().candidates_scored == 6
    with pytest.raises(TypeError, match="list of queries"):
        searcher.batch_search("one query", 3)
    with pytest.raises(ValueError, match="time_budget_s"):
        budgeted([0.1], budget=0.0)


def test_candidates_are_scored_in_batches_within_the_budget():
    class CountingScorer(TimedScorer):
        calls = 0

        def score(self, query, passages):
            self.calls += 1
            return super().score(query, passages)

    clock = FakeClock()
    scorer = CountingScorer(clock, [0.3])
    searcher = RerankingSearcher(FixedBase(), scorer, lambda p: list(p), depth=5, weight=None, time_budget_s=1.0,
                                 clock=clock, batch_size=2)
    out = searcher.search("q", 8)
    # the first batch (p0, p1) costs 0.6 s; a second batch of 2 would end at 1.2 s > 1.0 s, a batch of 1 at 0.9 s
    assert scorer.scored == ["p0", "p1", "p2"] and scorer.calls == 2
    assert pids(out) == ["p2", "p1", "p0", "p3", "p4", "p5", "p6", "p7"]
    assert searcher.budget_stats().cut == 1
    unlimited = CountingScorer(FakeClock(), [0.3])
    whole = RerankingSearcher(FixedBase(), unlimited, lambda p: list(p), depth=5, weight=None, batch_size=2)
    assert pids(whole.search("q", 8))[:5] == ["p4", "p3", "p2", "p1", "p0"] and unlimited.calls == 3  # 2 + 2 + 1
    with pytest.raises(ValueError, match="batch_size"):
        RerankingSearcher(FixedBase(), scorer, lambda p: list(p), batch_size=0)
