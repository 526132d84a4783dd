r"""Get MS MARCO passage data into the canonical layout, check it, or cut a subset from it.

    python scripts/prepare_data.py --source local --dir "$MSMARCO_DIR"          # validate, print counts
    python scripts/prepare_data.py --source download --out data/msmarco         # fetch v1 + TREC DL 19/20 (~1.1 GB)
    python scripts/prepare_data.py --subset --src data/msmarco --out data/msmarco-1m \
        --splits train dev dl19 dl20 --max-queries train=50000 --distractors 1000000 --seed 13
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hybrid.download import MSMARCO_V1_RESOURCES, download_msmarco
from hybrid.msmarco import SPLITS, MsMarcoDir, build_subset


def _pairs(items: list[str], flag: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not (key and sep and value):
            parser.error(f"{flag} takes KEY=VALUE items, got {item!r}")
        pairs[key] = value
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["local", "download"], help="validate --dir, or download into --out")
    parser.add_argument("--subset", action="store_true", help="write a subset of --src into --out")
    parser.add_argument("--dir", type=Path, help="(local) the directory to validate")
    parser.add_argument("--src", type=Path, help="(subset) the full directory to cut from")
    parser.add_argument("--out", type=Path, help="(download, subset) the directory to write")
    parser.add_argument(
        "--splits", nargs="+", help=f"splits to fetch (default: {' '.join(SPLITS)}) or keep (default: all)"
    )
    parser.add_argument("--download-dir", type=Path, help="(download) where archives go (default: OUT/downloads)")
    parser.add_argument("--delete-downloads", action="store_true", help="(download) remove the archives afterwards")
    parser.add_argument("--all-dl-topics", action="store_true", help="(download) keep the unjudged TREC DL topics too")
    parser.add_argument(
        "--url",
        nargs="*",
        default=[],
        metavar="NAME=URL",
        help=f"(download) mirror of an official file; names: {', '.join(MSMARCO_V1_RESOURCES)}",
    )
    parser.add_argument("--max-queries", nargs="*", default=[], metavar="SPLIT=N", help="(subset) sample N queries")
    parser.add_argument("--distractors", type=int, default=0, help="(subset) passages added besides the judged ones")
    parser.add_argument("--min-grade", type=int, default=0, help="(subset) keep judged passages with grade >= this")
    parser.add_argument("--seed", type=int, default=13, help="(subset) sampling seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    progress = not args.quiet

    if args.subset == (args.source is not None):
        parser.error("give exactly one of --source {local,download} or --subset")
    if args.subset:
        if args.src is None or args.out is None:
            parser.error("--subset needs --src and --out")
        caps = _pairs(args.max_queries, "--max-queries", parser)
        if not all(v.isdigit() for v in caps.values()):
            parser.error("--max-queries takes SPLIT=N items with a whole number N")
        data = build_subset(
            args.src,
            args.out,
            args.splits or MsMarcoDir(args.src).splits(),
            {k: int(v) for k, v in caps.items()},
            args.distractors,
            args.seed,
            min_grade=args.min_grade,
            progress=progress,
        )
    elif args.source == "download":
        if args.out is None:
            parser.error("--source download needs --out")
        data = download_msmarco(
            args.out,
            _pairs(args.url, "--url", parser),
            splits=args.splits or SPLITS,
            download_dir=args.download_dir,
            keep_downloads=not args.delete_downloads,
            judged_only=not args.all_dl_topics,
            progress=progress,
        )
    else:
        if args.dir is None:
            parser.error("--source local needs --dir")
        data = MsMarcoDir(args.dir)
    print(data.validate(progress=progress).format())
    return 0


if __name__ == "__main__":
    from hybrid.scripting import run_script

    sys.exit(run_script(main))
