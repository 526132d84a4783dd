"""Synthetic training data on disk: ``train.jsonl`` in the project's record format plus ``manifest.json``.

Record: ``{"qid", "query", "positives": [pid], "negatives": [], "source"}``; inverse-cloze pairs add
``"positive_texts": [text]`` (aligned with ``positives``) because their positive is the passage minus the query
sentence, not the stored passage. Files are written to a temporary name, fsynced and moved into place; the manifest
is written last, so its presence means the stage finished.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dense.atomic import atomic_file, write_json_atomic
from dense.atomic import sha256_file as file_sha256  # noqa: F401  (re-exported for dense.querygen.pipeline)
from dense.querygen.records import GeneratedQueries, QueryPair

TRAIN_FILE = "train.jsonl"
MANIFEST_FILE = "manifest.json"


def llm_pairs(records: Iterable[GeneratedQueries]) -> Iterator[QueryPair]:
    """Flatten generated records into pairs with ids ``llm-<pid>-<i>`` (``i``: position among the passage's queries)."""
    for rec in records:
        for i, query in enumerate(rec.queries):
            yield QueryPair(f"llm-{rec.pid}-{i}", query, rec.pid, "llm")


def training_record(pair: QueryPair) -> dict[str, Any]:
    """One JSONL record of the generic training-data format."""
    rec: dict[str, Any] = {"qid": pair.qid, "query": pair.query, "positives": [pair.pid], "negatives": [],
                           "source": pair.source}
    if pair.positive_text is not None:
        rec["positive_texts"] = [pair.positive_text]
    return rec


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL atomically (:func:`dense.atomic.atomic_file`); returns the number written."""
    n = 0
    with atomic_file(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_training_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``train.jsonl``; raises naming the line when one is malformed."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
            missing = {"qid", "query", "positives", "negatives", "source"} - set(rec)
            if missing:
                raise ValueError(f"{path}:{line_no}: record lacks {sorted(missing)}")
            out.append(rec)
    return out


def write_output(out_dir: str | Path, pairs: Iterable[QueryPair], manifest: dict[str, Any]) -> Path:
    """Write ``train.jsonl`` then ``manifest.json`` (with ``counts.records``) into ``out_dir``; returns the file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # a stale manifest must not vouch for a new train.jsonl
    n = write_jsonl_atomic(out_dir / TRAIN_FILE, (training_record(p) for p in pairs))
    manifest = {**manifest, "counts": {**manifest.get("counts", {}), "records": n}, "files": [TRAIN_FILE]}
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return out_dir / TRAIN_FILE
