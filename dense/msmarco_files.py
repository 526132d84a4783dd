"""The one reader of MS MARCO files (``collection.tsv``, ``queries.<split>.tsv``, TREC qrels), for every package.

Files are read as bytes and split on ``\\n`` only: real passages contain characters such as U+0085 or U+2028 that
``str.splitlines`` would treat as line ends, and a carriage return that text-mode files (universal newlines) would
take for one; opened that way, one passage of the official collection becomes two lines. A line is split on its
first tab only, so a text may itself contain tabs. Errors are :class:`DataFormatError` naming the file and the
1-based line.

A leaf module (no ``hybrid`` import) so that ``dense``, ``fusion`` and ``sparse`` read the files the same way;
:mod:`hybrid.msmarco` re-exports it and adds the directory layout, validation and subsets.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

_ID = re.compile(r"\S+")
LAYOUT_HINT = (
    "A data directory holds collection.tsv, queries.<split>.tsv and qrels.<split>.txt; create one with "
    "`python scripts/prepare_data.py --source download --out DIR` or point MSMARCO_DIR / data.dir at an existing one."
)


class DataFormatError(ValueError):
    """A data file is malformed; ``source`` and ``line`` (1-based, None for the whole file) say where."""

    def __init__(self, source: str | os.PathLike, line: int | None, problem: str, hint: str = "") -> None:
        self.source = str(source)
        self.line = line
        self.problem = problem
        where = f"{self.source}:{line}" if line is not None else self.source
        super().__init__(f"{where}: {problem}" + (f". {hint}" if hint else ""))


def require_file(path: str | os.PathLike, what: str, hint: str = LAYOUT_HINT) -> Path:
    """``path`` as a Path, or FileNotFoundError naming it, what it should hold and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} does not exist or is not a file. {hint}")
    return path


# --- line parsers (shared by the file readers and the download converters) -------------------------------------


def parse_tsv_lines(lines: Iterable[bytes], source: str | os.PathLike, kind: str) -> Iterator[tuple[int, str, str]]:
    """``(line_number, id, text)`` per ``id<TAB>text`` line; ``kind`` ("passage", "query") words the errors."""
    lineno = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith(b"\n") else raw
        tab = line.find(b"\t")
        if tab < 0:
            raise DataFormatError(
                source, lineno, f"expected '{kind} id<TAB>text' but the line has no tab: {_show(line)}"
            )
        try:
            key = line[:tab].decode("utf-8")
            text = line[tab + 1 :].decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(source, lineno, f"not valid UTF-8 at byte {e.start}: {_show(line)}") from e
        if not _ID.fullmatch(key):
            problem = f"empty {kind} id" if not key.strip() else f"{kind} id {key!r} contains whitespace"
            raise DataFormatError(source, lineno, f"{problem}: {_show(line)}")
        yield lineno, key, text
    if lineno == 0:
        raise DataFormatError(source, None, f"file is empty (expected '{kind} id<TAB>text' lines)")


def parse_qrels_lines(lines: Iterable[bytes], source: str | os.PathLike) -> Iterator[tuple[int, str, str, int]]:
    """``(line_number, qid, pid, grade)`` per TREC qrels line ``qid <iteration> pid grade``."""
    lineno = 0
    for lineno, raw in enumerate(lines, 1):
        try:
            fields = raw.decode("utf-8").split()
        except UnicodeDecodeError as e:
            raise DataFormatError(source, lineno, f"not valid UTF-8 at byte {e.start}: {_show(raw)}") from e
        if len(fields) != 4:
            raise DataFormatError(
                source, lineno, f"expected 4 fields 'qid 0 pid grade', found {len(fields)}: {_show(raw)}"
            )
        qid, _, pid, grade = fields
        try:
            value = int(grade)
        except ValueError:
            raise DataFormatError(source, lineno, f"relevance grade {grade!r} is not an integer") from None
        yield lineno, qid, pid, value
    if lineno == 0:
        raise DataFormatError(source, None, "file is empty (expected TREC qrels lines 'qid 0 pid grade')")


def _show(line: bytes, limit: int = 80) -> str:
    text = line.rstrip(b"\n").decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def pid_key(pid: str) -> int | str:
    """A compact set key for a pid: an int for canonical decimal ids (MS MARCO's), the string otherwise."""
    if pid.isascii() and pid.isdigit() and (pid == "0" or pid[0] != "0"):
        return int(pid)
    return pid


# --- file readers ----------------------------------------------------------------------------------------------


def read_collection(path: str | os.PathLike, check_duplicates: bool = True) -> Iterator[tuple[str, str]]:
    """Stream ``(pid, text)`` from a ``collection.tsv``; a repeated pid raises (set of ids: ~0.5 GB at 8.8M)."""
    return iter_collection(require_file(path, "passage collection"), set() if check_duplicates else None)


def iter_collection(path: Path, seen: set[int | str] | None) -> Iterator[tuple[str, str]]:
    """``(pid, text)`` of an existing collection file; ``seen`` (when given) collects the pid keys and catches
    repeats."""
    with open(path, "rb") as f:
        for lineno, pid, text in parse_tsv_lines(f, path, "passage"):
            if seen is not None:
                key = pid_key(pid)
                if key in seen:
                    raise DataFormatError(path, lineno, f"duplicate passage id {pid!r} (already on an earlier line)")
                seen.add(key)
            yield pid, text


class Collection:
    """Re-iterable ``(pid, text)`` view of a collection.tsv (each iteration re-reads the file; ``limit`` caps it)."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None) -> None:
        self.path = require_file(path, "passage collection")
        self.limit = limit

    def __iter__(self) -> Iterator[tuple[str, str]]:
        rows = read_collection(self.path)
        return rows if self.limit is None else itertools.islice(rows, self.limit)


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """``{qid: query}`` from a ``qid<TAB>query`` file, in file order; a repeated qid raises."""
    path = require_file(path, "queries file")
    queries: dict[str, str] = {}
    with open(path, "rb") as f:
        for lineno, qid, text in parse_tsv_lines(f, path, "query"):
            if qid in queries:
                raise DataFormatError(path, lineno, f"duplicate query id {qid!r} (already on an earlier line)")
            queries[qid] = text
    return queries


def read_qrels(path: str | os.PathLike, queries: Mapping[str, str] | None = None) -> dict[str, dict[str, int]]:
    """``{qid: {pid: grade}}`` from TREC qrels; with ``queries``, a qid missing from them raises."""
    path = require_file(path, "qrels file")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, "rb") as f:
        for lineno, qid, pid, grade in parse_qrels_lines(f, path):
            if queries is not None and qid not in queries:
                raise DataFormatError(
                    path,
                    lineno,
                    f"query id {qid!r} is not in the queries file",
                    "The qrels and queries files of this split disagree; regenerate them together "
                    "(scripts/prepare_data.py) or fix the split.",
                )
            judged = qrels.setdefault(qid, {})
            if judged.get(pid, grade) != grade:
                raise DataFormatError(
                    path, lineno, f"query {qid!r} judges passage {pid!r} twice, with grades {judged[pid]} and {grade}"
                )
            judged[pid] = grade
    return qrels


def iter_tsv_rows(path: str | os.PathLike, kind: str = "row") -> Iterator[tuple[str, str]]:
    """``(id, text)`` of any ``id<TAB>text`` file in file order, without a duplicate check; ``kind`` words errors."""
    path = require_file(path, f"{kind} file")
    return (row[1:] for row in _parse_file(path, kind))


def _parse_file(path: Path, kind: str) -> Iterator[tuple[int, str, str]]:
    with open(path, "rb") as f:
        yield from parse_tsv_lines(f, path, kind)
