"""Evaluation harness: metrics against hand computations and a second implementation, run files, latency."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import ir_measures
import pytest

from hybrid.evaluation import (
    as_ranking,
    compute_metrics,
    evaluate_searcher,
    load_evaluation,
    markdown_table,
    measure_latency,
    per_query_metrics,
    read_trec_run,
    run_searcher,
    write_trec_run,
)
from hybrid.rerank import BudgetStats

QRELS = {
    "q1": {"a": 3, "b": 1, "c": 2},
    "q2": {"d": 1},
    "q3": {"e": 2},
    "q4": {"f": 0},  # judged, nothing relevant: never counted
    "q5": {"g": 1},  # relevant passage, but the run has no ranking for q5: counts as zeros
}
RUN = {
    "q1": [("x", 3.0), ("a", 2.0), ("b", 1.0)],
    "q2": [("d", 5.0), ("y", 4.0)],
    "q3": [("z", 0.9), ("w", 0.8), ("e", 0.7)],
    "q4": [("f", 1.0)],
}
# nDCG@10 with linear gains (trec_eval): q1 ranks x(0) a(3) b(1); ideal order a(3) c(2) b(1)
NDCG_Q1 = (3 / math.log2(3) + 1 / math.log2(4)) / (3 + 2 / math.log2(3) + 1 / math.log2(4))
NDCG_Q3 = (2 / math.log2(4)) / 2  # e (grade 2) at rank 3; ideal puts it first


@dataclass(frozen=True)
class FakeResult:
    document_id: str
    document_text: str
    score: float


class FakeSearcher:
    """Answers from a fixed ``{query text: ranking}``; counts calls; advances a fake clock per search."""

    def __init__(self, rankings: dict[str, list[tuple[str, float]]], clock: list[float] | None = None) -> None:
        self.rankings = rankings
        self.calls: list[str] = []
        self.clock = clock

    def search(self, query: str, k: int) -> list[FakeResult]:
        self.calls.append(query)
        if self.clock is not None:
            self.clock[0] += len(self.calls) / 1000.0  # the i-th call takes i ms
        return [FakeResult(pid, f"text of {pid}", s) for pid, s in self.rankings.get(query, [])[:k]]

    def batch_search(self, queries: list[str], k: int) -> list[list[FakeResult]]:
        return [self.search(q, k) for q in queries]


def test_metrics_match_hand_computation_rel_level_1() -> None:
    m = compute_metrics(RUN, QRELS, rel_level=1)
    assert m["n"] == 4  # q1 q2 q3 q5; q4 has no relevant passage
    assert m["R@1"] == pytest.approx(1 / 4)  # only q2's top passage is relevant
    assert m["MRR@10"] == pytest.approx((1 / 2 + 1 + 1 / 3 + 0) / 4)
    assert m["R@10"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)  # q1 finds a and b of a, b, c
    assert m["R@100"] == m["R@1000"] == m["R@10"]
    assert m["nDCG@10"] == pytest.approx((NDCG_Q1 + 1 + NDCG_Q3 + 0) / 4)


def test_rel_level_2_counts_only_grade_2_and_above() -> None:
    m = compute_metrics(RUN, QRELS, rel_level=2)
    assert m["n"] == 2  # q1 (a, c) and q3 (e); q2 and q5 only have grade-1 passages
    assert m["R@1"] == 0.0
    assert m["MRR@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)  # b (grade 1) is not relevant at level 2
    assert m["R@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["nDCG@10"] == pytest.approx((NDCG_Q1 + NDCG_Q3) / 2)  # graded gains still use every grade
    with pytest.raises(ValueError, match="grade >= 4"):
        compute_metrics(RUN, QRELS, rel_level=4)


def test_missing_and_empty_rankings_count_as_zero() -> None:
    per_query = per_query_metrics({**RUN, "q2": []}, QRELS, rel_level=1)
    for metric, values in per_query.items():
        assert set(values) == {"q1", "q2", "q3", "q5"}, metric
        assert values["q5"] == 0.0 and values["q2"] == 0.0, metric
    # ir_measures alone would average over the ranked queries only: the explicit zeros change the mean
    only_ranked = compute_metrics({q: RUN[q] for q in ("q1", "q2", "q3")}, {q: QRELS[q] for q in ("q1", "q2", "q3")})
    assert compute_metrics(RUN, QRELS)["MRR@10"] == pytest.approx(only_ranked["MRR@10"] * 3 / 4)


def test_tied_scores_are_evaluated_in_the_returned_order() -> None:
    qrels = {"t1": {"b": 1}, "t2": {"a": 1}}
    run = {"t1": [("a", 1.0), ("b", 1.0)], "t2": [("b", 1.0), ("a", 1.0)]}
    m = compute_metrics(run, qrels)
    assert m["R@1"] == 0.0 and m["MRR@10"] == pytest.approx(0.5)  # the relevant passage is second both times
    # raw scores would let ir_measures re-sort one of the two ties, so this test can fail without the rewrite
    raw = ir_measures.calc_aggregate([ir_measures.Success(rel=1) @ 1], qrels, {q: dict(r) for q, r in run.items()})
    assert list(raw.values())[0] == pytest.approx(0.5)


def test_duplicate_passage_keeps_its_first_position() -> None:
    m = compute_metrics({"q": [("a", 3.0), ("x", 2.0), ("a", 1.0)]}, {"q": {"a": 1}})
    assert m["R@1"] == 1.0 and m["MRR@10"] == 1.0 and m["R@10"] == 1.0
    assert m["nDCG@10"] == pytest.approx(1.0)  # counted once, at rank 1: a second copy would lift nDCG above 1


def _reference_metrics(ranking: list[str], judged: dict[str, int], rel: int) -> dict[str, float]:
    """Second, independent implementation straight from the definitions."""
    relevant = {p for p, g in judged.items() if g >= rel}
    first = next((i for i, p in enumerate(ranking[:10]) if p in relevant), None)
    dcg = sum(judged.get(p, 0) / math.log2(i + 2) for i, p in enumerate(ranking[:10]) if judged.get(p, 0) > 0)
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    out = {
        "R@1": float(bool(ranking) and ranking[0] in relevant),
        "MRR@10": 0.0 if first is None else 1 / (first + 1),
        "nDCG@10": dcg / idcg if idcg else 0.0,
    }
    for c in (10, 100, 1000):
        out[f"R@{c}"] = len(relevant & set(ranking[:c])) / len(relevant)
    return out


@pytest.mark.parametrize("rel", [1, 2])
def test_metrics_agree_with_an_independent_implementation_on_a_random_run(rel: int) -> None:
    rng = random.Random(rel)
    pool = [f"p{i}" for i in range(300)]
    qrels, run = {}, {}
    for i in range(60):
        qid = f"q{i}"
        qrels[qid] = {p: rng.choice([0, 1, 1, 2, 3]) for p in rng.sample(pool, rng.randint(1, 4))}
        if rng.random() < 0.9:  # some queries have no ranking at all
            # rounded scores make ties common; the order given is what counts
            ranking = sorted(((p, round(rng.random(), 1)) for p in rng.sample(pool, 150)), key=lambda x: -x[1])
            run[qid] = ranking
    per_query = per_query_metrics(run, qrels, rel_level=rel)
    counted = [q for q in qrels if any(g >= rel for g in qrels[q].values())]
    assert counted and set(per_query["R@1"]) == set(counted)
    for qid in counted:
        expected = _reference_metrics([p for p, _ in run.get(qid, [])], qrels[qid], rel)
        for metric, value in expected.items():
            assert per_query[metric][qid] == pytest.approx(value), (metric, qid)
    means = compute_metrics(run, qrels, rel)
    assert means["MRR@10"] == pytest.approx(sum(per_query["MRR@10"].values()) / len(counted))


def test_as_ranking_accepts_pairs_and_result_objects() -> None:
    assert as_ranking([("a", 1), ("b", 0.5)]) == [("a", 1.0), ("b", 0.5)]
    assert as_ranking([FakeResult("a", "t", 2.0)]) == [("a", 2.0)]
    with pytest.raises(TypeError, match="result #1"):
        as_ranking([("a", 1.0), "b"])


def test_run_searcher_keeps_qids_and_order_across_batches() -> None:
    searcher = FakeSearcher({f"text {i}": [(f"p{i}", 1.0), ("z", 0.5)] for i in range(5)})
    run = run_searcher(searcher, {f"q{i}": f"text {i}" for i in range(5)}, k=1, batch_size=2, progress=False)
    assert run == {f"q{i}": [(f"p{i}", 1.0)] for i in range(5)}


def test_run_searcher_rejects_a_wrong_number_of_rankings() -> None:
    class Broken(FakeSearcher):
        def batch_search(self, queries: list[str], k: int) -> list[list[FakeResult]]:
            return []

    with pytest.raises(RuntimeError, match="returned 0 rankings for 2 queries"):
        run_searcher(Broken({}), {"q1": "x", "q2": "y"}, k=3, progress=False)


def test_trec_run_round_trip(tmp_path) -> None:
    run = {"q1": [("b", 0.1 + 0.2), ("a", 0.1 + 0.2), ("c", -1e-7)], "q2": [("d", 3.0)], "q3": []}
    path = write_trec_run(run, tmp_path / "sub" / "x.trec", tag="bm25")
    back = read_trec_run(path)
    assert back == {"q1": run["q1"], "q2": run["q2"]}  # exact scores, tie order kept; empty rankings vanish
    assert path.read_text().splitlines()[0].split() == ["q1", "Q0", "b", "1", repr(0.1 + 0.2), "bm25"]
    assert [p.name for p in path.parent.iterdir()] == ["x.trec"]  # no temporary left behind
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run(run, tmp_path / "y.trec", tag="two words")
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 a 1 0.5 t\nq1 Q0 b 2 0.4\n")
    with pytest.raises(ValueError, match=r"bad.trec:2: expected 6 columns"):
        read_trec_run(bad)


def test_latency_stats_from_a_fake_clock() -> None:
    clock = [0.0]
    searcher = FakeSearcher({}, clock=clock)
    stats = measure_latency(searcher, [f"q{i}" for i in range(8)], k=5, warmup=3, clock=lambda: clock[0])
    assert len(searcher.calls) == 8 and stats.n == 5  # 3 warm-up calls, 5 timed ones taking 4..8 ms
    assert stats.p50_ms == pytest.approx(6.0) and stats.mean_ms == pytest.approx(6.0)
    assert stats.p95_ms == pytest.approx(7.8) and stats.p99_ms == pytest.approx(7.96)
    assert stats.qps == pytest.approx(5 / 0.030)
    # a single query is timed, never only warmed up; no query is an error
    assert measure_latency(FakeSearcher({}), ["q"], k=1, warmup=10).n == 1
    with pytest.raises(ValueError, match="at least one query"):
        measure_latency(FakeSearcher({}), [], k=1)


def test_markdown_table_formats_numbers_by_column() -> None:
    table = markdown_table(
        [{"system": "bm25", "R@1": 0.25, "p50 ms": 12.345, "n": 4, "p R@1 vs x": 0.0004}, {"system": "dense"}],
        ["system", "R@1", "p50 ms", "n", "p R@1 vs x"],
    )
    lines = table.splitlines()
    assert lines[0] == "| system | R@1 | p50 ms | n | p R@1 vs x |"
    assert lines[2] == "| bm25 | 0.250 | 12.3 | 4 | <0.001 |"
    assert lines[3] == "| dense | – | – | – | – |"


def test_evaluate_searcher_writes_run_and_metrics(tmp_path) -> None:
    queries = {q: f"text {q}" for q in ("q1", "q2", "q3", "q4", "q5", "unjudged")}
    searcher = FakeSearcher({f"text {q}": r for q, r in RUN.items()})
    result = evaluate_searcher(
        searcher, queries, QRELS, name="fake", k=10, rel_level=1, out_dir=tmp_path, latency_queries=3, progress=False
    )
    assert result.metrics == compute_metrics(RUN, QRELS, 1)
    assert result.latency is not None and result.latency.n == 3
    # only counted queries are searched in batch: q4 (nothing relevant) and 'unjudged' are not
    assert set(searcher.calls[:4]) == {"text q1", "text q2", "text q3", "text q5"}
    assert result.run_path == tmp_path / "fake.dev.trec" and result.metrics_path == tmp_path / "fake.dev.metrics.json"
    assert read_trec_run(result.run_path) == {q: RUN[q] for q in ("q1", "q2", "q3")}
    saved = json.loads(result.metrics_path.read_text())
    assert saved["k"] == 10 and saved["rel_level"] == 1 and saved["metrics"]["n"] == 4
    loaded = load_evaluation(result.metrics_path)
    assert loaded.metrics == result.metrics and loaded.per_query == result.per_query
    assert loaded.latency == result.latency and loaded.run_path == result.run_path


class BudgetedFakeSearcher(FakeSearcher):
    """Cuts every second query it reranks, like a RerankingSearcher on a machine too slow for half its batches."""

    def __init__(self, rankings: dict[str, list[tuple[str, float]]]) -> None:
        super().__init__(rankings)
        self.reset_budget_stats()

    def _count(self, n: int) -> None:
        for _ in range(n):
            self.queries += 1
            self.cut += self.queries % 2 == 0

    def search(self, query: str, k: int) -> list[FakeResult]:  # batch_search calls it once per query
        self._count(1)
        return super().search(query, k)

    def budget_stats(self) -> BudgetStats:
        return BudgetStats(self.queries, self.cut, 0)

    def reset_budget_stats(self) -> None:
        self.queries = self.cut = 0


def test_evaluate_searcher_records_budget_cuts_of_the_quality_pass_only(tmp_path) -> None:
    queries = {q: f"text {q}" for q in ("q1", "q2", "q3", "q4", "q5")}
    searcher = BudgetedFakeSearcher({f"text {q}": r for q, r in RUN.items()})
    searcher._count(7)  # counts from before the evaluation are not its own
    result = evaluate_searcher(
        searcher, queries, QRELS, name="rr", k=10, rel_level=1, out_dir=tmp_path, latency_queries=5, progress=False
    )
    # 4 counted queries searched (q4 has nothing relevant): 2 cut; the 5 timed calls after them are not included
    assert result.budget_cuts == {"queries": 4, "cut": 2, "candidates_scored": 0}
    assert load_evaluation(result.metrics_path).budget_cuts == result.budget_cuts
    plain = evaluate_searcher(
        FakeSearcher({f"text {q}": r for q, r in RUN.items()}), queries, QRELS, name="plain", k=10,
        out_dir=tmp_path, latency_queries=0, progress=False,
    )
    assert plain.budget_cuts is None and load_evaluation(plain.metrics_path).budget_cuts is None


def test_evaluate_searcher_finds_the_budget_of_a_wrapped_searcher(tmp_path) -> None:
    """hybrid.Retriever wraps the composed searcher (``.searcher``), which is where a reranker counts its cuts."""

    class Wrapper(FakeSearcher):
        def __init__(self, inner: BudgetedFakeSearcher) -> None:
            super().__init__(inner.rankings)
            self.searcher = inner

        def search(self, query: str, k: int) -> list[FakeResult]:
            return self.searcher.search(query, k)

    inner = BudgetedFakeSearcher({f"text {q}": r for q, r in RUN.items()})
    queries = {q: f"text {q}" for q in ("q1", "q2", "q3", "q5")}
    result = evaluate_searcher(Wrapper(inner), queries, QRELS, name="w", k=10, out_dir=tmp_path, latency_queries=0,
                               progress=False)
    assert result.budget_cuts == {"queries": 4, "cut": 2, "candidates_scored": 0}


@pytest.mark.integration
@pytest.mark.parametrize(("split", "rel_level"), [("dev", 1), ("dl19", 2)])
def test_oracle_on_the_real_query_sets(split: str, rel_level: int, tmp_path) -> None:
    import os
    from pathlib import Path

    root = Path(os.environ.get("MSMARCO_DIR", ""))
    if not os.environ.get("MSMARCO_DIR") or not (root / f"qrels.{split}.txt").is_file():
        pytest.skip("set MSMARCO_DIR to a canonical MS MARCO directory (e.g. ../shared/data/marco43k)")
    from hybrid.msmarco import read_qrels, read_queries

    queries = read_queries(root / f"queries.{split}.tsv")
    qrels = read_qrels(root / f"qrels.{split}.txt", queries)
    # the judged passages, best grade first: every metric is perfect except recall beyond the cut-off
    oracle = {queries[q]: sorted(((p, float(g)) for p, g in j.items()), key=lambda x: -x[1]) for q, j in qrels.items()}
    result = evaluate_searcher(
        FakeSearcher(oracle), queries, qrels, name="oracle", k=1000, rel_level=rel_level, out_dir=tmp_path,
        latency_queries=None, split=split, progress=False,
    )  # fmt: skip
    expected_n = sum(any(g >= rel_level for g in j.values()) for j in qrels.values())
    assert result.metrics["n"] == expected_n > 0
    assert result.metrics["R@1"] == result.metrics["MRR@10"] == result.metrics["nDCG@10"] == pytest.approx(1.0)
    assert result.metrics["R@1000"] == pytest.approx(1.0)
    # one unjudged passage pushed in front: the top result is never relevant any more, everything shifts by one
    pushed = {q: [("unjudged-passage", 1e9), *r] for q, r in oracle.items()}
    run = run_searcher(FakeSearcher(pushed), queries, 1000, progress=False)
    shifted = compute_metrics(run, qrels, rel_level)
    assert shifted["R@1"] == 0.0 and shifted["MRR@10"] == pytest.approx(0.5) and shifted["nDCG@10"] < 1.0
