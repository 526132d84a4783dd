"""Significance tests, the ablation table, the chart, and evaluate_modes / scripts/evaluate.py with fakes."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from hybrid.evaluation import aggregate, per_query_metrics
from hybrid.report import (
    ablation_table,
    bar_chart,
    evaluate_modes,
    p_column,
    paired_bootstrap_ci,
    paired_randomization_test,
)
from hybrid.rerank import BudgetStats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _scores(values) -> dict[str, float]:
    return {f"q{i}": float(v) for i, v in enumerate(values)}


def test_identical_systems_are_not_significant() -> None:
    a = _scores(np.random.default_rng(0).random(50))
    assert paired_randomization_test(a, dict(a)) == 1.0


def test_clearly_better_system_is_significant() -> None:
    rng = np.random.default_rng(1)
    base = rng.random(50)
    better = np.clip(base + 0.3 + rng.normal(0, 0.05, 50), 0, None)
    p = paired_randomization_test(_scores(better), _scores(base))
    assert p < 0.01
    assert p == paired_randomization_test(_scores(base), _scores(better))  # two-sided: symmetric


def test_small_samples_are_exact_and_match_scipy() -> None:
    # 3 queries, all better by the same amount: only the all-plus and all-minus sign vectors are as extreme
    assert paired_randomization_test(_scores([1, 1, 1]), _scores([0, 0, 0])) == pytest.approx(2 / 8)
    rng = np.random.default_rng(2)
    a, b = rng.random(10), rng.random(10)
    reference = stats.permutation_test(
        (a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples", vectorized=True
    ).pvalue  # exact as well: 2**10 sign vectors
    assert paired_randomization_test(_scores(a), _scores(b)) == pytest.approx(reference)


def test_monte_carlo_p_value_is_close_to_scipy() -> None:
    rng = np.random.default_rng(3)
    a = rng.random(40)
    b = a - 0.02 + rng.normal(0, 0.2, 40)
    ours = paired_randomization_test(_scores(a), _scores(b), n_resamples=4000)
    theirs = stats.permutation_test(
        (a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples", vectorized=True,
        n_resamples=4000, random_state=0,
    ).pvalue  # fmt: skip
    assert 0.05 < theirs < 0.95 and abs(ours - theirs) < 0.05  # Monte Carlo error at 4000 resamples ~0.008


def test_only_shared_queries_are_compared() -> None:
    a = {"q1": 1.0, "q2": 0.0, "extra": 5.0}
    assert paired_randomization_test(a, {"q1": 1.0, "q2": 0.0}) == 1.0
    with pytest.raises(ValueError, match="share no query"):
        paired_randomization_test({"x": 1.0}, {"y": 1.0})


def test_bootstrap_ci_contains_the_mean_difference() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.random(200), rng.random(200)
    low, high = paired_bootstrap_ci(_scores(a), _scores(b), n_resamples=2000)
    assert low < float(np.mean(a - b)) < high and high - low < 0.2
    assert paired_bootstrap_ci(_scores([1, 1]), _scores([0, 0])) == (1.0, 1.0)


QRELS = {f"q{i}": {f"rel{i}": 1} for i in range(30)}


def _run(hit_every: int) -> dict[str, list[tuple[str, float]]]:
    """The relevant passage first on every ``hit_every``-th query, second otherwise (or absent with 0)."""
    run = {}
    for i in range(30):
        hit = hit_every and i % hit_every == 0
        run[f"q{i}"] = [(f"rel{i}", 2.0), ("junk", 1.0)] if hit else [("junk", 2.0), (f"rel{i}", 1.0)]
    return run


RUNS = {"sparse": _run(3), "dense": _run(2), "hybrid": _run(1)}


@dataclass(frozen=True)
class FakeResult:
    document_id: str
    document_text: str
    score: float


class FakeSearcher:
    """Query text == qid; answers from one of RUNS."""

    closed: list[str] = []

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.run = RUNS[mode]

    def search(self, query: str, k: int) -> list[FakeResult]:
        return [FakeResult(pid, "", s) for pid, s in self.run[query][:k]]

    def batch_search(self, queries: list[str], k: int) -> list[list[FakeResult]]:
        return [self.search(q, k) for q in queries]

    def close(self) -> None:
        FakeSearcher.closed.append(self.mode)


def test_ablation_table_has_rows_metrics_and_p_values() -> None:
    per_query = {m: per_query_metrics(r, QRELS) for m, r in RUNS.items()}
    results = {m: aggregate(pq) for m, pq in per_query.items()}
    results["hybrid"]["p50_ms"] = 12.34
    table = ablation_table(results, per_query, [("sparse", "hybrid"), ("dense", "hybrid")], n_resamples=2000)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:9] == ["system", "R@1", "MRR@10", "R@10", "R@100", "R@1000", "nDCG@10", "p50 ms", "p95 ms"]
    assert header[-2:] == [p_column("R@1", "hybrid"), p_column("MRR@10", "hybrid")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert set(rows) == {"sparse", "dense", "hybrid"}
    assert rows["hybrid"][1] == "1.000" and rows["sparse"][1] == "0.333" and rows["hybrid"][7] == "12.3"
    assert rows["sparse"][-2] == "<0.001" and rows["hybrid"][-2] == "–"  # 20 of 30 queries better: significant
    with pytest.raises(KeyError, match="no results for 'bm42'"):
        ablation_table(results, per_query, [("bm42", "hybrid")])


def test_bar_chart_writes_a_png(tmp_path) -> None:
    results = {"sparse": {"R@1": 0.2, "MRR@10": 0.3}, "hybrid": {"R@1": 0.25, "MRR@10": 0.35}}
    path = bar_chart(results, ["R@1", "MRR@10"], tmp_path / "charts" / "ablation.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == ["ablation.png"]
    with pytest.raises(KeyError, match="no value for \\['nDCG@10'\\]"):
        bar_chart(results, ["nDCG@10"], tmp_path / "x.png")


def test_evaluate_modes_writes_every_file_and_closes_searchers(tmp_path) -> None:
    FakeSearcher.closed.clear()
    queries = {q: q for q in QRELS}
    report = evaluate_modes(
        FakeSearcher, ["sparse", "dense", "hybrid"], queries, QRELS, out_dir=tmp_path, split="dev", k=10,
        latency_queries=5, chart=True, n_resamples=500, progress=False,
    )  # fmt: skip
    for mode in RUNS:
        assert (tmp_path / f"{mode}.dev.trec").is_file()
        saved = json.loads((tmp_path / f"{mode}.dev.metrics.json").read_text())
        assert saved["metrics"]["n"] == 30 and saved["latency"]["n"] == 5
        assert f"| {mode} |" in report.table
    assert report.results["hybrid"].metrics["R@1"] == 1.0 and report.results["sparse"].metrics["R@1"] == 10 / 30
    assert p_column("MRR@10", "hybrid") in report.table  # default reference: the last mode
    assert report.table_path == tmp_path / "ablation.dev.md" and report.table in report.table_path.read_text()
    assert report.chart_path is not None and report.chart_path.read_bytes()[:8] == PNG_MAGIC
    assert FakeSearcher.closed == ["sparse", "dense", "hybrid"]

    def no_rebuild(mode: str) -> FakeSearcher:
        raise AssertionError(f"resume should not rebuild {mode}")

    resumed = evaluate_modes(
        no_rebuild, ["sparse", "dense", "hybrid"], queries, QRELS, out_dir=tmp_path, k=10, latency_queries=5,
        resume=True, n_resamples=500, progress=False,
    )  # fmt: skip
    assert resumed.table == report.table
    with pytest.raises(ValueError, match="not among the evaluated modes"):
        evaluate_modes(FakeSearcher, ["sparse"], queries, QRELS, out_dir=tmp_path, significance_against=["hybrid"])


def test_evaluate_modes_notes_the_budget_cuts_of_a_budgeted_mode(tmp_path) -> None:
    class Budgeted(FakeSearcher):
        """Says it cut every query, as a reranker on a machine too slow for its batch."""

        def budget_stats(self) -> BudgetStats:
            return BudgetStats(30, 30, 0)

        def reset_budget_stats(self) -> None:
            pass

    queries = {q: q for q in QRELS}
    report = evaluate_modes(
        lambda mode: Budgeted(mode) if mode == "hybrid" else FakeSearcher(mode), ["sparse", "hybrid"], queries, QRELS,
        out_dir=tmp_path, k=10, latency_queries=0, n_resamples=100, progress=False,
    )  # fmt: skip
    note = report.table_path.read_text()
    assert "hybrid: its time budget cut scoring short on 30 of 30 queries" in note
    assert "sparse: its time budget" not in note


def test_evaluate_script_on_query_files(tmp_path, monkeypatch, capsys) -> None:
    import hybrid.retriever

    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    built: list[tuple[str, Path]] = []

    def fake_retriever(mode: str, artifacts_dir: Path) -> FakeSearcher:
        built.append((mode, artifacts_dir))
        return FakeSearcher(mode)

    monkeypatch.setattr(hybrid.retriever, "Retriever", fake_retriever)
    (tmp_path / "queries.tsv").write_text("".join(f"{q}\t{q}\n" for q in QRELS))
    (tmp_path / "qrels.txt").write_text("".join(f"{q} 0 {pid} 2\n" for q, j in QRELS.items() for pid in j))
    script.main([
        "--queries", str(tmp_path / "queries.tsv"), "--qrels", str(tmp_path / "qrels.txt"), "--rel-level", "2",
        "--modes", "sparse,hybrid", "--artifacts", str(tmp_path / "art"), "--k", "10", "--name", "unseen",
        "--latency-queries", "3", "--significance-against", "sparse", "--chart",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert built == [("sparse", tmp_path / "art"), ("hybrid", tmp_path / "art")]
    assert "| sparse |" in out and "| hybrid |" in out and p_column("R@1", "sparse") in out
    written = sorted(p.name for p in (tmp_path / "art" / "eval").iterdir())
    assert written == [
        "ablation.unseen.md", "ablation.unseen.png", "hybrid.unseen.metrics.json", "hybrid.unseen.trec",
        "sparse.unseen.metrics.json", "sparse.unseen.trec",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="unknown mode"):
        script.main(["--queries", str(tmp_path / "queries.tsv"), "--qrels", "x", "--modes", "bm42"])
