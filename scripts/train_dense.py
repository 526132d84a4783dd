r"""Train the dense bi-encoder on JSONL training records; resumes after a kill with --resume.

    python scripts/train_dense.py \
        --encoder-config configs/cpu-marco43k.toml#dense.encoder --model artifacts/base_models/smollm2-2l \
        --train-config configs/cpu-marco43k.toml#dense.train \
        --records artifacts/synthetic/train.jsonl "artifacts/msmarco_train.jsonl,weight=2" \
        --collection "$MSMARCO_DIR/collection.tsv" --out artifacts/dense_model [--resume]

A config is ``FILE.toml[#section.sub]``, ``FILE.json[#section]`` or an inline JSON object. A record file may carry
``,cap=N`` (use at most N records) and ``,weight=W`` (repeat or subsample them).

On several GPUs, the same command under torchrun (the batch size stays the global batch, split over the processes;
see README "Multi-GPU and multi-node"):

    torchrun --nproc_per_node=4 scripts/train_dense.py --encoder-config ... --train-config ... --records ... \
        --collection ... --out artifacts/dense_model
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any


def read_config_section(spec: str) -> tuple[dict[str, Any], str]:
    """The dict named by ``FILE[#section.sub]`` or an inline JSON object, and a description for errors."""
    if spec.lstrip().startswith("{"):
        return json.loads(spec), "--config JSON"
    path_text, _, section = spec.partition("#")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    for key in filter(None, section.split(".")):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path} has no section [{section}] (missing {key!r})")
        data = data[key]
    # Nested tables are other sections (e.g. [dense.encoder] inside [dense]), not fields of this one.
    return {k: v for k, v in data.items() if not isinstance(v, dict)}, f"{path} [{section}]" if section else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder-config", required=True, help="EncoderConfig: FILE[#section] or JSON")
    parser.add_argument("--train-config", required=True, help="TrainConfig: FILE[#section] or JSON")
    parser.add_argument("--model", help="override encoder model_name_or_path (the pretrained LM)")
    parser.add_argument("--max-steps", type=int, help="override train max_steps")
    parser.add_argument("--records", nargs="+", required=True, help="JSONL record files: FILE[,cap=N][,weight=W]")
    parser.add_argument("--collection", type=Path, required=True, help="collection.tsv (pid<TAB>text)")
    parser.add_argument("--out", type=Path, help="output directory (default: <artifacts>/dense_model)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from dense.config import EncoderConfig, TrainConfig
    from dense.distributed import init_distributed, shutdown_distributed
    from dense.training import train
    from dense.training_data import RecordSource, mix_records, read_passages, record_pids

    encoder_dict, encoder_where = read_config_section(args.encoder_config)
    train_dict, train_where = read_config_section(args.train_config)
    if args.model:
        encoder_dict["model_name_or_path"] = args.model
    if args.max_steps:
        train_dict["max_steps"] = args.max_steps
    encoder_config = EncoderConfig.from_dict(encoder_dict, where=encoder_where)
    train_config = TrainConfig.from_dict(train_dict, where=train_where)

    sources = [RecordSource.parse(spec) for spec in args.records]
    records = mix_records(sources, seed=train_config.seed)
    passages = read_passages(args.collection, record_pids(records))
    if args.out is None:
        from hybrid.artifacts import artifacts_dir, stage_dir

        args.out = stage_dir(artifacts_dir(), "dense_train")
    context = init_distributed()  # under torchrun: this process's rank; otherwise one process
    model_dir = train(
        encoder_config, train_config, records, passages, args.out, resume=args.resume,
        data_files=[s.path for s in sources], device=args.device,
    )
    shutdown_distributed()
    if context.is_main:
        print(f"trained encoder in {model_dir}")
    return 0


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
