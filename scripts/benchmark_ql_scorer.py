r"""Time the query-likelihood scorer on a saved run's top candidates under speed variants, and compare each
variant's scores with the first variant's (by default the plain fp32 scorer; EXPERIMENTS.md E10, E27).

    python scripts/benchmark_ql_scorer.py --run artifacts/eval/hybrid.dev.trec \
        --queries $MSMARCO_DIR/queries.dev.tsv --depth 2 --max-queries 40 --variants base,int8,nosys,p96

A variant is '-'-separated options: base (the default scorer: E9's prompt, passages <= 160 tokens), nosys (empty
system turn), p64 / p96 / p128 (passage limit), b1 (one candidate per batch), int8 (dynamic int8 Linear layers; add
'body' for the decoder only, 'mlp' for the MLPs only, 'pc' for per-channel weights), bf16 (the scorer's
dtype="bfloat16": decoder in bfloat16, LM head in float32; E10's row cast the whole model), eager (the scorer's
attention="eager" instead of sdpa, E46), l<N> (early exit after N layers).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def build_scorer(model_dir: Path, variant: str):
    import torch

    from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer

    opts = set(variant.split("-"))
    kwargs: dict = {}
    for o in opts:
        if o.startswith("p") and o[1:].isdigit():
            kwargs["max_passage_tokens"] = int(o[1:])
        if o.startswith("l") and o[1:].isdigit():
            kwargs["num_layers"] = int(o[1:])
    if "nosys" in opts:
        kwargs["system_prompt"] = ""
    if "b1" in opts:
        kwargs["batch_size"] = 1
    if "bf16" in opts:
        kwargs["dtype"] = "bfloat16"
    if "eager" in opts:
        kwargs["attention"] = "eager"
    scorer = QueryLikelihoodScorer.from_dir(model_dir, QueryLikelihoodConfig(**kwargs))
    if "int8" in opts:
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

        qconfig = per_channel_dynamic_qconfig if "pc" in opts else default_dynamic_qconfig
        linears = [n for n, m in scorer.model.named_modules() if isinstance(m, torch.nn.Linear)]
        if "mlp" in opts:
            linears = [n for n in linears if ".mlp." in n]
        elif "body" in opts:
            linears = [n for n in linears if n.startswith("model.")]
        scorer.model = torch.ao.quantization.quantize_dynamic(scorer.model, dict.fromkeys(linears, qconfig),
                                                             dtype=torch.qint8)
    scorer.refresh_prefix_cache()  # from the model as modified
    return scorer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="TREC run whose top candidates are scored")
    p.add_argument("--queries", type=Path, required=True)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--max-queries", type=int, default=40)
    p.add_argument("--variants", default="base", help="comma-separated; the first is the reference for agreement")
    p.add_argument("--artifacts", type=Path, default=None)
    args = p.parse_args(argv)

    from hybrid.artifacts import artifacts_dir, smollm2_dir, stage_dir
    from hybrid.evaluation import read_trec_run
    from hybrid.msmarco import PassageStore, read_queries

    root = artifacts_dir(args.artifacts)
    queries = read_queries(args.queries)
    run = read_trec_run(args.run)
    qids = [q for q in sorted(run) if q in queries][: args.max_queries]
    store = PassageStore.open(stage_dir(root, "data"))
    texts = {q: store.get_many([pid for pid, _ in run[q][: args.depth]]) for q in qids}
    results = {}
    variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    for variant in variants:
        scorer = build_scorer(smollm2_dir(root), variant)
        scorer.score("warm up", texts[qids[0]])
        seconds, scores = [], {}
        for q in qids:
            start = time.perf_counter()
            scores[q] = scorer.score(queries[q], texts[q])
            seconds.append(time.perf_counter() - start)
        results[variant] = (np.array(seconds) * 1e3, scores)
        del scorer
    base = results[variants[0]][1]
    print(f"| variant | p50 ms | p95 ms | mean ms | top-1 agrees with {variants[0]} | mean abs score diff | "
          f"n = {len(qids)} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for variant, (ms, scores) in results.items():
        agree = sum(int(np.argmax(scores[q]) == np.argmax(base[q])) for q in qids)
        diff = np.mean(np.concatenate([np.abs(scores[q] - base[q]) for q in qids]))
        print(f"| {variant} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} | {ms.mean():.0f} | "
              f"{agree}/{len(qids)} | {diff:.3f} | |")


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
