"""Encode a passage corpus into one memory-mapped embedding matrix, shard by shard, resumable after a kill, on one
process or on every rank of a ``torchrun`` launch.

Layout of ``out_dir`` (the ``dense_index/`` stage directory):

- ``pids.txt``: one pid per line; line ``i`` names row ``i`` of the matrix.
- ``embeddings.f16.npy``: ``(count, dim)`` float16 (``embeddings.f32.npy`` with ``fp16=False``), a plain ``.npy``
  file that ``np.load(..., mmap_mode="r")`` opens without reading it.
- ``manifest.json``: written last and atomically; its presence means the encoding is complete.

While the encoding runs:

- ``progress.json``: the run's fingerprint (model, corpus checksum, count, dim, dtype, shard size); a resume needs
  it unchanged.
- ``shards/shard-NNNNNN.npy``: the vectors of shard ``N`` (rows ``[N * shard_size, (N + 1) * shard_size)``), each
  written atomically when the shard is done, so a file that exists is a finished shard. A killed run resumes with
  the shards that have no file yet. When all exist, rank 0 copies them into the matrix, writes the manifest and
  removes ``shards/`` (at the peak the vectors are on disk twice: 2 x 13.5 GB for 8.8M x 768 float16).

Under ``torchrun`` every rank calls :func:`encode_corpus` with the same arguments; the shards still to encode are
dealt out round-robin (rank ``r`` takes every ``world_size``-th of them), each rank writes its own shard files, and
rank 0 assembles the matrix once all ranks are done. Ranks on several machines need ``out_dir`` on a filesystem
they share (or every node's ``shards/`` copied to node 0 and the encoding run once more there, which then only
assembles).

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
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dense.atomic import atomic_file, write_json_atomic
from dense.distributed import DistContext, init_distributed, run_on_main
from dense.interfaces import ArtifactMismatchError, EncodingResumeError, IncompleteArtifactError, TextEncoder

logger = logging.getLogger(__name__)

STAGE = "corpus encoding"
RERUN_HINT = "rerun the corpus encoding stage (scripts/encode_corpus.py; it resumes where it stopped)"
PIDS_FILE = "pids.txt"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
EMBEDDING_FILES = {"float16": "embeddings.f16.npy", "float32": "embeddings.f32.npy"}
RESULT_FIELDS = ("model_fingerprint", "corpus_sha256", "count", "dim", "dtype")
"""Fingerprint fields that decide the content of a finished encoding (``shard_size`` only decides its layout)."""
_HASH_CHUNK_BYTES = 1 << 20
_FORBIDDEN_PID_CHARS = ("\n", "\r", "\t")
_SHARD_FILE = re.compile(r"^shard-(\d{6})\.npy$")


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

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """``(start, stop)`` rows of ``shard`` in the matrix."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.count)

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
    context: DistContext | None = None,
) -> EncodedCorpus:
    """Encode ``(pid, text)`` passages into ``out_dir`` and return the opened result.

    Within each shard passages are encoded longest first, so batches hold texts of similar length (less padding)
    and the most memory-hungry batch comes first; vectors are written back in corpus order. A finished encoding
    with the same model and corpus is returned as is; a partial one is resumed; one made with another model or
    corpus raises :class:`EncodingResumeError` unless ``overwrite`` is set.

    ``context`` (default: the ``torchrun`` launch this process belongs to, if any) splits the shards over the
    ranks; every rank then calls this with the same arguments and gets the same result (see the module docstring).
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    context = init_distributed() if context is None else context
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.float16 if fp16 else np.float32)
    passages = _reiterable(passages)

    pids_tmp = out_dir / f"{PIDS_FILE}.tmp-{os.getpid()}" if context.is_main else None
    try:
        count, corpus_sha256 = _scan_corpus(passages, pids_tmp, progress=progress and context.is_main)
        fingerprint = EncodingFingerprint(
            model_fingerprint=model_fingerprint,
            corpus_sha256=corpus_sha256,
            count=count,
            dim=int(encoder.dim),
            dtype=dtype.name,
            shard_size=shard_size,
        )
        completed = run_on_main(context, lambda: _prepare(out_dir, fingerprint, pids_tmp, overwrite))
    finally:
        if pids_tmp is not None:
            pids_tmp.unlink(missing_ok=True)
    if completed is None:
        logger.info("%s: corpus encoding is up to date (%d passages), nothing to do", out_dir, count)
        return EncodedCorpus.open(out_dir)

    remaining = [s for s in range(fingerprint.num_shards) if s not in completed]
    mine = set(remaining[context.rank :: context.world_size])
    start_time = time.perf_counter()
    encoded = _encode_shards(encoder, passages, fingerprint, mine, out_dir, batch_size, progress)
    seconds = time.perf_counter() - start_time
    if context.enabled:
        logger.info("rank %d: encoded %d shards (%d passages) in %.1f s", context.rank, len(mine), encoded, seconds)
    per_rank = context.all_gather_object((encoded, seconds))  # also waits until every rank's shards are written
    encoded, seconds = sum(n for n, _ in per_rank), max(s for _, s in per_rank)

    rate = encoded / seconds if seconds > 0 else float("inf")
    embeddings_file = EMBEDDING_FILES[dtype.name]
    manifest = {
        "stage": STAGE,
        **dataclasses.asdict(fingerprint),
        "encoder_config": dict(encoder_config) if encoder_config is not None else None,
        "embeddings_file": embeddings_file,
        "pids_file": PIDS_FILE,
        "batch_size": batch_size,
        "shards_resumed": len(completed),
        "passages_encoded_this_run": encoded,
        "processes": context.world_size,
        "seconds": round(seconds, 3),
        "passages_per_second": round(rate, 2),
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    run_on_main(context, lambda: _assemble(out_dir, fingerprint, manifest))
    logger.info(
        "encoded %d passages in %.1f s (%.1f passages/s over %d process(es); %d shards resumed from an earlier run) "
        "into %s", encoded, seconds, rate, context.world_size, len(completed), out_dir,
    )
    return EncodedCorpus.open(out_dir)


def _prepare(
    out_dir: Path, fingerprint: EncodingFingerprint, pids_tmp: Path | None, overwrite: bool
) -> list[int] | None:
    """Rank 0, before encoding: ``None`` when a finished encoding of the same inputs is there, else the shards
    already written (after refusing or discarding a partial run made with other inputs)."""
    if (out_dir / MANIFEST_FILE).exists():
        finished = EncodingFingerprint.from_mapping(read_json(out_dir / MANIFEST_FILE, stage=STAGE))
        if not finished.mismatches(fingerprint, RESULT_FIELDS):
            return None
        _refuse_or_reset(out_dir, finished, fingerprint, overwrite, what="a finished encoding")
    completed = _load_progress(out_dir, fingerprint, overwrite)
    for stale in (*out_dir.glob("*.npy.tmp-*"), *_shards_dir(out_dir).glob(".shard-*.tmp-*")):
        stale.unlink()  # a half-written shard or matrix of a killed run
    if pids_tmp is not None:
        os.replace(pids_tmp, out_dir / PIDS_FILE)
    write_json_atomic(out_dir / PROGRESS_FILE, {"fingerprint": dataclasses.asdict(fingerprint)})
    return sorted(completed)


def _encode_shards(
    encoder: TextEncoder,
    passages: Iterable[tuple[str, str]],
    fingerprint: EncodingFingerprint,
    mine: set[int],
    out_dir: Path,
    batch_size: int,
    progress: bool,
) -> int:
    """Encode the shards in ``mine`` into their shard files; returns the number of passages encoded."""
    count = fingerprint.count
    total = sum(stop - start for start, stop in map(fingerprint.shard_rows, mine))
    dtype = np.dtype(fingerprint.dtype)
    shards = _shards_dir(out_dir)
    shards.mkdir(exist_ok=True)
    encoded = seen = 0
    with tqdm(total=total, unit="passage", desc="encoding", disable=not progress) as bar:
        for shard, records in enumerate(_chunks(passages, fingerprint.shard_size)):
            seen = shard * fingerprint.shard_size + len(records)
            if seen > count:
                break
            if shard not in mine:
                continue
            texts = [text for _, text in records]
            vectors = encode_length_sorted(encoder, texts, batch_size, on_batch=bar.update)
            stored = _to_storage(vectors, dtype, [pid for pid, _ in records])
            with atomic_file(_shard_path(out_dir, shard)) as f:
                np.save(f, stored)
            encoded += len(records)
    if seen != count:
        raise EncodingResumeError(
            f"{out_dir}: the corpus yielded {'more' if seen > count else f'only {seen}'} passages on the encoding "
            f"pass but {count} on the checksum pass; the passage source changed while encoding. Fix the source and "
            f"{RERUN_HINT}."
        )
    return encoded


def _assemble(out_dir: Path, fingerprint: EncodingFingerprint, manifest: Mapping[str, Any]) -> None:
    """Rank 0, after every rank is done: shard files -> the matrix (atomically), then the manifest."""
    missing = [s for s in range(fingerprint.num_shards) if not _shard_path(out_dir, s).is_file()]
    if missing:
        raise IncompleteArtifactError(
            f"{out_dir / SHARDS_DIR}: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} are missing after "
            "every process finished; processes on several machines need the output directory on a filesystem they "
            f"share (or copy every machine's {SHARDS_DIR}/ here), then {RERUN_HINT}."
        )
    target = out_dir / manifest["embeddings_file"]
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        shape = (fingerprint.count, fingerprint.dim)
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(fingerprint.dtype), shape=shape)
        for shard in range(fingerprint.num_shards):
            start, stop = fingerprint.shard_rows(shard)
            vectors = np.load(_shard_path(out_dir, shard), mmap_mode="r")
            if vectors.shape != (stop - start, fingerprint.dim) or vectors.dtype != matrix.dtype:
                raise ArtifactMismatchError(
                    f"{_shard_path(out_dir, shard)}: holds {vectors.shape} {vectors.dtype}, expected "
                    f"{(stop - start, fingerprint.dim)} {matrix.dtype}; delete it and {RERUN_HINT}."
                )
            matrix[start:stop] = vectors
        matrix.flush()
        del matrix
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    shutil.rmtree(_shards_dir(out_dir), ignore_errors=True)


def _shards_dir(out_dir: Path) -> Path:
    return out_dir / SHARDS_DIR


def _shard_path(out_dir: Path, shard: int) -> Path:
    return _shards_dir(out_dir) / f"shard-{shard:06d}.npy"


def _written_shards(out_dir: Path, num_shards: int) -> set[int]:
    directory = _shards_dir(out_dir)
    if not directory.is_dir():
        return set()
    found = {int(m.group(1)) for p in directory.iterdir() if (m := _SHARD_FILE.match(p.name))}
    return {s for s in found if s < num_shards}


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


def _scan_corpus(
    passages: Iterable[tuple[str, str]], pids_path: Path | None, *, progress: bool
) -> tuple[int, str]:
    """Return ``(count, sha256)`` of the ``pid\\ttext\\n`` records, writing the pids to ``pids_path`` when given.

    For a corpus read from ``collection.tsv`` with ``\\n`` line ends the checksum equals the file's sha256.
    """
    digest = hashlib.sha256()
    count = 0
    with open(pids_path, "w", encoding="utf-8", newline="\n") if pids_path else contextlib.nullcontext() as out:
        for count, (pid, text) in enumerate(tqdm(passages, desc="checksum", unit="passage", disable=not progress), 1):
            if not isinstance(pid, str) or not isinstance(text, str):
                raise TypeError(f"passage #{count - 1}: expected (pid: str, text: str), got ({pid!r}, {type(text)})")
            if not pid or any(c in pid for c in _FORBIDDEN_PID_CHARS):
                raise ValueError(f"passage #{count - 1}: pid {pid!r} is empty or holds a tab or line break")
            digest.update(f"{pid}\t{text}\n".encode())
            if out is not None:
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
    shutil.rmtree(_shards_dir(out_dir), ignore_errors=True)


def _load_progress(out_dir: Path, fingerprint: EncodingFingerprint, overwrite: bool) -> set[int]:
    """The shards a partial run with the same fingerprint already wrote (a partial run with another one is refused
    or, with ``overwrite``, discarded)."""
    path = out_dir / PROGRESS_FILE
    if not path.exists():
        shutil.rmtree(_shards_dir(out_dir), ignore_errors=True)  # shard files without a fingerprint: unknown origin
        return set()
    old = EncodingFingerprint.from_mapping(read_json(path, stage=STAGE)["fingerprint"])
    completed = _written_shards(out_dir, old.num_shards) if old.count and old.shard_size else set()
    if old.mismatches(fingerprint):
        _refuse_or_reset(out_dir, old, fingerprint, overwrite, what=f"a partial encoding ({len(completed)} shards)")
        return set()
    if completed:
        logger.info("%s: resuming, %d of %d shards already encoded", out_dir, len(completed), fingerprint.num_shards)
    return completed


def _chunks(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _missing_manifest_message(directory: Path) -> str:
    progress_path = directory / PROGRESS_FILE
    if progress_path.exists():
        with contextlib.suppress(Exception):
            fingerprint = EncodingFingerprint.from_mapping(read_json(progress_path, stage=STAGE)["fingerprint"])
            done = len(_written_shards(directory, fingerprint.num_shards))
            return (
                f"{directory}: the corpus encoding is unfinished ({done} of {fingerprint.num_shards} shards written, "
                f"no {MANIFEST_FILE}); {RERUN_HINT}."
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
