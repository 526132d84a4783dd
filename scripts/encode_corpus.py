r"""Encode a passage collection with a trained dense encoder; resumes after a kill.

    python scripts/encode_corpus.py --model-dir artifacts/dense_model/model \
        --collection "$MSMARCO_DIR/collection.tsv" [--out-dir artifacts/dense_index/embeddings]

    # one process per GPU, the shards dealt out over them (the same arguments on every process)
    torchrun --nproc_per_node=4 scripts/encode_corpus.py --model-dir ... --collection ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dense.corpus_encoding import directory_fingerprint, encode_corpus
from hybrid.artifacts import artifacts_dir, stage_dir
from hybrid.msmarco import Collection

DEFAULT_BATCH_SIZE = 256
DEFAULT_SHARD_SIZE = 50_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="saved encoder (dense_model/model)")
    parser.add_argument("--collection", type=Path, required=True, help="collection.tsv (pid<TAB>text)")
    parser.add_argument("--out-dir", type=Path, help="default: <artifacts>/dense_index/embeddings")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="passages per resumable shard")
    parser.add_argument("--fp32", action="store_true", help="store float32 instead of float16")
    parser.add_argument("--model-fingerprint", help="default: sha256 of the files in --model-dir")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--limit", type=int, help="encode only the first N passages (smoke tests)")
    parser.add_argument("--overwrite", action="store_true", help="discard an encoding made with another model/corpus")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # torch/transformers are imported only once the arguments are valid
    from dense.distributed import init_distributed, shutdown_distributed
    from dense.encoder import load_encoder

    context = init_distributed()  # a torchrun launch: one rank per GPU; a plain run: one process
    encoder = load_encoder(args.model_dir, device=context.resolve_device(args.device))
    result = encode_corpus(
        encoder,
        Collection(args.collection, args.limit),
        args.out_dir or stage_dir(artifacts_dir(), "dense_index") / "embeddings",
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        fp16=not args.fp32,
        model_fingerprint=args.model_fingerprint or directory_fingerprint(args.model_dir),
        encoder_config=encoder.config.to_dict(),
        overwrite=args.overwrite,
        context=context,
    )
    shutdown_distributed()
    if not context.is_main:
        return 0
    print(f"{result.count} x {result.dim} {result.embeddings.dtype} embeddings in {result.directory}")
    return 0


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
