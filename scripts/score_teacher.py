r"""Score real train queries' BM25 top passages with the reranker's query likelihood: the teacher file for
distillation (hybrid/teacher_scores.py says why real queries and what is excluded).

    python scripts/score_teacher.py --config configs/cpu-marco43k.toml --data-dir $D --artifacts artifacts \
        --queries 4000 --out data/teacher/ql-train-bm25top10.jsonl

Needs the artifact directory's `data`, `bm25` and `rerank` stages (the scorer is the rerank stage's: its model,
prompt, passage cut and dtype). Resumable: rerun the same command (or a larger --queries) and it continues; the file
is always the first N queries of one seeded order. The manifest <out>.manifest.json records the settings and
seconds per query.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from hybrid.scripting import run_script


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True,
                   help="pipeline config (its held-out train queries are left out)")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("MSMARCO_DIR"),
                   help="canonical MS MARCO directory (default: $MSMARCO_DIR)")
    p.add_argument("--artifacts", type=Path, default=None, help="artifact directory (default: the config's)")
    p.add_argument("--out", type=Path, required=True, help="teacher-score JSONL (grows; its manifest beside it)")
    p.add_argument("--queries", type=int, required=True, help="score the first N train queries of the order")
    p.add_argument("--depth", type=int, default=10, help="BM25 candidates per query (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query order")
    args = p.parse_args(argv)
    if args.data_dir is None:
        raise ValueError("pass --data-dir or set MSMARCO_DIR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hybrid.artifacts import artifacts_dir
    from hybrid.synthetic_data import heldout_train_qids
    from hybrid.teacher_scores import score_teacher_file

    command = "python scripts/score_teacher.py --config {} --queries N --depth {} --seed {} --out {}".format(
        shlex.quote(str(args.config)), args.depth, args.seed, shlex.quote(str(args.out)))
    n = score_teacher_file(artifacts_dir(args.artifacts), args.data_dir, heldout_train_qids(args.config, args.data_dir),
                           args.out, args.queries, args.depth, args.seed, command=command)
    print(f"{args.out}: {n} teacher groups")


if __name__ == "__main__":
    sys.exit(run_script(main))
