r"""Data-scaling curve of the dense model (issue 11): metric vs number of synthetic training queries, from
``scripts/ablation_run.sh`` directories; writes a PNG and a markdown table (EXPERIMENTS.md).

    python scripts/plot_scaling.py --run /tmp/exps/scale-0 --run /tmp/exps/scale-2500 --run /tmp/exps/scale-all \
        --reference crops=/tmp/exps/mix-crop --mode dense --splits holdout dev dl19 \
        --metrics R@1 MRR@10 R@100 --out docs/scaling.png

x values come from each run's dense_train/stage.json (synthetic_queries), not from the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybrid.scripting import run_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", dest="runs", type=Path, action="append", required=True,
                   help="an ablation run directory (a point of the curve); repeat")
    p.add_argument("--reference", dest="references", action="append", default=[], metavar="LABEL=DIR",
                   help="a run drawn as a dashed line (e.g. crops=/tmp/exps/mix-crop); repeat")
    p.add_argument("--mode", default="dense", help="the evaluated mode to plot (default: dense)")
    p.add_argument("--splits", nargs="+", default=["holdout", "dev", "dl19"])
    p.add_argument("--metrics", nargs="+", default=["R@1", "MRR@10", "R@100"])
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True, help="PNG path; the table goes next to it as .md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from hybrid.scaling import load_run, scaling_chart, scaling_table

    references = {}
    for spec in args.references:
        label, sep, directory = spec.partition("=")
        if not sep or not label or not directory:
            raise ValueError(f"--reference {spec!r}: expected LABEL=DIR")
        references[label] = load_run(directory, args.mode, args.splits)
    points = [load_run(d, args.mode, args.splits) for d in args.runs]
    table = scaling_table(points, list(references.values()), args.splits, args.metrics)
    png = scaling_chart(points, references, args.splits, args.metrics, args.out, title=args.title)
    md = args.out.with_suffix(".md")
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(table)
    tmp.replace(md)
    print(table)
    print(f"wrote {png} and {md}")


if __name__ == "__main__":
    sys.exit(run_script(main))
