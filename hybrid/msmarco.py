"""MS MARCO passage data in the canonical on-disk layout: readers, validation and subsets.

The canonical layout is one directory holding

- ``collection.tsv``: ``pid <TAB> text``, one passage per line;
- ``queries.<split>.tsv``: ``qid <TAB> query``;
- ``qrels.<split>.txt``: TREC qrels ``qid 0 pid grade`` (any whitespace between fields).

The file readers live in the leaf module :mod:`dense.msmarco_files` (every package reads the files the same way:
as bytes, split on ``\\n`` only) and are re-exported here. Errors are :class:`DataFormatError` naming the file and
the 1-based line.

Downloading the official files lives in :mod:`hybrid.download`, text lookup by pid in :mod:`hybrid.passage_store`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dense.msmarco_files import (
    LAYOUT_HINT,
    Collection,
    DataFormatError,
    iter_collection,
    parse_qrels_lines,
    parse_tsv_lines,
    pid_key,
    read_collection,
    read_qrels,
    read_queries,
    require_file,
)
from hybrid.artifacts import file_checksum, replace_dir, write_json_atomic

__all__ = [  # the readers are re-exported from dense.msmarco_files
    "COLLECTION_FILE",
    "MANIFEST_FILE",
    "SPLITS",
    "Collection",
    "DataFormatError",
    "DataSummary",
    "MsMarcoDir",
    "SplitSummary",
    "as_msmarco_dir",
    "build_subset",
    "parse_qrels_lines",
    "parse_tsv_lines",
    "pid_key",
    "read_collection",
    "read_qrels",
    "read_queries",
    "require_file",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "dl19", "dl20")
COLLECTION_FILE = "collection.tsv"
MANIFEST_FILE = "manifest.json"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def __getattr__(name: str) -> object:
    """``PassageStore`` / ``StaleStoreError`` live in :mod:`hybrid.passage_store` (which imports this module)."""
    if name in ("PassageStore", "StaleStoreError"):
        from hybrid import passage_store

        return getattr(passage_store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the directory ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSummary:
    queries: int
    judged_queries: int  # queries with at least one qrels line
    qrels: int  # judged (query, passage) pairs
    judged_passages_missing: int  # distinct judged pids absent from collection.tsv (normal for pools/subsets)


@dataclass(frozen=True)
class DataSummary:
    root: Path
    passages: int
    splits: dict[str, SplitSummary] = field(default_factory=dict)

    def format(self) -> str:
        """A small plain-text table for command lines and logs."""
        rows = [
            f"{self.root}: {self.passages:,} passages",
            f"{'split':<8}{'queries':>10}{'judged':>10}{'qrels':>10}{'missing':>10}",
        ]
        for name, s in self.splits.items():
            rows.append(
                f"{name:<8}{s.queries:>10,}{s.judged_queries:>10,}{s.qrels:>10,}{s.judged_passages_missing:>10,}"
            )
        rows.append("(missing: judged passages not in collection.tsv)")
        return "\n".join(rows)


@dataclass(frozen=True)
class MsMarcoDir:
    """A directory in the canonical layout (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def collection_path(self) -> Path:
        return self.root / COLLECTION_FILE

    def queries_path(self, split: str) -> Path:
        return self.root / f"queries.{_check_split(split)}.tsv"

    def qrels_path(self, split: str) -> Path:
        return self.root / f"qrels.{_check_split(split)}.txt"

    def splits(self) -> list[str]:
        """Splits that have a queries file: the canonical ones in order, then any others alphabetically."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"data directory {self.root} does not exist. {LAYOUT_HINT}")
        found = {p.name[len("queries.") : -len(".tsv")] for p in self.root.glob("queries.*.tsv")}
        found = {s for s in found if _SPLIT_NAME.fullmatch(s)}
        return [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))

    def queries(self, split: str) -> dict[str, str]:
        return read_queries(self._split_file(self.queries_path(split), split, "queries"))

    def qrels(self, split: str, queries: Mapping[str, str] | None = None) -> dict[str, dict[str, int]]:
        """The split's qrels, checked against its queries (read here unless given)."""
        if queries is None:
            queries = self.queries(split)
        return read_qrels(self._split_file(self.qrels_path(split), split, "qrels"), queries)

    def _split_file(self, path: Path, split: str, what: str) -> Path:
        if not path.is_file():
            have = ", ".join(self.splits()) if self.root.is_dir() else "none (no such directory)"
            raise FileNotFoundError(
                f"no {what} for split {split!r}: {path} does not exist (splits here: {have}). {LAYOUT_HINT}"
            )
        return path

    def validate(self, splits: Sequence[str] | None = None, progress: bool = True) -> DataSummary:
        """Parse every file (all splits unless given) and return counts; raises on the first problem found."""
        names = list(splits) if splits is not None else self.splits()
        if not names:
            raise FileNotFoundError(f"{self.root} has no queries.<split>.tsv files. {LAYOUT_HINT}")
        seen: set[int | str] = set()
        start = time.perf_counter()
        passages = sum(
            1
            for _ in tqdm(
                iter_collection(require_file(self.collection_path, "passage collection"), seen),
                desc="validate collection",
                unit=" passages",
                mininterval=2,
                disable=not progress,
            )
        )
        logger.info("validated %s: %d passages in %.1fs", self.collection_path, passages, time.perf_counter() - start)
        summaries = {}
        for split in names:
            queries = self.queries(split)
            qrels = self.qrels(split, queries) if self.qrels_path(split).is_file() else {}
            if not qrels:
                logger.warning("split %r in %s has no qrels file", split, self.root)
            judged_pids = {pid for judged in qrels.values() for pid in judged}
            summaries[split] = SplitSummary(
                queries=len(queries),
                judged_queries=len(qrels),
                qrels=sum(len(j) for j in qrels.values()),
                judged_passages_missing=sum(1 for pid in judged_pids if pid_key(pid) not in seen),
            )
        return DataSummary(root=self.root, passages=passages, splits=summaries)


def _check_split(split: str) -> str:
    if not _SPLIT_NAME.fullmatch(split):
        raise ValueError(f"invalid split name {split!r}: use letters, digits, '_' or '-' (e.g. {', '.join(SPLITS)})")
    return split


def as_msmarco_dir(data: MsMarcoDir | str | os.PathLike) -> MsMarcoDir:
    return data if isinstance(data, MsMarcoDir) else MsMarcoDir(Path(data))


# --- subsets ---------------------------------------------------------------------------------------------------


def build_subset(
    src: MsMarcoDir | str | os.PathLike,
    out_dir: str | os.PathLike,
    splits: Sequence[str],
    max_queries_per_split: Mapping[str, int] | None = None,
    n_distractors: int = 0,
    seed: int = 13,
    *,
    min_grade: int = 0,
    progress: bool = True,
) -> MsMarcoDir:
    """Write a smaller canonical directory: chosen queries, their judged passages and sampled distractors.

    Per split, the candidate queries are those with at least one qrels line of grade > 0; ``max_queries_per_split``
    caps a split by sampling (all candidates when absent). Every passage judged with grade >= ``min_grade`` for a
    chosen query is kept (0: also the judged-irrelevant ones, which are hard negatives), plus ``n_distractors``
    other passages drawn uniformly by reservoir sampling while streaming the collection, so memory holds only ids.
    The collection is read twice (sample, then write in source order). Qrels of the chosen queries are copied whole.
    Same inputs and seed give byte-identical files. Written atomically with a ``manifest.json``.
    """
    src = as_msmarco_dir(src)
    out_dir = Path(out_dir)
    if not splits:
        raise ValueError("build_subset needs at least one split")
    if out_dir.resolve() == src.root.resolve():
        raise ValueError(f"the subset would replace its own source {src.root}; choose another out_dir")
    caps = dict(max_queries_per_split or {})
    unknown = sorted(set(caps) - set(splits))
    if unknown:
        raise ValueError(f"max_queries_per_split names splits {unknown} that are not in splits={list(splits)}")
    if n_distractors < 0 or any(v < 1 for v in caps.values()):
        raise ValueError("n_distractors must be >= 0 and every max_queries_per_split value >= 1")

    chosen: dict[str, tuple[dict[str, str], dict[str, dict[str, int]]]] = {}
    keep: set[str] = set()
    for split in splits:
        queries = src.queries(split)
        qrels = src.qrels(split, queries)
        candidates = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
        if split in caps and caps[split] < len(candidates):
            picked = set(random.Random(f"{seed}/queries/{split}").sample(candidates, caps[split]))
            candidates = [q for q in candidates if q in picked]  # keep source order
        chosen[split] = ({q: queries[q] for q in candidates}, {q: qrels[q] for q in candidates})
        keep.update(pid for q in candidates for pid, g in qrels[q].items() if g >= min_grade)
        logger.info("subset %s: %d of %d queries", split, len(candidates), len(queries))

    found, distractors, total = _sample_distractors(src.collection_path, keep, n_distractors, seed, progress)
    if len(distractors) < n_distractors:
        logger.warning(
            "only %d passages besides the judged ones; asked for %d distractors", len(distractors), n_distractors
        )
    missing = len(keep) - len(found)
    if missing:
        logger.warning("%d judged passages of the chosen queries are not in %s", missing, src.collection_path)

    wanted = found | distractors
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=False)
    try:
        written = 0
        with open(tmp / COLLECTION_FILE, "wb") as f:
            for pid, text in tqdm(
                iter_collection(src.collection_path, None),
                desc="write subset",
                total=total,
                unit=" passages",
                mininterval=2,
                disable=not progress,
            ):
                if pid in wanted:
                    f.write(f"{pid}\t{text}\n".encode())
                    written += 1
        split_counts = {}
        for split, (queries, qrels) in chosen.items():
            target = MsMarcoDir(tmp)
            with open(target.queries_path(split), "wb") as f:
                f.writelines(f"{qid}\t{text}\n".encode() for qid, text in queries.items())
            with open(target.qrels_path(split), "wb") as f:
                f.writelines(
                    f"{qid} 0 {pid} {g}\n".encode() for qid, judged in qrels.items() for pid, g in judged.items()
                )
            split_counts[split] = {"queries": len(queries), "qrels": sum(len(j) for j in qrels.values())}
        write_json_atomic(
            tmp / MANIFEST_FILE,
            {
                "kind": "msmarco-subset",
                "source": str(src.root.resolve()),
                "source_collection_checksum": file_checksum(src.collection_path),
                "splits": split_counts,
                "max_queries_per_split": caps,
                "min_grade": min_grade,
                "seed": seed,
                "distractors_requested": n_distractors,
                "distractors": len(distractors),
                "judged_passages_kept": len(found),
                "judged_passages_missing": missing,
                "passages": written,
                "source_passages": total,
            },
        )
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "subset written to %s: %d passages (%d judged, %d distractors)", out_dir, written, len(found), len(distractors)
    )
    return MsMarcoDir(out_dir)


def _sample_distractors(
    collection: Path, keep: set[str], k: int, seed: int, progress: bool
) -> tuple[set[str], set[str], int]:
    """One streaming pass: the kept pids found, a uniform sample of k others (Algorithm R), the passage count."""
    rng = random.Random(f"{seed}/distractors")
    found: set[str] = set()
    reservoir: list[str] = []
    seen_others = 0
    total = 0
    start = time.perf_counter()
    bar = tqdm(desc="sample distractors", unit=" passages", mininterval=2, disable=not progress)
    for pid, _ in iter_collection(require_file(collection, "passage collection"), set()):
        total += 1
        bar.update()
        if pid in keep:
            found.add(pid)
            continue
        if len(reservoir) < k:
            reservoir.append(pid)
        elif k:
            j = rng.randrange(seen_others + 1)
            if j < k:
                reservoir[j] = pid
        seen_others += 1
    bar.close()
    elapsed = time.perf_counter() - start
    logger.info("scanned %d passages in %.1fs (%.0f/s)", total, elapsed, total / max(elapsed, 1e-9))
    return found, set(reservoir), total
