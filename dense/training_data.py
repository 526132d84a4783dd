"""Training records for the dense encoder: read, mix, build from MS MARCO train, and mine hard negatives.

A record is one line of JSONL (see DESIGN.md):
``{"qid": "...", "query": "...", "positives": ["pid", ...], "negatives": ["pid", ...], "source": "msmarco-train"}``.
Records name passages by pid only; the passage text comes from the collection at training time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dense.atomic import atomic_file
from dense.msmarco_files import read_collection

logger = logging.getLogger(__name__)

Ranking = list[tuple[str, float]]
BatchSearch = Callable[[list[str], int], list[Ranking]]


class RecordFormatError(ValueError):
    """A training-record file has a malformed line; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """One training query with its positive passages and (optionally) hard-negative passages."""

    qid: str
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    source: str = "unknown"

    @classmethod
    def from_json(cls, obj: Any, where: str = "") -> TrainingRecord:
        """Validate a parsed JSON object; ``where`` (``file:line``) prefixes every error."""
        prefix = f"{where}: " if where else ""
        if not isinstance(obj, dict):
            raise RecordFormatError(f"{prefix}expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("qid", "query", "positives") if k not in obj]
        if missing:
            raise RecordFormatError(f"{prefix}missing key(s) {missing}")
        qid = obj["qid"]
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise RecordFormatError(f"{prefix}qid must be a string, got {qid!r}")
        query = obj["query"]
        if not isinstance(query, str) or not query.strip():
            raise RecordFormatError(f"{prefix}query of qid {qid} must be a non-empty string, got {query!r}")
        lists = {}
        for key in ("positives", "negatives"):
            value = obj.get(key, [])
            if not isinstance(value, list) or not all(isinstance(p, (str, int)) for p in value):
                raise RecordFormatError(f"{prefix}{key} of qid {qid} must be a list of pids, got {value!r}")
            lists[key] = tuple(str(p) for p in value)
        if not lists["positives"]:
            raise RecordFormatError(f"{prefix}qid {qid} has no positives")
        source = obj.get("source", "unknown")
        if not isinstance(source, str):
            raise RecordFormatError(f"{prefix}source of qid {qid} must be a string, got {source!r}")
        return cls(str(qid), query, lists["positives"], lists["negatives"], source)

    def to_json(self) -> dict[str, Any]:
        return {
            "qid": self.qid,
            "query": self.query,
            "positives": list(self.positives),
            "negatives": list(self.negatives),
            "source": self.source,
        }


def iter_jsonl(path: Path, error: type[ValueError]) -> Iterator[tuple[str, Any]]:
    """``(file:line, parsed object)`` for every non-blank line of a JSONL file; a line that is not JSON raises
    ``error`` naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_records(path: str | Path) -> list[TrainingRecord]:
    """All records of a JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training records file {path} does not exist")
    return [TrainingRecord.from_json(obj, where) for where, obj in iter_jsonl(path, RecordFormatError)]


def write_records(records: Iterable[TrainingRecord], path: str | Path) -> Path:
    """Write records as JSONL atomically (a failed write leaves the previous file)."""
    with atomic_file(path, "w") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    return Path(path)


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """A record file in a mix: ``cap`` keeps at most that many records, ``weight`` then scales their count
    (2.0 repeats each record twice, 0.5 keeps a random half)."""

    path: Path
    cap: int | None = None
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> RecordSource:
        """``FILE[,cap=N][,weight=W]``, the command-line form."""
        path, *options = spec.split(",")
        values: dict[str, Any] = {}
        for option in options:
            key, _, value = option.partition("=")
            if key == "cap":
                values["cap"] = int(value)
            elif key == "weight":
                values["weight"] = float(value)
            else:
                raise ValueError(f"record source {spec!r}: unknown option {key!r}; use FILE[,cap=N][,weight=W]")
        return cls(Path(path), **values)


def _resample(
    records: list[TrainingRecord], cap: int | None, weight: float, rng: random.Random
) -> list[TrainingRecord]:
    if cap is not None and len(records) > cap:
        records = [records[i] for i in sorted(rng.sample(range(len(records)), cap))]
    whole, fraction = divmod(weight, 1.0)
    extra = round(fraction * len(records))
    return records * int(whole) + [records[i] for i in sorted(rng.sample(range(len(records)), extra))]


def mix_records(sources: Sequence[RecordSource | str | Path], seed: int = 0) -> list[TrainingRecord]:
    """Read several record files and concatenate them after per-source capping and weighting (deterministic)."""
    mixed: list[TrainingRecord] = []
    for index, source in enumerate(sources):
        if not isinstance(source, RecordSource):
            source = RecordSource(Path(source))
        records = read_records(source.path)
        kept = _resample(records, source.cap, source.weight, random.Random(f"{seed}-{index}"))
        logger.info("records: %s: %d read, %d used (cap=%s, weight=%s)", source.path, len(records), len(kept),
                    source.cap, source.weight)
        mixed.extend(kept)
    return mixed


def source_counts(records: Iterable[TrainingRecord]) -> dict[str, int]:
    """Number of records per ``source``."""
    return dict(Counter(r.source for r in records))


def record_pids(records: Iterable[TrainingRecord]) -> set[str]:
    """Every pid a record names (positives and negatives)."""
    return {pid for r in records for pid in (*r.positives, *r.negatives)}


def mine_hard_negatives(
    records: Sequence[TrainingRecord],
    search: BatchSearch,
    depth: int,
    n_negatives: int,
    skip_top: int = 0,
    known_positives: Mapping[str, Container[str]] | None = None,
    batch_size: int = 256,
    keep_existing: bool = False,
) -> list[TrainingRecord]:
    """Replace each record's negatives by the top retrieved passages that are not known positives.

    ``search(queries, k)`` is a batch searcher (e.g. BM25's ``batch_search``). The first ``skip_top`` ranks are
    skipped (they hold many unlabelled positives), and every pid in the record's positives or in
    ``known_positives[qid]`` is excluded. ``keep_existing`` keeps the record's own negatives first.
    """
    if depth < 1 or n_negatives < 0 or skip_top < 0:
        raise ValueError(f"depth={depth}, n_negatives={n_negatives}, skip_top={skip_top}: need depth >= 1, others >= 0")
    known_positives = known_positives or {}
    mined: list[TrainingRecord] = []
    empty = 0
    for start in tqdm(range(0, len(records), batch_size), desc="mine negatives", unit="batch"):
        chunk = records[start : start + batch_size]
        rankings = search([r.query for r in chunk], depth)
        if len(rankings) != len(chunk):
            raise ValueError(f"search returned {len(rankings)} rankings for {len(chunk)} queries")
        for record, ranking in zip(chunk, rankings, strict=True):
            positives = set(record.positives)
            known = known_positives.get(record.qid, ())
            negatives: list[str] = list(record.negatives) if keep_existing else []
            seen = set(negatives)
            for pid, _ in ranking[skip_top:]:
                if len(negatives) >= n_negatives + (len(record.negatives) if keep_existing else 0):
                    break
                if pid in positives or pid in known or pid in seen:
                    continue
                negatives.append(pid)
                seen.add(pid)
            empty += not negatives
            mined.append(dataclasses.replace(record, negatives=tuple(negatives)))
    if empty:
        logger.warning("mine_hard_negatives: %d of %d queries got no negative (depth %d too small?)",
                       empty, len(records), depth)
    return mined


def read_msmarco_train_records(
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int] | Iterable[str]],
    passage_ids: Container[str],
    min_grade: int = 1,
    source: str = "msmarco-train",
) -> list[TrainingRecord]:
    """Records for the train queries whose positives (grade >= ``min_grade``) exist in the corpus.

    ``qrels`` maps qid to ``{pid: grade}`` or to an iterable of relevant pids. Positives missing from
    ``passage_ids`` are dropped, and so are queries left without one or without query text.
    """
    records = []
    no_text = no_positive = 0
    for qid, judged in qrels.items():
        if isinstance(judged, Mapping):
            relevant = [pid for pid, grade in judged.items() if grade >= min_grade]
        else:
            relevant = list(judged)
        positives = tuple(pid for pid in relevant if pid in passage_ids)
        if not positives:
            no_positive += 1
            continue
        query = queries.get(qid)
        if not query:
            no_text += 1
            continue
        records.append(TrainingRecord(qid, query, positives, (), source))
    logger.info("msmarco train: %d records; dropped %d queries without a positive in the corpus, %d without text",
                len(records), no_positive, no_text)
    return records


def read_passages(collection_tsv: str | Path, pids: Container[str] | None = None) -> dict[str, str]:
    """``{pid: text}`` from a ``collection.tsv``, keeping only ``pids`` when given (saves memory on 8.8M)."""
    path = Path(collection_tsv)
    rows = tqdm(read_collection(path), desc=f"read {path.name}", unit=" passages", mininterval=5)
    return {pid: text for pid, text in rows if pids is None or pid in pids}


__all__ = [
    "BatchSearch",
    "RecordFormatError",
    "RecordSource",
    "TrainingRecord",
    "mine_hard_negatives",
    "mix_records",
    "read_msmarco_train_records",
    "read_passages",
    "read_records",
    "record_pids",
    "source_counts",
    "write_records",
]
