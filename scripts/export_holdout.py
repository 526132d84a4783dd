r"""Write the held-out train queries of a pipeline config (the selection set every choice is made on) as a query
file and a qrels file, so any evaluation can score on them:

    python scripts/export_holdout.py --config configs/cpu-marco43k.toml --out /tmp/holdout
    python scripts/evaluate.py --queries /tmp/holdout/queries.tsv --qrels /tmp/holdout/qrels.txt --name holdout

The split is the pipeline's own (dense/splits.py: the config's seed and fusion.holdout_queries, over the train
queries whose judged passage is in the collection). Note: the fitted fusion modes (hybrid, convex) were fitted on
these queries, so their rows are in-sample here (scripts/rerank_experiment.py --cross-fit gives out-of-fold ones).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hybrid.scripting import run_script


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="pipeline config (its seed and holdout size)")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("MSMARCO_DIR"),
                   help="canonical MS MARCO directory (default: $MSMARCO_DIR)")
    p.add_argument("--out", type=Path, required=True, help="directory for queries.tsv and qrels.txt")
    args = p.parse_args(argv)
    if args.data_dir is None:
        raise ValueError("pass --data-dir or set MSMARCO_DIR")

    from dense.atomic import write_text_atomic
    from hybrid.msmarco import MsMarcoDir
    from hybrid.synthetic_data import heldout_train_qids

    data = MsMarcoDir(args.data_dir)
    heldout = heldout_train_qids(args.config, args.data_dir)
    queries = data.queries("train")
    qrels = data.qrels("train", queries)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "queries.tsv", "".join(f"{q}\t{queries[q]}\n" for q in heldout))
    write_text_atomic(args.out / "qrels.txt", "".join(f"{q} 0 {pid} {g}\n" for q in heldout
                                                      for pid, g in sorted(qrels[q].items())))
    print(f"wrote {len(heldout)} held-out train queries to {args.out}/queries.tsv and qrels.txt")


if __name__ == "__main__":
    sys.exit(run_script(main))
