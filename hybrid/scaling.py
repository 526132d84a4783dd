"""Data-scaling curves from ablation runs: one metric per line, x = synthetic training queries the dense model saw.

Each point is an artifact directory written by ``scripts/ablation_run.sh``: its ``dense_model/stage.json`` says how
many synthetic queries went into training, its ``eval/<mode>.<split>.metrics.json`` what the model scored; so the
x values are read from what ran, not typed in. Reference runs (e.g. crops instead of LLM queries) are drawn as
dashed horizontal lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hybrid.artifacts import ArtifactError, read_stage, stage_dir
from hybrid.evaluation import load_evaluation, markdown_table, output_paths
from hybrid.report import save_png


@dataclass(frozen=True)
class RunMetrics:
    """One ablation run: its name, the synthetic queries it trained on, and its metrics per split."""

    name: str
    synthetic_queries: int
    real_queries: int
    metrics: dict[str, dict[str, float]]  # split -> metric -> value


def load_run(run_dir: str | os.PathLike, mode: str, splits: Sequence[str]) -> RunMetrics:
    """The training counts and ``mode``'s metrics on ``splits`` of an ablation run directory."""
    root = Path(run_dir)
    stage = read_stage(root, "dense_train")
    if stage is None or "synthetic_queries" not in stage:
        raise ArtifactError(f"{root}: no finished dense_train stage ({stage_dir(root, 'dense_train').name}/) with a synthetic_queries count; "
                            "is it a scripts/ablation_run.sh directory?")
    metrics = {}
    for split in splits:
        path = output_paths(root / "eval", mode, split)[1]
        if not path.is_file():
            raise ArtifactError(f"{path} not found: evaluate {mode} on {split} in {root} first")
        metrics[split] = load_evaluation(path).metrics
    return RunMetrics(root.name, int(stage["synthetic_queries"]), int(stage.get("real_queries", 0)), metrics)


def scaling_table(points: Sequence[RunMetrics], references: Sequence[RunMetrics], splits: Sequence[str],
                  metric_names: Sequence[str]) -> str:
    """Markdown: one row per run (points by synthetic count, then references), one column per split x metric."""
    rows = []
    for run, kind in [*((p, "scaling") for p in sorted(points, key=lambda p: p.synthetic_queries)),
                      *((r, "reference") for r in references)]:
        row: dict[str, object] = {"run": run.name, "kind": kind, "real": run.real_queries,
                                  "synthetic": run.synthetic_queries}
        for split in splits:
            n = run.metrics[split].get("n")
            for metric in metric_names:
                row[f"{split} {metric}"] = run.metrics[split][metric]
            row[f"{split} n"] = int(n) if n is not None else ""
        rows.append(row)
    columns = ["run", "kind", "real", "synthetic",
               *(f"{s} {m}" for s in splits for m in [*metric_names, "n"])]
    return markdown_table(rows, columns)


def scaling_chart(points: Sequence[RunMetrics], references: Mapping[str, RunMetrics], splits: Sequence[str],
                  metric_names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """PNG, one panel per split: each metric against the number of synthetic training queries (linear x, a tick
    at each run), references as dashed lines in the metric's colour. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError("scaling_chart needs at least one run")
    ordered = sorted(points, key=lambda p: p.synthetic_queries)
    xs = [p.synthetic_queries for p in ordered]
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False)
    try:
        for ax, split in zip(axes[0], splits):
            for i, metric in enumerate(metric_names):
                colour = f"C{i}"
                ax.plot(xs, [p.metrics[split][metric] for p in ordered], marker="o", color=colour, label=metric)
                for j, (label, ref) in enumerate(references.items()):
                    ax.axhline(ref.metrics[split][metric], color=colour, linestyle=("--", ":", "-.")[j % 3],
                               linewidth=1, label=f"{metric} ({label})")
            n = ordered[0].metrics[split].get("n")
            ax.set_title(f"{split}" + (f" (n={int(n)})" if n else ""))
            ax.set_xticks(sorted(set(xs)), [f"{x:,}" for x in sorted(set(xs))], fontsize=7, rotation=45)
            ax.set_xlabel("synthetic training queries")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("score")
        axes[0][-1].legend(fontsize=7, loc="upper left")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return save_png(fig, path)
    finally:
        plt.close(fig)


__all__ = ["RunMetrics", "load_run", "scaling_chart", "scaling_table"]
