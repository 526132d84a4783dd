"""Encode a passage corpus into one memory-mapped embedding matrix, shard by shard, resumable after a kill.

Layout of ``out_dir`` (the ``dense_index/`` stage directory):

- ``pids.txt``: one pid per line; line ``i`` names row ``i`` of the matrix.
- ``embeddings.f16.npy``: ``(count, dim)`` float16 (``embeddings.f32.npy`` with ``fp16=False``), a plain ``.npy``
  file that ``np.load(..., mmap_mode="r")`` opens without reading it.
- ``progress.json``: the run's fingerprint and the shards already written; rewritten atomically after each shard.
- ``manifest.json``: written last and atomically; its presence means the encoding is complete.

Why not write into ``<dir>.tmp-<pid>`` and rename at the end like the other stages: encoding 8.8M passages takes
hours and the partial matrix must survive a kill to be resumed, so the manifest is the commit point instead.

The corpus is read twice: a first pass writes ``pids.txt`` and computes the corpus checksum (which decides whether a
partial run may be resumed), a second pass encodes. Pass a re-iterable source (a list, a passage store); a one-shot
iterator is materialized in memory first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dense.atomic import write_json_atomic
from dense.interfaces import ArtifactMismatchError, EncodingResumeError, IncompleteArtifactError, TextEncoder

logger = logging.getLogger(__name__)

STAGE = "corpus encoding"
RERUN_HINT = "rerun the corpus encoding stage (scripts/encode_corpus.py; it resumes where it stopped)"
PIDS_FILE = "pids.txt"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"
EMBEDDING_FILES = {"float16": "embeddings.f16.npy", "float32": "embeddings.f32.npy"}
RESULT_FIELDS = ("model_fingerprint", "corpus_sha256", "count", "dim", "dtype")
"""Fingerprint fields that decide the content of a finished encoding (``shard_size`` only decides its layout)."""
_HASH_CHUNK_BYTES = 1 << 20
_FORBIDDEN_PID_CHARS = ("\n", "\r", "\t")


@dataclass(frozen=True)
class EncodingFingerprint:
    """What a partial encoding was started with; a resume needs all of it unchanged."""

    model_fingerprint: str
    corpus_sha256: str
    count: int
    dim: int
    dtype: str
    shard_size: int

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EncodingFingerprint:
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})

    def mismatches(self, other: EncodingFingerprint, fields: Sequence[str] | None = None) -> list[str]:
        """Human-readable ``field: was X, now Y`` lines for each field that differs (self = old, other = new)."""
        names = fields if fields is not None else [f.name for f in dataclasses.fields(self)]
        return [
            f"{name}: was {getattr(self, name)!r}, now {getattr(other, name)!r}"
            for name in names
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass(frozen=True, eq=False)
class EncodedCorpus:
    """A finished corpus encoding: ``embeddings[i]`` is the vector of ``pids[i]``."""

    directory: Path
    pids: list[str]
    embeddings: np.ndarray  # read-only np.memmap
    manifest: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @classmethod
    def open(cls, directory: str | Path, expected: Mapping[str, Any] | None = None) -> EncodedCorpus:
        """Open a finished encoding; ``expected`` maps manifest fields to required values (e.g. the model)."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.exists():
            raise IncompleteArtifactError(_missing_manifest_message(directory))
        manifest = read_json(manifest_path, stage=STAGE)
        if expected:
            check_expected(manifest, expected, path=manifest_path, what="corpus encoding", rerun=RERUN_HINT)
        embeddings_path = directory / manifest["embeddings_file"]
        pids_path = directory / manifest["pids_file"]
        for path in (embeddings_path, pids_path):
            if not path.exists():
                raise IncompleteArtifactError(f"{path}: missing although {manifest_path} exists; {RERUN_HINT}.")
        embeddings = np.load(embeddings_path, mmap_mode="r")
        pids = read_pids(pids_path)
        shape = (manifest["count"], manifest["dim"])
        if embeddings.shape != shape or str(embeddings.dtype) != manifest["dtype"] or len(pids) != shape[0]:
            raise ArtifactMismatchError(
                f"{directory}: files disagree with {MANIFEST_FILE} (expected {shape} {manifest['dtype']} and "
                f"{shape[0]} pids, found {embeddings.shape} {embeddings.dtype} and {len(pids)} pids); "
                f"delete the directory and {RERUN_HINT}."
            )
        return cls(directory=directory, pids=pids, embeddings=embeddings, manifest=manifest)


def encode_corpus(
    encoder: TextEncoder,
    passages: Iterable[tuple[str, str]],
    out_dir: str | Path,
    *,
    batch_size: int,
    shard_size: int,
    fp16: bool = True,
    model_fingerprint: str,
    encoder_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EncodedCorpus:
    """Encode ``(pid, text)`` passages into ``out_dir`` and return the opened result.

    Within each shard passages are encoded longest first, so batches hold texts of similar length (less padding)
    and the most memory-hungry batch comes first; vectors are written back in corpus order. A finished encoding
    with the same model and corpus is returned as is; a partial one is resumed; one made with another model or
    corpus raises :class:`EncodingResumeError` unless ``overwrite`` is set.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.float16 if fp16 else np.float32)
    passages = _reiterable(passages)

    pids_tmp = out_dir / f"{PIDS_FILE}.tmp-{os.getpid()}"
    try:
        count, corpus_sha256 = _scan_corpus(passages, pids_tmp, progress=progress)
        fingerprint = EncodingFingerprint(
            model_fingerprint=model_fingerprint,
            corpus_sha256=corpus_sha256,
            count=count,
            dim=int(encoder.dim),
            dtype=dtype.name,
            shard_size=shard_size,
        )
        if (out_dir / MANIFEST_FILE).exists():
            finished = EncodingFingerprint.from_mapping(read_json(out_dir / MANIFEST_FILE, stage=STAGE))
            if not finished.mismatches(fingerprint, RESULT_FIELDS):
                logger.info("%s: corpus encoding is up to date (%d passages), nothing to do", out_dir, count)
                return EncodedCorpus.open(out_dir)
            _refuse_or_reset(out_dir, finished, fingerprint, overwrite, what="a finished encoding")
        completed = _load_progress(out_dir, fingerprint, overwrite)
        os.replace(pids_tmp, out_dir / PIDS_FILE)
    finally:
        pids_tmp.unlink(missing_ok=True)

    embeddings_file = EMBEDDING_FILES[dtype.name]
    matrix = _open_matrix(out_dir / embeddings_file, fingerprint, fresh=not completed)
    if not completed:
        _write_progress(out_dir, fingerprint, completed)

    resumed = len(completed)
    start_time = time.perf_counter()
    encoded = _encode_shards(encoder, passages, matrix, fingerprint, completed, out_dir, batch_size, progress)
    seconds = time.perf_counter() - start_time
    del matrix  # closes the memmap; everything was flushed shard by shard

    rate = encoded / seconds if seconds > 0 else float("inf")
    manifest = {
        "stage": STAGE,
        **dataclasses.asdict(fingerprint),
        "encoder_config": dict(encoder_config) if encoder_config is not None else None,
        "embeddings_file": embeddings_file,
        "pids_file": PIDS_FILE,
        "batch_size": batch_size,
        "shards_resumed": resumed,
        "passages_encoded_this_run": encoded,
        "seconds": round(seconds, 3),
        "passages_per_second": round(rate, 2),
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    logger.info(
        "encoded %d passages in %.1f s (%.1f passages/s; %d shards resumed from an earlier run) into %s",
        encoded, seconds, rate, resumed, out_dir,
    )
    return EncodedCorpus.open(out_dir)


def _encode_shards(
    encoder: TextEncoder,
    passages: Iterable[tuple[str, str]],
    matrix: np.memmap,
    fingerprint: EncodingFingerprint,
    completed: set[int],
    out_dir: Path,
    batch_size: int,
    progress: bool,
) -> int:
    """Encode every shard not in ``completed`` into ``matrix``; returns the number of passages encoded."""
    shard_size, count = fingerprint.shard_size, fingerprint.count
    already_done = sum(min(shard_size, count - s * shard_size) for s in completed)
    encoded = seen = 0
    with tqdm(total=count, initial=already_done, unit="passage", desc="encoding", disable=not progress) as bar:
        for shard, records in enumerate(_chunks(passages, shard_size)):
            start = shard * shard_size
            seen = start + len(records)
            if seen > count:
                break
            if shard in completed:
                continue
            texts = [text for _, text in records]
            vectors = encode_length_sorted(encoder, texts, batch_size, on_batch=bar.update)
            matrix[start:seen] = _to_storage(vectors, matrix.dtype, [pid for pid, _ in records])
            matrix.flush()
            completed.add(shard)
            _write_progress(out_dir, fingerprint, completed)
            encoded += len(records)
    if seen != count:
        raise EncodingResumeError(
            f"{out_dir}: the corpus yielded {'more' if seen > count else f'only {seen}'} passages on the encoding "
            f"pass but {count} on the checksum pass; the passage source changed while encoding. Fix the source and "
            f"{RERUN_HINT}."
        )
    return encoded


def encode_length_sorted(
    encoder: TextEncoder,
    texts: Sequence[str],
    batch_size: int,
    on_batch: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """``encoder.encode_passages(texts)`` in batches of similar length, longest first; rows in input order.

    Length is counted in characters, a cheap proxy for tokens that avoids tokenizing twice.
    """
    dim = int(encoder.dim)
    out = np.empty((len(texts), dim), dtype=np.float32)
    order = np.argsort(-np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        vectors = np.asarray(encoder.encode_passages([texts[i] for i in rows], batch_size=len(rows)))
        if vectors.shape != (len(rows), dim):
            raise ValueError(
                f"encoder.encode_passages returned shape {vectors.shape} for {len(rows)} texts; expected "
                f"({len(rows)}, {dim}) (encoder.dim={dim})"
            )
        out[rows] = vectors
        if on_batch is not None:
            on_batch(len(rows))
    return out


def _to_storage(vectors: np.ndarray, dtype: np.dtype, pids: Sequence[str]) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported below with the passage it belongs to
        stored = vectors.astype(dtype, copy=False)
    finite = np.isfinite(stored).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise ValueError(
            f"passage {pids[row]!r}: its embedding has non-finite values after conversion to {dtype} (NaN from the "
            f"encoder, or magnitudes above {np.finfo(dtype).max:g}); normalize the embeddings or encode with "
            "fp16=False (--fp32)."
        )
    return stored


def _reiterable(passages: Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    if iter(passages) is passages:  # a generator or file-like iterator: cannot be read twice
        logger.warning(
            "passages is a one-shot iterator: holding all of it in memory so it can be read twice; pass a "
            "re-iterable source (a list or a passage store) for large corpora"
        )
        return list(passages)
    return passages


def _scan_corpus(passages: Iterable[tuple[str, str]], pids_path: Path, *, progress: bool) -> tuple[int, str]:
    """Write the pids to ``pids_path`` and return ``(count, sha256)`` of the ``pid\\ttext\\n`` records.

    For a corpus read from ``collection.tsv`` with ``\\n`` line ends the checksum equals the file's sha256.
    """
    digest = hashlib.sha256()
    count = 0
    with open(pids_path, "w", encoding="utf-8", newline="\n") as out:
        for count, (pid, text) in enumerate(tqdm(passages, desc="checksum", unit="passage", disable=not progress), 1):
            if not isinstance(pid, str) or not isinstance(text, str):
                raise TypeError(f"passage #{count - 1}: expected (pid: str, text: str), got ({pid!r}, {type(text)})")
            if not pid or any(c in pid for c in _FORBIDDEN_PID_CHARS):
                raise ValueError(f"passage #{count - 1}: pid {pid!r} is empty or holds a tab or line break")
            digest.update(f"{pid}\t{text}\n".encode())
            out.write(pid + "\n")
    if count == 0:
        raise ValueError("the passage source is empty; nothing to encode")
    return count, digest.hexdigest()


def _refuse_or_reset(
    out_dir: Path, old: EncodingFingerprint, new: EncodingFingerprint, overwrite: bool, *, what: str
) -> None:
    changes = old.mismatches(new)
    if not overwrite:
        raise EncodingResumeError(
            f"{out_dir}: holds {what} that cannot be reused, because the model or corpus changed "
            f"({'; '.join(changes)}). Use the original model and corpus, point to another directory, or start over "
            "with overwrite=True (--overwrite)."
        )
    logger.warning("%s: discarding %s (%s) because overwrite was requested", out_dir, what, "; ".join(changes))
    for name in (MANIFEST_FILE, PROGRESS_FILE, *EMBEDDING_FILES.values()):
        (out_dir / name).unlink(missing_ok=True)


def _load_progress(out_dir: Path, fingerprint: EncodingFingerprint, overwrite: bool) -> set[int]:
    path = out_dir / PROGRESS_FILE
    if not path.exists():
        return set()
    saved = read_json(path, stage=STAGE)
    old = EncodingFingerprint.from_mapping(saved["fingerprint"])
    completed = {int(s) for s in saved["completed_shards"]}
    if old.mismatches(fingerprint):
        _refuse_or_reset(out_dir, old, fingerprint, overwrite, what=f"a partial encoding ({len(completed)} shards)")
        return set()
    if completed:
        logger.info("%s: resuming, %d shards already encoded", out_dir, len(completed))
    return completed


def _write_progress(out_dir: Path, fingerprint: EncodingFingerprint, completed: set[int]) -> None:
    write_json_atomic(
        out_dir / PROGRESS_FILE,
        {"fingerprint": dataclasses.asdict(fingerprint), "completed_shards": sorted(completed)},
    )


def _open_matrix(path: Path, fingerprint: EncodingFingerprint, *, fresh: bool) -> np.memmap:
    shape, dtype = (fingerprint.count, fingerprint.dim), np.dtype(fingerprint.dtype)
    if fresh or not path.exists():
        if not fresh:
            raise IncompleteArtifactError(
                f"{path}: missing although {PROGRESS_FILE} lists finished shards; delete {path.parent / PROGRESS_FILE} "
                f"and {RERUN_HINT}."
            )
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    matrix = np.lib.format.open_memmap(path, mode="r+")
    if matrix.shape != shape or matrix.dtype != dtype:
        raise EncodingResumeError(
            f"{path}: holds {matrix.shape} {matrix.dtype} but the resumed run needs {shape} {dtype}; start over with "
            "overwrite=True (--overwrite)."
        )
    return matrix


def _chunks(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _missing_manifest_message(directory: Path) -> str:
    progress_path = directory / PROGRESS_FILE
    if progress_path.exists():
        with contextlib.suppress(Exception):
            saved = read_json(progress_path, stage=STAGE)
            fp = saved["fingerprint"]
            total = -(-fp["count"] // fp["shard_size"])
            return (
                f"{directory}: the corpus encoding is unfinished ({len(saved['completed_shards'])} of {total} "
                f"shards written, no {MANIFEST_FILE}); {RERUN_HINT}."
            )
    return f"{directory}: no {MANIFEST_FILE}, so no finished corpus encoding is there; run the corpus encoding stage."


# --- small artifact helpers shared with dense.faiss_index ---------------------------------------------------------


def read_json(path: str | Path, *, stage: str) -> dict[str, Any]:
    """Read a JSON object, turning a corrupt file into an error that names the file and the stage."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactMismatchError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg}); delete it and rerun the {stage} stage."
        ) from err
    if not isinstance(data, dict):
        raise ArtifactMismatchError(f"{path}: expected a JSON object; delete it and rerun the {stage} stage.")
    return data


def read_pids(path: str | Path) -> list[str]:
    """Read a ``pids.txt`` (one pid per line)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":  # the file ends with a line break (or is empty)
        lines.pop()
    return lines


def check_expected(
    manifest: Mapping[str, Any], expected: Mapping[str, Any], *, path: Path, what: str, rerun: str
) -> None:
    """Raise :class:`ArtifactMismatchError` naming every field where ``manifest`` differs from ``expected``."""
    missing = object()
    diffs = [
        f"{key!r} is {manifest.get(key, '<absent>')!r} in the saved {what} but {value!r} is expected"
        for key, value in expected.items()
        if manifest.get(key, missing) != _jsonable(value)
    ]
    if diffs:
        raise ArtifactMismatchError(
            f"{path}: the saved {what} was built from other inputs: {'; '.join(diffs)}. It is stale: {rerun}."
        )


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, dataclasses dicts), for comparisons."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value))


def directory_fingerprint(directory: str | Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``directory`` (e.g. a saved model)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory; cannot fingerprint the model")
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(_HASH_CHUNK_BYTES):
                digest.update(block)
    return digest.hexdigest()
