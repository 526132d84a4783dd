r"""What one dense training step costs, phase by phase (tokenisation, forward, loss + backward, optimizer), for
variants of a pipeline config's [dense.encoder] / [dense.train] settings; prints a markdown table and the share of a
step that tokenisation takes (what pre-tokenised data would save at most). See dense/step_cost.py.

    python scripts/benchmark_train_step.py --config configs/cpu-marco43k.toml \
        --variant base --variant freeze_embeddings=true --variant passage_max_len=64 \
        [--queries artifacts/synthetic/train.jsonl] [--steps 5] [--set dense.train.batch_size=16]

A variant is ``base`` (the config as it is) or ``key=value[,key=value...]`` over fields of EncoderConfig and
TrainConfig (bare, or as dense.encoder.KEY / dense.train.KEY; values in TOML syntax, like --set). Records come from
--queries (a training-records JSONL whose passages are in the data directory's collection) or, without it, from
crops of passages sampled from the collection. The encoder starts from --base-model-dir, by default the base model
the pipeline uses (SmolLM2 converted under <artifacts>/base_models, converted there on first use).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hybrid.scripting import run_script

if TYPE_CHECKING:
    from hybrid.config import PipelineConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/cpu-marco43k.toml"), help="pipeline config (TOML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value for every variant (TOML syntax), repeatable")
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar="base|KEY=VALUE[,...]",
                   help="one row of the table, repeatable (default: base)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="canonical MS MARCO directory (default: the config's data.dir or $MSMARCO_DIR)")
    p.add_argument("--queries", type=Path, default=None,
                   help="training records JSONL (e.g. the synthetic stage's train.jsonl); default: passage crops")
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher-score file (scripts/score_teacher.py) for variants that distil (distill_batch_size)")
    p.add_argument("--records", type=int, default=0, help="records to sample (default: enough for every step)")
    p.add_argument("--base-model-dir", type=Path, default=None,
                   help="HF directory of the pretrained LM (default: the pipeline's converted base model)")
    p.add_argument("--artifacts", type=Path, default=None, help="artifact directory (default: config or env)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    return p.parse_args(argv)


def base_model(args: argparse.Namespace, config: PipelineConfig) -> str:
    """--base-model-dir, else the pipeline's base model: a named HF model, or SmolLM2 cut to ``base_layers``."""
    if args.base_model_dir is not None:
        if not (args.base_model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{args.base_model_dir} is not a Hugging Face model directory (no config.json); pass the pipeline's "
                "<artifacts>/base_models/... or a directory made by scripts/convert_smollm2.py --out")
        return str(args.base_model_dir)
    from hybrid.artifacts import artifacts_dir, base_model_path

    root = artifacts_dir(args.artifacts or config.artifacts or None)
    return base_model_path(root, config.dense.base_model, config.dense.base_layers)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from hybrid.config import load_config

    config = load_config(args.config, args.overrides)
    data_dir = args.data_dir or config.data_dir()
    from hybrid.msmarco import MsMarcoDir

    collection = MsMarcoDir(data_dir).collection_path
    if not collection.is_file():
        raise FileNotFoundError(f"{collection} not found: --data-dir (or MSMARCO_DIR) must be a canonical MS MARCO "
                                "directory")
    model = base_model(args, config)

    from dense.config import EncoderConfig, TrainConfig
    from dense.step_cost import (
        COLUMNS,
        StepVariant,
        benchmark_records,
        measure_step_costs,
        records_needed,
        tokenise_summary,
        variant_overrides,
    )
    from hybrid.evaluation import markdown_table

    variants = []
    for spec in args.variants or ["base"]:
        c = load_config(args.config, [*args.overrides, *variant_overrides(spec)])
        where = f"{args.config} with variant {spec!r}"
        variants.append(StepVariant(
            spec,
            EncoderConfig.from_dict({"model_name_or_path": model, **c.dense.encoder}, where=where),
            TrainConfig.from_dict({"seed": c.seed, **c.dense.train}, where=where),
        ))
    n_records = args.records or records_needed(variants, args.steps, args.warmup)
    records, passages = benchmark_records(collection, n_records, config.seed, args.queries)
    teacher = []
    if any(v.train.distill_batch_size for v in variants):
        if args.teacher is None:
            raise ValueError("a variant distils (distill_batch_size > 0): pass --teacher FILE")
        from dense.teacher_data import read_teacher_groups
        from dense.training_data import read_passages

        fewest = max(v.train.distill_passages for v in variants)
        teacher = [g for g in read_teacher_groups(args.teacher) if len(g.pids) >= fewest]
        passages = {**passages, **read_passages(collection, {p for g in teacher for p in g.pids})}
    costs = measure_step_costs(variants, records, passages, args.steps, args.warmup, args.device, teacher)
    print(f"{len(records)} records ({'from ' + str(args.queries) if args.queries else 'passage crops'}), "
          f"{args.steps} timed steps after {args.warmup} warm-up, base model {model}\n")
    print(markdown_table([c.row() for c in costs], COLUMNS))
    print(tokenise_summary(costs))


if __name__ == "__main__":
    sys.exit(run_script(main))
