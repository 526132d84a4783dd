"""Evaluate one searcher on one query set: run it, score the run with ``ir_measures``, time single queries.

Conventions (they matter when comparing numbers across papers and systems):

* **Which queries count.** A query counts when the qrels give it at least one passage with grade
  ``>= rel_level``; queries without such a passage are excluded from every metric (``n`` reports how many
  counted). A counted query that is missing from the run, or has an empty ranking, scores 0 on every metric.
  ``ir_measures`` would silently average over the queries present in the run only, so the zeros are filled in
  here explicitly.
* **Order.** The evaluated order is the order the searcher returned. ``ir_measures`` (pytrec_eval) re-sorts a
  run by score and breaks ties by passage id, which would reorder tied passages; rankings are therefore
  rewritten with rank-based scores (``len - i``) before scoring. Equal scores keep the searcher's order. A
  passage listed twice in one ranking keeps its first (best) position.
* **Metrics.** ``R@1`` is the share of queries whose top passage is relevant (``Success(rel)@1``), ``MRR@10`` is
  ``RR(rel)@10``, ``R@c`` is ``R(rel)@c`` (share of relevant passages in the top ``c``), ``nDCG@10`` uses the
  grades as linear gains (trec_eval convention; grades below ``rel_level`` still give their gain).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ir_measures
import numpy as np
from tqdm.auto import tqdm

from dense.atomic import atomic_file
from hybrid.artifacts import fingerprint, write_json_atomic

logger = logging.getLogger(__name__)

Ranking = list[tuple[str, float]]
Run = dict[str, Ranking]
Qrels = Mapping[str, Mapping[str, int]]

# metric name in reports -> ir_measures measure, given the minimum relevant grade
METRICS: dict[str, Callable[[int], Any]] = {
    "R@1": lambda rel: ir_measures.Success(rel=rel) @ 1,
    "MRR@10": lambda rel: ir_measures.RR(rel=rel) @ 10,
    "R@10": lambda rel: ir_measures.R(rel=rel) @ 10,
    "R@100": lambda rel: ir_measures.R(rel=rel) @ 100,
    "R@1000": lambda rel: ir_measures.R(rel=rel) @ 1000,
    "nDCG@10": lambda rel: ir_measures.nDCG @ 10,
}
DEEPEST_CUTOFF = 1000  # R@1000 needs runs of this depth to mean what it says
LATENCY_WARMUP = 10  # untimed single-query calls before timing
NUMBER_FORMATS = {"metric": "{:.3f}", "ms": "{:.1f}"}


class Searcher(Protocol):
    """The project's search interface (BM25, dense, fused and ``hybrid.Retriever`` all follow it)."""

    def search(self, query: str, k: int) -> Sequence[Any]: ...

    def batch_search(self, queries: list[str], k: int) -> Sequence[Sequence[Any]]: ...


# --- rankings and runs -----------------------------------------------------------------------------------------


def as_ranking(results: Iterable[Any]) -> Ranking:
    """``[(pid, score), ...]`` from ``(pid, score)`` pairs or objects with ``.document_id`` and ``.score``."""
    ranking: Ranking = []
    for i, item in enumerate(results):
        if hasattr(item, "document_id") and hasattr(item, "score"):
            pid, score = item.document_id, item.score
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            pid, score = item
        else:
            raise TypeError(
                f"result #{i} is a {type(item).__name__}; expected a (pid, score) pair or an object with "
                "`.document_id` and `.score` (hybrid.Result)"
            )
        ranking.append((str(pid), float(score)))
    return ranking


def run_searcher(
    searcher: Searcher, queries: Mapping[str, str], k: int, batch_size: int = 64, progress: bool = True
) -> Run:
    """``{qid: ranking}`` for every query, searched in batches with ``searcher.batch_search``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    qids = list(queries)
    run: Run = {}
    start = time.perf_counter()
    with tqdm(total=len(qids), desc="searching", unit="query", disable=not progress) as bar:
        for lo in range(0, len(qids), batch_size):
            batch = qids[lo : lo + batch_size]
            results = searcher.batch_search([queries[q] for q in batch], k)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{type(searcher).__name__}.batch_search returned {len(results)} rankings for "
                    f"{len(batch)} queries (batch starting at qid {batch[0]!r}); it must return one per query"
                )
            for qid, result in zip(batch, results):
                run[qid] = as_ranking(result)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    logger.info(
        "searched %d queries (k=%d) in %.1f s: %.1f queries/s", len(qids), k, seconds, len(qids) / max(seconds, 1e-9)
    )
    return run


def _rank_scored(ranking: Ranking) -> dict[str, float]:
    """Scores ``len - i`` by position, so pytrec_eval's re-sort keeps the searcher's order (see module doc)."""
    scored: dict[str, float] = {}
    for i, (pid, _) in enumerate(ranking):
        scored.setdefault(pid, float(len(ranking) - i))
    return scored


# --- metrics ---------------------------------------------------------------------------------------------------


def evaluated_qids(qrels: Qrels, rel_level: int = 1) -> list[str]:
    """Queries that count: those with at least one passage of grade ``>= rel_level`` (qrels order)."""
    return [qid for qid, judged in qrels.items() if any(g >= rel_level for g in judged.values())]


def per_query_metrics(run: Mapping[str, Ranking], qrels: Qrels, rel_level: int = 1) -> dict[str, dict[str, float]]:
    """``{metric: {qid: value}}`` over the counted queries; missing or empty rankings score 0."""
    if rel_level < 1:
        raise ValueError(f"rel_level must be >= 1 (the minimum grade counted as relevant), got {rel_level}")
    qids = evaluated_qids(qrels, rel_level)
    measures = {name: make(rel_level) for name, make in METRICS.items()}
    values: dict[str, dict[str, float]] = {name: dict.fromkeys(qids, 0.0) for name in measures}
    if not qids:
        return values
    eval_qrels = {q: {pid: int(g) for pid, g in qrels[q].items()} for q in qids}
    eval_run = {q: _rank_scored(run[q]) for q in qids if run.get(q)}
    missing = len(qids) - len(eval_run)
    if missing:
        logger.warning("%d of %d evaluated queries have no ranking in the run; they count as 0", missing, len(qids))
    name_of = {measure: name for name, measure in measures.items()}
    if eval_run:
        for m in ir_measures.iter_calc(list(measures.values()), eval_qrels, eval_run):
            values[name_of[m.measure]][m.query_id] = float(m.value)
    return values


def aggregate(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric of :func:`per_query_metrics` output, plus ``n`` (queries counted)."""
    n = len(next(iter(per_query.values()), {}))
    if n == 0:
        raise ValueError("no query counted, so there is nothing to average; see compute_metrics")
    metrics = {name: float(np.mean(list(values.values()))) for name, values in per_query.items()}
    metrics["n"] = n
    return metrics


def compute_metrics(run: Mapping[str, Ranking], qrels: Qrels, rel_level: int = 1) -> dict[str, float]:
    """Mean of each metric over the counted queries, plus ``n`` (how many counted); see the module doc."""
    if not evaluated_qids(qrels, rel_level):
        raise ValueError(
            f"no query in the qrels has a passage with grade >= {rel_level} ({len(qrels)} queries judged); "
            "check --rel-level (MS MARCO dev uses 1, TREC DL uses 2) and that the qrels file is the right one"
        )
    return aggregate(per_query_metrics(run, qrels, rel_level))


# --- latency ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of single ``search`` calls, one query at a time."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    qps: float  # timed queries / total timed seconds (sequential, one client)
    n: int


def measure_latency(
    searcher: Searcher,
    queries: Sequence[str],
    k: int,
    warmup: int = LATENCY_WARMUP,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Time ``searcher.search(q, k)`` one query at a time with ``clock`` (seconds; replaceable in tests).

    The first ``warmup`` queries (at most all but one) are searched untimed, so JIT, caches and lazy loading do
    not count; the rest are timed, each once.
    """
    queries = list(queries)
    if not queries:
        raise ValueError("measure_latency needs at least one query")
    warmup = max(0, min(warmup, len(queries) - 1))
    for query in queries[:warmup]:
        searcher.search(query, k)
    timings: list[float] = []
    for query in queries[warmup:]:
        start = clock()
        searcher.search(query, k)
        timings.append(clock() - start)
    ms = np.asarray(timings) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    stats = LatencyStats(
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        mean_ms=float(ms.mean()),
        qps=len(timings) / max(sum(timings), 1e-12),
        n=len(timings),
    )
    logger.info(
        "latency over %d queries (k=%d): p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, %.1f queries/s",
        stats.n, k, stats.p50_ms, stats.p95_ms, stats.p99_ms, stats.qps,
    )  # fmt: skip
    return stats


# --- run files -------------------------------------------------------------------------------------------------


def write_trec_run(run: Mapping[str, Ranking], path: str | os.PathLike, tag: str) -> Path:
    """Write ``qid Q0 pid rank score tag`` lines atomically.

    The rank column is authoritative (:func:`read_trec_run` orders by it); scores are written exactly
    (``repr``). External trec_eval re-sorts by score and would reorder ties. Empty rankings have no lines.
    """
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag must be a non-empty word without whitespace, got {tag!r}")
    path = Path(path)
    with atomic_file(path, "w") as f:
        for qid, ranking in run.items():
            for rank, (pid, score) in enumerate(ranking, start=1):
                f.write(f"{qid} Q0 {pid} {rank} {float(score)!r} {tag}\n")
    return path


def read_trec_run(path: str | os.PathLike) -> Run:
    """``{qid: [(pid, score), ...]}`` ordered by the rank column (file order on equal ranks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run file {path} does not exist; write it with write_trec_run or scripts/evaluate.py")
    rows: dict[str, list[tuple[int, int, str, float]]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(
                    f"{path}:{lineno}: expected 6 columns 'qid Q0 pid rank score tag', "
                    f"got {len(parts)}: {line.strip()!r}"
                )
            qid, _, pid, rank, score, _ = parts
            try:
                rows.setdefault(qid, []).append((int(rank), lineno, pid, float(score)))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: rank must be an int and score a number: {line.strip()!r}") from e
    return {qid: [(pid, score) for _, _, pid, score in sorted(entries)] for qid, entries in rows.items()}


# --- tables ----------------------------------------------------------------------------------------------------


def format_cell(column: str, value: Any) -> str:
    """Fixed formatting: ints as is, ``*ms`` columns 1 decimal, p-values 3 decimals or ``<0.001``, floats 3."""
    if value is None:
        return "–"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if column.startswith("p "):
            return "<0.001" if value < 0.001 else f"{value:.3f}"
        if column.rstrip().lower().endswith("ms") or column.lower() == "qps":
            return NUMBER_FORMATS["ms"].format(value)
        return NUMBER_FORMATS["metric"].format(value)
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub markdown table; missing cells show ``–``. See :func:`format_cell` for number formats."""
    header = "| " + " | ".join(columns) + " |"
    align = "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(columns))) + " |"
    body = ["| " + " | ".join(format_cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join([header, align, *body]) + "\n"


# --- one searcher, end to end ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationResult:
    """Metrics of one system on one query set, with the files they were written to."""

    name: str
    split: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(repr=False)
    latency: LatencyStats | None
    run_path: Path
    metrics_path: Path
    inputs: str = ""  # fingerprint of queries, qrels, k, rel_level, latency_queries (for resuming)
    # a searcher with a time budget (rerank): how often it cut scoring short in the quality pass, whose metrics
    # therefore depend on the machine's speed; {"queries", "cut", "candidates_scored"}, None for other searchers
    budget_cuts: dict[str, int] | None = None

    def summary(self) -> dict[str, float]:
        """Metrics plus ``p50_ms`` / ``p95_ms`` / ``qps`` when latency was measured (a report row)."""
        row = dict(self.metrics)
        if self.latency is not None:
            row.update(p50_ms=self.latency.p50_ms, p95_ms=self.latency.p95_ms, qps=self.latency.qps)
        return row

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "metrics": self.metrics,
            "latency": asdict(self.latency) if self.latency else None,
            "run_file": self.run_path.name,
            "inputs": self.inputs,
            "budget_cuts": self.budget_cuts,
            "per_query": self.per_query,
        }


def load_evaluation(metrics_path: str | os.PathLike) -> EvaluationResult:
    """Read back what :func:`evaluate_searcher` wrote to ``<name>.<split>.metrics.json``."""
    path = Path(metrics_path)
    data = json.loads(path.read_text())
    latency = LatencyStats(**data["latency"]) if data.get("latency") else None
    return EvaluationResult(
        name=data["name"],
        split=data["split"],
        metrics=data["metrics"],
        per_query=data["per_query"],
        latency=latency,
        run_path=path.with_name(data["run_file"]),
        metrics_path=path,
        inputs=data.get("inputs", ""),
        budget_cuts=data.get("budget_cuts"),
    )


def output_paths(out_dir: str | os.PathLike, name: str, split: str) -> tuple[Path, Path]:
    """``(<out>/<name>.<split>.trec, <out>/<name>.<split>.metrics.json)``."""
    out = Path(out_dir)
    return out / f"{name}.{split}.trec", out / f"{name}.{split}.metrics.json"


def inputs_fingerprint(
    queries: Mapping[str, str], qrels: Qrels, k: int, rel_level: int, latency_queries: int | None
) -> str:
    """Identity of everything an evaluation depends on besides the searcher."""
    return fingerprint(
        {
            "queries": fingerprint(sorted(queries.items())),
            "qrels": fingerprint(sorted((q, sorted(j.items())) for q, j in qrels.items())),
            "k": k,
            "rel_level": rel_level,
            "latency_queries": latency_queries,
        }
    )


def budgeted_searcher(searcher: Any) -> Any:
    """The searcher itself, or the composed searcher a :class:`hybrid.Retriever` wraps, when it counts time-budget
    cuts (``budget_stats`` / ``reset_budget_stats``, as :class:`hybrid.rerank.RerankingSearcher`); else ``None``."""
    for candidate in (searcher, getattr(searcher, "searcher", None)):
        if all(callable(getattr(candidate, a, None)) for a in ("budget_stats", "reset_budget_stats")):
            return candidate
    return None


def evaluate_searcher(
    searcher: Searcher,
    queries: Mapping[str, str],
    qrels: Qrels,
    *,
    name: str,
    k: int = 1000,
    rel_level: int = 1,
    out_dir: str | os.PathLike,
    latency_queries: int | None = 200,
    split: str = "dev",
    batch_size: int = 64,
    progress: bool = True,
) -> EvaluationResult:
    """Run ``searcher`` on the judged queries, score it, time it; write the run and metrics JSON.

    Only queries that count (see the module doc) and appear in ``queries`` are searched. Judged queries without
    text in ``queries`` cannot be searched: they are dropped with a warning rather than scored as zeros.
    ``latency_queries``: how many single-query calls to time (``None`` or 0: skip), taken from the start of
    ``queries`` after up to ``LATENCY_WARMUP`` untimed ones (fewer when ``queries`` is short).
    """
    judged = evaluated_qids(qrels, rel_level)
    no_text = [q for q in judged if q not in queries]
    if no_text:
        logger.warning(
            "%d judged queries (e.g. %r) are not in the queries file and are not evaluated", len(no_text), no_text[:3]
        )
    to_search = {q: queries[q] for q in judged if q in queries}
    if not to_search:
        raise ValueError(
            f"no query of the {len(queries)} given has a qrels passage with grade >= {rel_level}; "
            "check that the queries and qrels files belong to the same split and the --rel-level"
        )
    if k < DEEPEST_CUTOFF:
        logger.warning("k=%d < %d: R@%d measures recall of the truncated run", k, DEEPEST_CUTOFF, DEEPEST_CUTOFF)
    eval_qrels = {q: qrels[q] for q in to_search}
    logger.info("evaluating %s on %s: %d queries, k=%d, rel_level=%d", name, split, len(to_search), k, rel_level)

    budgeted = budgeted_searcher(searcher)
    if budgeted is not None:
        budgeted.reset_budget_stats()
    run = run_searcher(searcher, to_search, k, batch_size=batch_size, progress=progress)
    budget_cuts = None
    if budgeted is not None:
        stats = budgeted.budget_stats()
        budget_cuts = {"queries": stats.queries, "cut": stats.cut, "candidates_scored": stats.candidates_scored}
        logger.info("%s on %s: the time budget cut scoring short on %d of %d queries of the quality pass", name,
                    split, stats.cut, stats.queries)
    per_query = per_query_metrics(run, eval_qrels, rel_level)
    metrics = aggregate(per_query)
    latency = None
    if latency_queries:
        sample = list(queries.values())[: latency_queries + LATENCY_WARMUP]
        # a short query set gives up warm-up before timed queries
        warmup = min(LATENCY_WARMUP, max(0, len(sample) - latency_queries))
        latency = measure_latency(searcher, sample, k, warmup=warmup)

    run_path, metrics_path = output_paths(out_dir, name, split)
    write_trec_run(run, run_path, tag=name)
    result = EvaluationResult(
        name=name,
        split=split,
        metrics=metrics,
        per_query=per_query,
        latency=latency,
        run_path=run_path,
        metrics_path=metrics_path,
        inputs=inputs_fingerprint(queries, qrels, k, rel_level, latency_queries),
        budget_cuts=budget_cuts,
    )
    write_json_atomic(metrics_path, {**result.to_json(), "k": k, "rel_level": rel_level})
    logger.info(
        "%s on %s: %s",
        name,
        split,
        ", ".join(f"{m} {v:.3f}" for m, v in metrics.items() if m != "n") + f" (n={metrics['n']})",
    )
    return result


__all__ = [
    "LATENCY_WARMUP",
    "METRICS",
    "EvaluationResult",
    "LatencyStats",
    "Searcher",
    "aggregate",
    "as_ranking",
    "budgeted_searcher",
    "compute_metrics",
    "evaluate_searcher",
    "evaluated_qids",
    "format_cell",
    "inputs_fingerprint",
    "load_evaluation",
    "markdown_table",
    "measure_latency",
    "output_paths",
    "per_query_metrics",
    "read_trec_run",
    "run_searcher",
    "write_trec_run",
]
