r"""Run the whole pipeline (or some stages) from a config file.

    python scripts/run_pipeline.py --config configs/cpu-marco43k.toml
    python scripts/run_pipeline.py --config configs/cpu-marco43k.toml --stages fusion evaluate --force fusion
    python scripts/run_pipeline.py --config configs/cpu-marco43k.toml --set dense.train.max_steps=100

Stages whose inputs did not change are skipped; interrupted long stages resume from their checkpoints.

On several GPUs, once the stages before them are done, dense training and corpus encoding run on one process per
GPU (rank 0 then runs the stages after them alone):

    torchrun --nproc_per_node=4 scripts/run_pipeline.py --config configs/a10g-full.toml \
        --stages dense_train dense_index fusion rerank evaluate
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hybrid.config import load_config
from hybrid.pipeline import STAGES, Pipeline


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="TOML config (see configs/)")
    p.add_argument("--artifacts", type=Path, default=None, help="artifact directory (default: config or env)")
    p.add_argument("--stages", nargs="*", choices=STAGES, default=None, help="stages to run (default: all)")
    p.add_argument("--force", nargs="*", choices=STAGES, default=(), help="rerun these even if up to date")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (TOML syntax), repeatable")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    pipeline = Pipeline(config, args.artifacts)
    done = pipeline.run(args.stages, args.force)
    # Under torchrun the other ranks stop after the dense stages while rank 0 goes on alone, so the process group
    # is not torn down collectively here: each process leaves it when it exits.
    if not pipeline.context.is_main:
        return
    total = sum(d.get("seconds", 0) for d in done.values())
    print(f"\nartifacts in {pipeline.root}; stage times: "
          + ", ".join(f"{s} {d.get('seconds', 0):.0f}s" for s, d in done.items()) + f" (this run's stages: {total:.0f}s)")


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
