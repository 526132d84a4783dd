r"""Rerank a saved run's top with SmolLM2 query likelihood (or a trained cross-encoder) and compare it with the run
(paired tests).

    python scripts/rerank_experiment.py --queries $D/queries.dev.tsv --qrels $D/qrels.dev.txt --name dev \
        --base hybrid --depths 3,5,10 --weights none,1 [--max-queries 100]

    # choose depth and weight on the pipeline's held-out *train* queries (never on dev or DL), against a base run
    # whose fusion model never saw the query it ranks (2-fold cross-fitting over the holdout):
    python scripts/rerank_experiment.py --train-holdout configs/cpu-marco43k.toml --cross-fit 2 \
        --depths 2,3,5 --weights none,1

    # a cross-encoder from scripts/train_cross_encoder.py on the same queries and base run
    python scripts/rerank_experiment.py --train-holdout configs/cpu-marco43k.toml --cross-fit 2 \
        --scorer cross_encoder --model-dir artifacts/cross_encoder/model --depths 2,5,10 --weights none,1

The base run is <artifacts>/eval/<base>.<name>.trec (written by the evaluate stage or scripts/evaluate.py); when
it is missing, it is searched with Retriever(mode=<base>) and written there.
Scores are cached in <artifacts>/eval/{ql,ce}.<name>.<scorer hash>.jsonl (resumable; one file per scorer setting);
the table goes to stdout and <artifacts>/eval/rerank.<base>.<name>.<scorer hash>.md.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

from dense.precision import PRECISIONS
from fusion.query_likelihood import ATTENTIONS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=Path)
    p.add_argument("--qrels", type=Path)
    p.add_argument("--train-holdout", type=Path, metavar="CONFIG",
                   help="instead of --queries/--qrels: the fusion holdout train queries of this pipeline config")
    p.add_argument("--cross-fit", type=int, default=0, metavar="FOLDS",
                   help="with --train-holdout: the base run (hybrid or convex) comes from fusion models fitted on the "
                        "other folds of the holdout, not on the queries being ranked (out-of-fold; 0 = off)")
    p.add_argument("--cross-fit-seed", type=int, default=0, help="seed of the fold split")
    p.add_argument("--name", default="dev")
    p.add_argument("--rel-level", type=int, default=1)
    p.add_argument("--base", default="hybrid", help="mode whose saved run is reranked")
    p.add_argument("--depths", default="10", help="comma-separated rerank depths (the largest is scored)")
    p.add_argument("--weights", default="none,1", help="comma-separated: 'none' = QL only, else z-interpolation")
    p.add_argument("--max-queries", type=int, default=None, help="first N judged queries only (small-scale runs)")
    p.add_argument("--max-passage-tokens", type=int, default=160)
    p.add_argument("--system-prompt", default=None,
                   help="system turn of the chat prompt (default: the template's own; '' for an empty one)")
    p.add_argument("--scorer", choices=("ql", "cross_encoder"), default="ql",
                   help="query likelihood (no training) or a cross-encoder trained by train_cross_encoder.py")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="ql: causal LM directory (default: the full SmolLM2; e.g. one from train_ql_reranker.py); "
                        "cross_encoder: the trained model directory (required)")
    p.add_argument("--num-layers", type=int, default=None, help="early exit after this many decoder layers")
    p.add_argument("--dtype", choices=PRECISIONS, default="float32",
                   help="QL scorer precision (auto: bfloat16 on a CPU with native bf16 instructions)")
    p.add_argument("--attention", choices=ATTENTIONS, default="sdpa",
                   help="QL scorer attention kernel (EXPERIMENTS E46)")
    p.add_argument("--few-shot", type=int, default=0, metavar="N",
                   help="QL prompt demonstrations: N real train pairs drawn as the rerank stage draws them "
                        "(Pipeline.ql_examples; needs --train-holdout or --config)")
    p.add_argument("--few-shot-seed", type=int, default=0)
    p.add_argument("--instruction", default=None,
                   help="the QL prompt's instruction (default: fusion.query_likelihood.DEFAULT_INSTRUCTION)")
    p.add_argument("--config", type=Path, default=None,
                   help="pipeline config the --few-shot examples are drawn with (default: --train-holdout's)")
    p.add_argument("--artifacts", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from dense.atomic import write_text_atomic
    from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer
    from hybrid.artifacts import artifacts_dir, smollm2_dir, stage_dir
    from hybrid.evaluation import read_trec_run
    from hybrid.msmarco import PassageStore, read_qrels, read_queries
    from hybrid.rerank import PairScoreCache
    from hybrid.rerank_eval import rerank_report

    root = artifacts_dir(args.artifacts)
    out = root / "eval"
    if args.train_holdout:
        from hybrid.config import load_config
        from hybrid.pipeline import Pipeline

        all_queries, all_qrels, _, holdout = Pipeline(load_config(args.train_holdout), root).real_train_split()
        queries = {q: all_queries[q] for q in holdout}
        qrels = {q: all_qrels[q] for q in holdout}
        args.name = "train-holdout"
        if args.cross_fit:
            if args.base not in ("hybrid", "convex"):
                raise ValueError(f"--cross-fit applies to the fitted modes hybrid and convex, not {args.base!r}")
            args.name = f"train-holdout-crossfit{args.cross_fit}"
    elif args.cross_fit:
        raise ValueError("--cross-fit needs --train-holdout CONFIG")
    elif args.queries and args.qrels:
        queries = read_queries(args.queries)
        qrels = read_qrels(args.qrels, queries)
    else:
        raise SystemExit("give --queries and --qrels, or --train-holdout CONFIG")
    run_path = out / f"{args.base}.{args.name}.trec"
    if args.cross_fit and not run_path.is_file():
        from hybrid.crossfit import crossfit_holdout_runs
        from hybrid.evaluation import write_trec_run

        runs = crossfit_holdout_runs(root, queries, qrels, n_folds=args.cross_fit, seed=args.cross_fit_seed)
        for mode, run in runs.items():
            write_trec_run(run, out / f"{mode}.{args.name}.trec", tag=f"{mode}-crossfit")
    if not run_path.is_file():
        from hybrid.evaluation import run_searcher, write_trec_run
        from hybrid.retriever import Retriever

        retriever = Retriever(mode=args.base, artifacts_dir=root)
        write_trec_run(run_searcher(_Ranker(retriever), queries, 100), run_path, tag=args.base)
        retriever.close()
    base_run = read_trec_run(run_path)
    if args.scorer == "cross_encoder" and not args.model_dir:
        raise SystemExit("--scorer cross_encoder needs --model-dir (a model from scripts/train_cross_encoder.py)")
    examples: tuple[tuple[str, str], ...] = ()
    if args.few_shot:
        from hybrid.config import load_config
        from hybrid.pipeline import Pipeline

        if args.scorer != "ql":
            raise SystemExit("--few-shot applies to the query-likelihood scorer (--scorer ql) only")
        if not (args.config or args.train_holdout):
            raise SystemExit("--few-shot needs --config CONFIG (or --train-holdout CONFIG) to draw its examples")
        drawn = Pipeline(load_config(args.config or args.train_holdout), root).ql_examples(args.few_shot,
                                                                                          args.few_shot_seed)
        logging.getLogger(__name__).info("few-shot examples: qids %s", [e.qid for e in drawn])
        examples = tuple((e.passage, e.query) for e in drawn)
    config = QueryLikelihoodConfig(max_passage_tokens=args.max_passage_tokens, system_prompt=args.system_prompt,
                                   num_layers=args.num_layers, dtype=args.dtype, examples=examples,
                                   attention=args.attention,
                                   **({"instruction": args.instruction} if args.instruction else {}))
    model = "smollm2-135m-instruct-full"
    if args.model_dir:  # a fine-tuned model: its weights' file time tells one training run from the next
        files = [*args.model_dir.glob("*.safetensors"), *args.model_dir.glob("*.bin")]
        if not files:
            raise SystemExit(f"{args.model_dir} holds no *.safetensors or *.bin weights")
        weights = max(files, key=lambda f: f.stat().st_mtime)
        model = f"{args.model_dir.resolve()}@{weights.stat().st_mtime_ns}"
    # the dtype and attention join the cache key only when not the default, so caches from before the fields existed
    # hold (and the examples when there are none)
    key = f"{model}:{config}".replace(", examples=()", "").replace(", dtype='float32'", "")
    key = key.replace(", attention='sdpa'", "")
    if args.scorer == "cross_encoder":
        from fusion.cross_encoder import CrossEncoderScorer

        scorer = CrossEncoderScorer.from_dir(args.model_dir)
        key, prefix, label = f"cross_encoder:{model}:{scorer.config}", "ce", "CE"
    else:
        scorer = QueryLikelihoodScorer.from_dir(args.model_dir or smollm2_dir(root), config)
        prefix, label = "ql", "QL"
    cache = PairScoreCache(out / f"{prefix}.{args.name}.{hashlib.sha1(key.encode()).hexdigest()[:8]}.jsonl", key)
    logging.getLogger(__name__).info("scorer %s, cache %s", key[:300], cache.path)
    store = PassageStore.open(stage_dir(root, "data"))
    report = rerank_report(
        args.base, base_run, queries, qrels, scorer, store.get_many, cache,
        depths=[int(d) for d in args.depths.split(",")],
        weights=[None if w.strip() == "none" else float(w) for w in args.weights.split(",")],
        rel_level=args.rel_level, max_queries=args.max_queries, scorer_name=label,
    )
    path = out / f"rerank.{args.base}.{args.name}.{cache.path.stem.rsplit('.', 1)[-1]}.md"
    write_text_atomic(path, report.table + "\n")
    print(report.table)


class _Ranker:
    """``search``/``batch_search`` of (pid, score) from a Retriever (no passage texts needed here)."""

    def __init__(self, retriever) -> None:
        self.search, self.batch_search = retriever.rank, retriever.batch_rank


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
