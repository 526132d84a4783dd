"""Latency of ``Retriever().search`` one query at a time, next to BM25-only search at k=100.

    python scripts/benchmark_latency.py --queries $MSMARCO_DIR/queries.dev.tsv [--k 10] [--modes hybrid,sparse]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dense.atomic import write_json_atomic
from hybrid.benchmark import benchmark
from hybrid.msmarco import read_queries


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=Path, required=True, help="qid \\t query file")
    p.add_argument("--artifacts", type=Path, default=None)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--modes", default="hybrid", help="comma-separated Retriever modes")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-queries", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    queries = list(read_queries(args.queries).values())[: args.max_queries]
    table, raw = benchmark(args.artifacts, queries, args.k, args.modes.split(","), args.warmup)
    print(table)
    if args.json:
        write_json_atomic(args.json, raw)


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
