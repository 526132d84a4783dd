"""``hybrid-search``: search the built artifacts from the shell, as ``python -m pyserini.search.lucene`` does.

    hybrid-search "what is the capital of france" [-k 10] [--mode M] [--json] [--artifacts DIR]
    hybrid-search --topics queries.tsv --output run.trec [-k 1000] [--batch 64] [--mode M] [--artifacts DIR]

One query prints ranked results (rank, passage id, score, the start of the text), or JSON with ``--json``. A topics
file (``qid<TAB>query`` lines) is searched in batches and written as a TREC run (``qid Q0 pid rank score tag``), with
a progress bar. Errors (no artifacts, an unreadable file, bad arguments) are one line on stderr and exit status 2
(usage) or 1 (anything else), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hybrid.searchers import MODES

PROG = "hybrid-search"
SNIPPET_CHARS = 100
DEFAULT_BATCH = 64
EXIT_ERROR, EXIT_USAGE = 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (``hybrid-search: error: ... (see --help)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", nargs="?", help="the query text (or use --topics)")
    p.add_argument("-k", "--k", type=int, default=None, help="results per query (default: 10, or 1000 with --topics)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="retriever mode (default: the artifacts' default, rerank or hybrid)")
    p.add_argument("--artifacts", type=Path, default=None, help="artifact directory (default: $HYBRID_ARTIFACTS "
                   "or <repo>/artifacts)")
    p.add_argument("--json", action="store_true", help="print the results of one query as JSON")
    p.add_argument("--topics", type=Path, default=None, help="qid<TAB>query file to search (needs --output)")
    p.add_argument("--output", type=Path, default=None, help="TREC run file to write for --topics")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="queries per batch_search call with --topics")
    p.add_argument("--tag", default=None, help="run tag of the TREC file (default: hybrid-<mode>)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (``sys.exit(main())`` for the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.query is None) == (args.topics is None):
        parser.error("give either a query or --topics FILE")
    if args.topics is not None and args.output is None:
        parser.error("--topics needs --output RUN_FILE")
    if args.query is not None and args.output is not None:
        parser.error("--output goes with --topics; a single query prints its results")
    if args.k is not None and args.k < 1:
        parser.error(f"-k must be >= 1, got {args.k}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        if args.topics is not None:
            _search_topics(args)
        else:
            _search_one(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
        # ArtifactError is a RuntimeError; DataFormatError a ValueError; a missing file an OSError
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _retriever(args: argparse.Namespace):
    from transformers.utils import logging as hf_logging

    from hybrid.retriever import Retriever

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the results
    hf_logging.set_verbosity_error()
    return Retriever(mode=args.mode, artifacts_dir=args.artifacts)


def _search_one(args: argparse.Namespace) -> None:
    retriever = _retriever(args)
    try:
        results = retriever.search(args.query, args.k or 10)
    finally:
        retriever.close()
    if args.json:
        rows = [{"rank": i, "id": r.document_id, "score": r.score, "text": r.document_text}
                for i, r in enumerate(results, start=1)]
        print(json.dumps({"query": args.query, "mode": retriever.mode, "results": rows}, ensure_ascii=False))
        return
    for i, r in enumerate(results, start=1):
        print(f"{i:>3} {r.document_id:<10} {r.score:.5f}  {_snippet(r.document_text)}")


def _search_topics(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from hybrid.evaluation import write_trec_run
    from hybrid.msmarco import read_queries

    topics = read_queries(args.topics)  # before loading models: a bad file fails fast
    if not topics:
        raise ValueError(f"{args.topics} holds no queries")
    blank = [qid for qid, text in topics.items() if not text.strip()]
    if blank:
        raise ValueError(f"{args.topics}: query {blank[0]!r} is empty ({len(blank)} empty in all)")
    retriever = _retriever(args)
    k = args.k or 1000
    qids = list(topics)
    run = {}
    try:
        with tqdm(total=len(qids), desc=f"{retriever.mode} k={k}", unit="query") as bar:
            for lo in range(0, len(qids), args.batch):
                batch = qids[lo : lo + args.batch]
                for qid, ranking in zip(batch, retriever.batch_rank([topics[q] for q in batch], k), strict=True):
                    run[qid] = ranking
                bar.update(len(batch))
    finally:
        retriever.close()
    write_trec_run(run, args.output, args.tag or f"hybrid-{retriever.mode}")
    print(f"{PROG}: wrote {sum(map(len, run.values()))} lines for {len(run)} queries to {args.output}",
          file=sys.stderr)


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "..."


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError) and error.args:
        message = " ".join(str(error.args[0]).split())
    return message


__all__ = ["build_parser", "main"]
