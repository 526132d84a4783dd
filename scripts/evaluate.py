r"""Evaluate retrieval modes on any query set and print the ablation table.

Example (MS MARCO dev, then TREC DL 2019 with graded qrels):
    python scripts/evaluate.py --queries $D/queries.dev.tsv --qrels $D/qrels.dev.txt --name dev
    python scripts/evaluate.py --queries $D/queries.dl19.tsv --qrels $D/qrels.dl19.txt --name dl19 \
        --rel-level 2 --chart

Writes into --out (default <artifacts>/eval): <mode>.<name>.trec, <mode>.<name>.metrics.json,
ablation.<name>.md and, with --chart, ablation.<name>.png. With several modes the table has p-values
(paired randomization test) of every mode against the last one (or against --significance-against).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=Path, required=True, help="qid<TAB>query file")
    p.add_argument("--qrels", type=Path, required=True, help="TREC qrels file: qid 0 pid grade")
    p.add_argument("--rel-level", type=int, default=1, help="minimum grade counted as relevant (TREC DL: 2)")
    p.add_argument("--modes", type=_csv, default=["sparse", "dense", "rrf", "convex", "hybrid"],
                   help="comma-separated retriever modes, evaluated in this order; the comparison-only anchor "
                        "modes anchor-minilm and anchor-bm25+minilm (all-MiniLM-L6-v2) may be added")  # fmt: skip
    p.add_argument("--artifacts", type=Path, default=None,
                   help="artifact directory (default: env HYBRID_ARTIFACTS or <repo>/artifacts)")  # fmt: skip
    p.add_argument("--k", type=int, default=1000, help="ranking depth per query")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <artifacts>/eval)")
    p.add_argument("--name", default="dev", help="name of the query set, used in file names")
    p.add_argument("--latency-queries", type=int, default=200, help="single queries timed per mode (0: skip)")
    p.add_argument("--significance-against", type=_csv, default=None,
                   help="comma-separated reference modes for p-values (default: the last non-anchor mode)")  # fmt: skip
    p.add_argument("--chart", action="store_true", help="also write a PNG bar chart")
    p.add_argument("--resume", action="store_true",
                   help="reuse metrics of modes evaluated before on the same inputs (artifacts unchanged)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hybrid.artifacts import artifacts_dir
    from hybrid.msmarco import read_qrels, read_queries
    from hybrid.anchor import ANCHOR_MODES
    from hybrid.report import evaluate_modes, make_searcher
    from hybrid.retriever import MODES

    unknown = [m for m in args.modes if m not in MODES + ANCHOR_MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown} in --modes; choose from {list(MODES + ANCHOR_MODES)}")
    artifacts = artifacts_dir(args.artifacts)
    queries = read_queries(args.queries)
    qrels = read_qrels(args.qrels, queries)
    report = evaluate_modes(
        lambda mode: make_searcher(mode, artifacts),
        args.modes,
        queries,
        qrels,
        out_dir=args.out or artifacts / "eval",
        split=args.name,
        k=args.k,
        rel_level=args.rel_level,
        latency_queries=args.latency_queries or None,
        significance_against=args.significance_against,
        chart=args.chart,
        resume=args.resume,
    )
    print(report.table)
    print(f"written to {report.table_path.parent}")


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
