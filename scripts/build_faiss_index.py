"""Build the faiss index over an encoded corpus (run scripts/encode_corpus.py first).

    python scripts/build_faiss_index.py [--encoded-dir artifacts/dense_index] [--kind flat|hnsw|ivfpq] ...

Flags left out keep the ``dense.faiss_index.IndexConfig`` defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path

from dense.faiss_index import IndexConfig, IndexKind, index_corpus
from hybrid.artifacts import artifacts_dir, stage_dir

INDEX_SUBDIR = "faiss"  # <dense_index>/faiss, where hybrid.Retriever looks for the index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoded-dir", type=Path, help="corpus encoding (default: <artifacts>/dense_index)")
    parser.add_argument("--index-dir", type=Path, help=f"default: <encoded-dir>/{INDEX_SUBDIR}")
    parser.add_argument("--kind", choices=typing.get_args(IndexKind))
    types = typing.get_type_hints(IndexConfig)
    for field in dataclasses.fields(IndexConfig):
        if field.name not in ("kind", "metric"):  # metric: inner product is the only one
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=types[field.name], dest=field.name)
    parser.add_argument("--force", action="store_true", help="rebuild even when the saved index is up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    names = {f.name for f in dataclasses.fields(IndexConfig)}
    config = IndexConfig.from_dict({k: v for k, v in vars(args).items() if k in names and v is not None})
    encoded_dir = args.encoded_dir or stage_dir(artifacts_dir(), "dense_index")
    index_dir = index_corpus(
        encoded_dir,
        config,
        index_dir=args.index_dir or encoded_dir / INDEX_SUBDIR,
        force=args.force,
    )
    print(f"{config.kind} index in {index_dir}")
    return 0


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
