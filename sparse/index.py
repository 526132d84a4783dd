"""Build a Lucene BM25 index with Anserini from ``(pid, text)`` pairs.

The build runs Anserini's ``IndexCollection`` in a child ``java`` process (from :mod:`sparse.jvm`'s Java home):
it can use many threads, can be killed cleanly, and keeps the JVM heap out of the Python process. Everything is
written under ``<index_dir>.tmp-<pid>`` and renamed to ``index_dir`` only when the build finished and the
document count matches, so a killed build never leaves a half index that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from dense.atomic import remove_dead_temporaries
from sparse.jvm import anserini_jar, java_executable

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class IndexConfig:
    """How the Lucene index is built."""

    threads: int = 2
    heap: str = "4g"
    docs_per_shard: int = 500_000  # JSONL shards fed to Anserini; more shards let more threads work
    store_docvectors: bool = True  # needed by RM3/feature extraction; costs some disk


class IndexBuildError(RuntimeError):
    """Anserini failed or produced an index that does not match its input."""


def _write_jsonl_shards(passages: Iterable[tuple[str, str]], out: Path, docs_per_shard: int) -> int:
    out.mkdir(parents=True)
    count, shard, fh = 0, 0, None
    seen: set[str] = set()  # Lucene would silently keep both copies of a duplicate id
    try:
        for pid, text in tqdm(passages, desc="bm25: writing JsonCollection", unit="doc", mininterval=2):
            pid = str(pid)
            if pid in seen:
                raise IndexBuildError(f"duplicate passage id {pid!r} (passage #{count + 1} of the input)")
            seen.add(pid)
            if fh is None or count % docs_per_shard == 0:
                if fh:
                    fh.close()
                fh = open(out / f"docs{shard:04d}.jsonl", "w", encoding="utf-8")
                shard += 1
            fh.write(json.dumps({"id": pid, "contents": text}, ensure_ascii=False))
            fh.write("\n")
            count += 1
    finally:
        if fh:
            fh.close()
    if count == 0:
        raise IndexBuildError("no passages to index: the collection is empty")
    return count


def _lucene_doc_count(index_dir: Path) -> int:
    """Number of documents in a finished Lucene index, read through Anserini's IndexReaderUtils."""
    from sparse.jvm import autoclass

    utils = autoclass("io.anserini.index.IndexReaderUtils")
    reader = utils.getReader(str(index_dir))
    try:
        return int(reader.numDocs())
    finally:
        reader.close()


def build_index(
    passages: Iterable[tuple[str, str]],
    index_dir: str | Path,
    config: IndexConfig = IndexConfig(),
    manifest_extra: dict | None = None,
) -> Path:
    """Index ``passages`` into ``index_dir`` (replacing it atomically) and write ``manifest.json``.

    Returns the index directory. The manifest holds the config, the document count, seconds taken, the
    Anserini jar and whatever ``manifest_extra`` the caller adds (e.g. the collection checksum), which is what
    loaders compare against to decide whether the index is up to date.
    """
    index_dir = Path(index_dir)
    remove_dead_temporaries(index_dir)  # a killed earlier build's JSONL input and partial index
    tmp = index_dir.with_name(f"{index_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    start = time.time()
    n_docs = _write_jsonl_shards(passages, tmp / "input", config.docs_per_shard)
    cmd = [
        str(java_executable()),
        f"-Xmx{config.heap}",
        "-cp",
        str(anserini_jar()),
        "io.anserini.index.IndexCollection",
        "-collection", "JsonCollection",
        "-input", str(tmp / "input"),
        "-index", str(tmp / "lucene"),
        "-generator", "DefaultLuceneDocumentGenerator",
        "-threads", str(config.threads),
        "-storePositions", "-storeRaw",
    ]
    if config.store_docvectors:
        cmd.append("-storeDocvectors")
    logger.info("bm25: running %s", " ".join(cmd))
    log_path = tmp / "anserini.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise IndexBuildError(f"Anserini IndexCollection exited with {proc.returncode}; log {log_path}:\n{tail}")
    indexed = _lucene_doc_count(tmp / "lucene")
    if indexed != n_docs:
        raise IndexBuildError(
            f"index holds {indexed} documents but {n_docs} passages were given (duplicate or empty ids?); "
            f"see {log_path}"
        )
    shutil.rmtree(tmp / "input")
    seconds = time.time() - start
    manifest = {
        "stage": "bm25",
        "config": asdict(config),
        "documents": n_docs,
        "seconds": round(seconds, 1),
        "anserini_jar": anserini_jar().name,
        **(manifest_extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if index_dir.exists():
        old = index_dir.with_name(f"{index_dir.name}.old-{os.getpid()}")
        os.replace(index_dir, old)
        os.replace(tmp, index_dir)
        shutil.rmtree(old)
    else:
        index_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, index_dir)
    logger.info("bm25: indexed %d passages in %.1f s (%.0f docs/s)", n_docs, seconds, n_docs / max(seconds, 1e-9))
    return index_dir


def read_manifest(index_dir: str | Path) -> dict:
    """The manifest of a finished index; FileNotFoundError naming the stage to run if there is none."""
    path = Path(index_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no finished BM25 index at {index_dir} (missing {MANIFEST}); run the bm25 stage")
    return json.loads(path.read_text())
