"""Compare systems: paired significance tests, the ablation table, a bar chart, and the loop over modes.

:func:`evaluate_modes` is what ``scripts/evaluate.py`` and the pipeline's evaluation stage both call.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np

from hybrid.evaluation import (
    EvaluationResult,
    Qrels,
    Searcher,
    evaluate_searcher,
    inputs_fingerprint,
    load_evaluation,
    markdown_table,
    output_paths,
)

logger = logging.getLogger(__name__)

TABLE_METRICS = ("R@1", "MRR@10", "R@10", "R@100", "R@1000", "nDCG@10")
TABLE_LATENCY = {"p50 ms": "p50_ms", "p95 ms": "p95_ms"}  # column -> summary key
SIGNIFICANCE_METRICS = ("R@1", "MRR@10")
CHART_METRICS = ("R@1", "MRR@10", "R@10", "nDCG@10")
N_RESAMPLES = 10_000
_SIGN_BATCH = 1_000  # sign vectors per matrix product in the randomization test (memory: batch x queries)


# --- significance ----------------------------------------------------------------------------------------------


def _paired_differences(a: Mapping[str, float], b: Mapping[str, float]) -> np.ndarray:
    shared = [q for q in a if q in b]
    if not shared:
        raise ValueError(
            f"the two systems share no query ({len(a)} and {len(b)} queries); compare runs on the same query set"
        )
    if len(shared) < max(len(a), len(b)):
        logger.warning("paired test over the %d shared queries of %d and %d", len(shared), len(a), len(b))
    return np.array([a[q] - b[q] for q in shared], dtype=np.float64)


def paired_randomization_test(
    a: Mapping[str, float], b: Mapping[str, float], n_resamples: int = N_RESAMPLES, seed: int = 0
) -> float:
    """Two-sided p-value of a paired randomization (sign-flip) test on the mean per-query difference.

    Under the null hypothesis the two systems are exchangeable on each query, so each difference's sign is
    random. Exact over all ``2**n`` sign vectors when that is at most ``n_resamples``; otherwise Monte Carlo
    with the ``(count + 1) / (n_resamples + 1)`` estimate, which is never 0. Written with numpy rather than
    ``scipy.stats.permutation_test`` (same test) because that takes ~12 s per comparison on 7k queries on two
    cores, against under a second here.
    """
    d = _paired_differences(a, b)
    observed = abs(d.mean())
    # float noise: a resampled mean equal to the observed one must count as "at least as extreme"
    threshold = observed - 1e-12 * max(1.0, observed)
    n = d.size
    if 2**n <= n_resamples:
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d) / n >= threshold))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, n_resamples, _SIGN_BATCH):
        size = min(_SIGN_BATCH, n_resamples - start)
        signs = rng.integers(0, 2, size=(size, n), dtype=np.int8) * 2 - 1
        extreme += int(np.count_nonzero(np.abs(signs @ d) / n >= threshold))
    return (extreme + 1) / (n_resamples + 1)


def paired_bootstrap_ci(
    a: Mapping[str, float],
    b: Mapping[str, float],
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean per-query difference ``a - b`` (shared queries)."""
    from scipy.stats import bootstrap

    d = _paired_differences(a, b)
    if np.all(d == d[0]):  # degenerate: every resample has the same mean
        return float(d[0]), float(d[0])
    ci = bootstrap(
        (d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile", random_state=seed
    ).confidence_interval
    return float(ci.low), float(ci.high)


# --- tables and charts -----------------------------------------------------------------------------------------


def p_column(metric: str, reference: str) -> str:
    """Name of the p-value column of ``metric`` against ``reference``."""
    return f"p {metric} vs {reference}"


def ablation_table(
    results: Mapping[str, Mapping[str, float]],
    per_query: Mapping[str, Mapping[str, Mapping[str, float]]],
    baseline_pairs: Sequence[tuple[str, str]] = (),
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> str:
    """Markdown table: one row per system, metrics, latency and p-values.

    ``results``: ``{system: metrics}`` (e.g. :meth:`EvaluationResult.summary`; ``p50_ms``/``p95_ms`` optional).
    ``per_query``: ``{system: {metric: {qid: value}}}`` for the tests. ``baseline_pairs``: ``(system,
    reference)``; each gives the p-value of a paired randomization test on R@1 and MRR@10, in ``system``'s row,
    in the columns ``p <metric> vs <reference>``.
    """
    for system, reference in baseline_pairs:
        for name in (system, reference):
            if name not in results or name not in per_query:
                raise KeyError(
                    f"significance pair ({system}, {reference}): no results for {name!r}; have {sorted(results)}"
                )
    references = list(dict.fromkeys(ref for _, ref in baseline_pairs))
    p_columns = [p_column(m, ref) for ref in references for m in SIGNIFICANCE_METRICS]
    rows: dict[str, dict[str, object]] = {}
    for system, metrics in results.items():
        row: dict[str, object] = {"system": system}
        row.update({m: metrics.get(m) for m in TABLE_METRICS})
        row.update({col: metrics.get(key) for col, key in TABLE_LATENCY.items()})
        row["n"] = int(metrics["n"]) if "n" in metrics else None
        rows[system] = row
    for system, reference in baseline_pairs:
        for metric in SIGNIFICANCE_METRICS:
            p = paired_randomization_test(
                per_query[system][metric], per_query[reference][metric], n_resamples=n_resamples, seed=seed
            )
            rows[system][p_column(metric, reference)] = p
    columns = ["system", *TABLE_METRICS, *TABLE_LATENCY, "n", *p_columns]
    return markdown_table(list(rows.values()), columns)


def bar_chart(
    results: Mapping[str, Mapping[str, float]], metric_names: Sequence[str], path: str | os.PathLike
) -> Path:
    """PNG with one group of bars per metric and one bar (colour) per system; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results or not metric_names:
        raise ValueError("bar_chart needs at least one system and one metric")
    systems = list(results)
    for system in systems:
        missing = [m for m in metric_names if m not in results[system]]
        if missing:
            raise KeyError(f"system {system!r} has no value for {missing}; it has {sorted(results[system])}")
    width = 0.8 / len(systems)
    x = np.arange(len(metric_names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(metric_names) * max(1, len(systems) / 3)), 4.0))
    try:
        for i, system in enumerate(systems):
            values = [results[system][m] for m in metric_names]
            bars = ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=system)
            ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
        ax.set_xticks(x, list(metric_names))
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("score")
        ax.legend(ncols=min(len(systems), 5), fontsize=8, loc="upper left")
        fig.tight_layout()
        return save_png(fig, path)
    finally:
        plt.close(fig)


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as a PNG atomically (a temporary file, then a rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=150)
    os.replace(tmp, path)
    return path


# --- all modes -------------------------------------------------------------------------------------------------


def make_searcher(mode: str, artifacts_dir: str | os.PathLike | None = None) -> Searcher:
    """A :class:`hybrid.Retriever` for the system's modes, an :class:`hybrid.anchor.AnchorSearcher` for the
    comparison-only anchor modes."""
    if mode.startswith("anchor"):
        from hybrid.anchor import AnchorSearcher

        return AnchorSearcher(mode, artifacts_dir)
    from hybrid.retriever import Retriever

    return Retriever(mode=mode, artifacts_dir=artifacts_dir)


@dataclass(frozen=True)
class ModesReport:
    """What :func:`evaluate_modes` produced."""

    results: dict[str, EvaluationResult]
    table: str
    table_path: Path
    chart_path: Path | None


def evaluate_modes(
    searcher_factory: Callable[[str], Searcher],
    modes: Sequence[str],
    queries: Mapping[str, str],
    qrels: Qrels,
    *,
    out_dir: str | os.PathLike,
    split: str = "dev",
    k: int = 1000,
    rel_level: int = 1,
    latency_queries: int | None = 200,
    significance_against: Sequence[str] | None = None,
    chart: bool = False,
    resume: bool = False,
    n_resamples: int = N_RESAMPLES,
    progress: bool = True,
) -> ModesReport:
    """Evaluate every mode, then write ``<out>/ablation.<split>.md`` (and ``ablation.<split>.png``).

    ``searcher_factory(mode)`` builds each searcher when its turn comes; it is closed (``close()`` when it has
    one) and dropped before the next, so only one is in memory. ``significance_against``: reference modes for
    the p-value columns (default: the last mode, when there are several). ``resume``: reuse a mode's metrics
    JSON when it was computed on the same queries, qrels, k, rel_level and latency_queries; only safe when the
    artifacts behind the searchers have not changed since.
    """
    modes = list(dict.fromkeys(modes))
    if not modes:
        raise ValueError("no mode to evaluate")
    if significance_against is None:
        # the last of the system's own modes (comparison rows such as the anchor come after it)
        own = [m for m in modes if not m.startswith("anchor")] or modes
        references = [own[-1]] if len(modes) > 1 else []
    else:
        references = list(dict.fromkeys(significance_against))
    unknown = [r for r in references if r not in modes]
    if unknown:
        raise ValueError(f"significance reference(s) {unknown} are not among the evaluated modes {modes}")
    out = Path(out_dir)
    expected = inputs_fingerprint(queries, qrels, k, rel_level, latency_queries)
    results: dict[str, EvaluationResult] = {}
    for mode in modes:
        metrics_path = output_paths(out, mode, split)[1]
        if resume and metrics_path.is_file():
            previous = load_evaluation(metrics_path)
            if previous.inputs == expected and previous.run_path.is_file():
                logger.info("resume: reusing %s (same inputs)", metrics_path)
                results[mode] = previous
                continue
            logger.info("resume: %s was computed on other inputs; evaluating %s again", metrics_path, mode)
        logger.info("building the %s searcher", mode)
        searcher = searcher_factory(mode)
        try:
            results[mode] = evaluate_searcher(
                searcher,
                queries,
                qrels,
                name=mode,
                k=k,
                rel_level=rel_level,
                out_dir=out,
                latency_queries=latency_queries,
                split=split,
                progress=progress,
            )
        finally:
            close = getattr(searcher, "close", None)
            if callable(close):
                close()
            del searcher

    pairs = [(mode, ref) for ref in references for mode in modes if mode != ref]
    table = ablation_table(
        {m: r.summary() for m, r in results.items()},
        {m: r.per_query for m, r in results.items()},
        pairs,
        n_resamples=n_resamples,
    )
    n = int(next(iter(results.values())).metrics["n"])
    note = (
        f"\n{split}: {n} queries, k={k}, relevant = grade >= {rel_level}; "
        "p: two-sided paired randomization test.\n"
    )
    for mode, result in results.items():
        if result.budget_cuts:
            cuts = result.budget_cuts
            note += (f"{mode}: its time budget cut scoring short on {cuts['cut']} of {cuts['queries']} queries "
                     "(metrics of a budgeted mode depend on the machine's speed).\n")
    table_path = out / f"ablation.{split}.md"
    tmp = table_path.with_name(f".{table_path.name}.tmp-{os.getpid()}")
    tmp.write_text(table + note)
    os.replace(tmp, table_path)
    chart_path = None
    if chart:
        chart_path = bar_chart({m: r.metrics for m, r in results.items()}, CHART_METRICS, out / f"ablation.{split}.png")
    logger.info("wrote %s%s", table_path, f" and {chart_path}" if chart_path else "")
    return ModesReport(results=results, table=table, table_path=table_path, chart_path=chart_path)


__all__ = [
    "CHART_METRICS",
    "SIGNIFICANCE_METRICS",
    "TABLE_METRICS",
    "ModesReport",
    "ablation_table",
    "bar_chart",
    "save_png",
    "evaluate_modes",
    "make_searcher",
    "p_column",
    "paired_bootstrap_ci",
    "paired_randomization_test",
]
