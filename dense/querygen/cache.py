"""Append-only JSONL cache of generated queries, so a killed generation run resumes where it stopped.

One line per passage: ``{"fingerprint", "pid", "queries", "raw", "example_qids"}``. A line counts only for the
generation fingerprint (model + prompt + config hash) it was written under, so changing any of those regenerates
instead of mixing outputs; lines of other fingerprints are kept in the file and ignored. Each batch is flushed and
fsynced; a kill can therefore leave at most a torn *last* line, which is truncated away with a warning on open.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from dense.querygen.records import GeneratedQueries

logger = logging.getLogger(__name__)


class CacheCorruptError(ValueError):
    """A cache line other than the last one is not valid JSON (the file was edited or two writers collided)."""


class QueryCache:
    """Generated queries for one generation fingerprint, backed by an append-only JSONL file."""

    def __init__(self, path: str | Path, fingerprint: str, read_only: bool = False):
        """``read_only``: for a reader beside a running generator (an export of what is done so far): a torn last
        line is skipped instead of truncated, since it may be a line the writer is still writing."""
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.read_only = read_only
        self._records: dict[str, GeneratedQueries] = {}
        self.num_other_fingerprints = 0
        self.generation_seconds = 0.0  # model time spent on this fingerprint's lines, summed over sittings
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._load()
        if self._records:
            logger.info("cache %s: %d passages already generated (fingerprint %s)", self.path,
                        len(self._records), fingerprint)

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0  # byte offset just past the last complete, parseable line
        lines = data.split(b"\n")
        offset = 0
        for i, line in enumerate(lines):
            is_last = i == len(lines) - 1
            end = offset + len(line) + (0 if is_last else 1)
            if line.strip():
                try:
                    if is_last:  # no trailing newline: the write of this line was cut short
                        raise ValueError("line has no terminating newline")
                    obj = json.loads(line)
                except ValueError as e:
                    if self.read_only and (is_last or all(not rest.strip() for rest in lines[i + 1:])):
                        return
                    if is_last or all(not rest.strip() for rest in lines[i + 1:]):
                        logger.warning(
                            "cache %s: torn last line at byte %d (%s), probably from a killed run; truncating it",
                            self.path, offset, e)
                        with self.path.open("r+b") as f:
                            f.truncate(good_end)
                            f.flush()
                            os.fsync(f.fileno())
                        return
                    raise CacheCorruptError(
                        f"{self.path}:{i + 1}: not valid JSON ({e}); the cache is append-only and only its last line "
                        "may be torn. Delete the file to regenerate from scratch"
                    ) from e
                self._add_line(obj)
            good_end = end
            offset = end

    def _add_line(self, obj: dict) -> None:
        if obj.get("fingerprint") != self.fingerprint:
            self.num_other_fingerprints += 1
            return
        rec = GeneratedQueries(
            pid=str(obj["pid"]),
            queries=tuple(obj["queries"]),
            raw=tuple(obj.get("raw", ())),
            example_qids=tuple(obj.get("example_qids", ())),
        )
        self._records[rec.pid] = rec
        self.generation_seconds += float(obj.get("seconds", 0.0))

    def __contains__(self, pid: object) -> bool:
        return pid in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, pid: str) -> GeneratedQueries | None:
        """The cached record of ``pid`` under this fingerprint, if any."""
        return self._records.get(pid)

    def records(self) -> Iterator[GeneratedQueries]:
        """All cached records of this fingerprint, in the order they were generated."""
        return iter(list(self._records.values()))

    def append(self, records: Iterable[GeneratedQueries], seconds: float | None = None) -> None:
        """Append one batch durably (one write, flush, fsync); ``seconds``: the batch's model time, recorded as an
        equal share per line so throughput can be reported over every sitting."""
        if self.read_only:
            raise PermissionError(f"cache {self.path} was opened read-only")
        records = list(records)
        if not records:
            return
        share = {"seconds": round(seconds / len(records), 4)} if seconds is not None else {}
        payload = "".join(
            json.dumps({"fingerprint": self.fingerprint, "pid": r.pid, "queries": list(r.queries),
                        "raw": list(r.raw), "example_qids": list(r.example_qids), **share},
                       ensure_ascii=False) + "\n"
            for r in records
        )
        with self.path.open("a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self._records[r.pid] = r
        self.generation_seconds += seconds or 0.0
