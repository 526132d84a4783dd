"""Passage text by pid without holding the corpus in Python objects.

The store is a byte-offset index into the source ``collection.tsv`` (which it keeps reading, never copies):

- ``keys.npy``: the pids as sorted fixed-width bytes (``S<n>``), looked up by binary search;
- ``offsets.npy`` / ``lengths.npy``: where each passage's text starts in the source and how many bytes it has;
- ``passage_store.json``: the source path, size, mtime and two content fingerprints. The same record is written
  as the stage's ``manifest.json``, which the pipeline may overwrite or extend; the store only reads its own file.

At 8.8M passages the arrays take ~170 MB on disk and are memory-mapped, so opening is instant and
several processes share the pages. Lookups read with ``os.pread`` (no shared file position), so one store
serves many threads.

Staleness: :meth:`PassageStore.open` re-checks the source against the manifest: same size, same sha256 of its
first and last MiB, and same sha256 over the bytes of up to 1,024 passages spread evenly over the file. That costs
a few milliseconds on 3 GB (a full checksum would read all of it, ~10 s) and catches any edit that changes the size,
the ends, or shifts bytes under the sampled passages. An equal-size edit inside an unsampled passage goes unnoticed;
rebuilding takes about a minute at full scale if in doubt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hybrid.artifacts import MANIFEST, ArtifactError, file_checksum, replace_dir, write_json_atomic
from hybrid.msmarco import DataFormatError, require_file

logger = logging.getLogger(__name__)

FORMAT = "passage-store"
META_FILE = "passage_store.json"
VERSION = 1
SAMPLE_PASSAGES = 1024
_CHUNK = 1 << 20  # passages per numpy chunk while building
_PID = re.compile(rb"[^\s\x00]+")


class StaleStoreError(ArtifactError):
    """The source collection changed since the store was built."""


class PassageStore:
    """Read-only pid -> text lookup over a ``collection.tsv``; build with :meth:`build`, reopen with :meth:`open`."""

    def __init__(self, directory: Path, source: Path, keys: np.ndarray, offsets: np.ndarray, lengths: np.ndarray):
        self.directory = directory
        self.source = source
        self._keys = keys
        self._offsets = offsets
        self._lengths = lengths
        self._fd: int | None = os.open(source, os.O_RDONLY)

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, collection_tsv: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
        relative_to: str | os.PathLike | None = None,
    ) -> PassageStore:
        """Index ``collection_tsv`` into ``out_dir`` (replaced atomically); a duplicate pid raises with both lines.

        A source inside ``relative_to`` (the artifact directory, e.g. a subset written there) is recorded relative
        to ``out_dir``, so the directory keeps working when copied or moved; any other source by absolute path."""
        source = require_file(collection_tsv, "passage collection").resolve()
        out_dir = Path(out_dir)
        start = time.perf_counter()
        keys, offsets, lengths = _scan(source, progress)
        order = np.argsort(keys, kind="stable")
        keys, offsets, lengths = keys[order], offsets[order], lengths[order]
        dup = np.flatnonzero(keys[1:] == keys[:-1])
        if dup.size:
            i = int(dup[0])
            first, second = sorted((int(order[i]) + 1, int(order[i + 1]) + 1))
            pid = keys[i].decode()
            raise DataFormatError(source, second, f"duplicate passage id {pid!r} (first on line {first})")

        tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=False)
        try:
            np.save(tmp / "keys.npy", keys)
            np.save(tmp / "offsets.npy", offsets)
            np.save(tmp / "lengths.npy", lengths)
            stat = source.stat()
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "source": _stored_source(source, out_dir, relative_to),
                "source_size": stat.st_size,
                "source_mtime_ns": stat.st_mtime_ns,
                "source_checksum": file_checksum(source),
                "source_sample_sha256": _sample_digest(source, keys, offsets, lengths),
                "passages": int(keys.size),
            }
            write_json_atomic(tmp / META_FILE, meta)
            write_json_atomic(tmp / MANIFEST, {"stage": "data", **meta})
            replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        elapsed = time.perf_counter() - start
        logger.info(
            "passage store for %s: %d passages in %.1fs (%.0f passages/s) -> %s",
            source,
            keys.size,
            elapsed,
            keys.size / max(elapsed, 1e-9),
            out_dir,
        )
        return cls.open(out_dir)

    @classmethod
    def open(cls, out_dir: str | os.PathLike, collection_tsv: str | os.PathLike | None = None) -> PassageStore:
        """Open a built store; ``collection_tsv`` overrides the recorded source (e.g. after moving the data)."""
        out_dir = Path(out_dir)
        meta_path = out_dir / META_FILE
        manifest = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if manifest is None or manifest.get("format") != FORMAT:
            raise ArtifactError(
                f"no passage store in {out_dir} (missing or foreign {META_FILE}); build it with "
                f"PassageStore.build(collection_tsv, {str(out_dir)!r}) or run the 'data' stage."
            )
        if manifest.get("version") != VERSION:
            raise ArtifactError(
                f"passage store {out_dir} has format version {manifest.get('version')}, this code reads {VERSION}; "
                "rebuild it (PassageStore.build or the 'data' stage)."
            )
        source = Path(collection_tsv) if collection_tsv is not None else out_dir / manifest["source"]
        require_file(
            source,
            f"source collection of the passage store {out_dir}",
            hint="Pass collection_tsv= if the data moved, or rebuild the store with PassageStore.build.",
        )
        keys = np.load(out_dir / "keys.npy", mmap_mode="r")
        offsets = np.load(out_dir / "offsets.npy", mmap_mode="r")
        lengths = np.load(out_dir / "lengths.npy", mmap_mode="r")
        _check_source(out_dir, manifest, source, keys, offsets, lengths)
        return cls(out_dir, source.resolve(), keys, offsets, lengths)

    # --- lookups ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._keys.size)

    def __contains__(self, pid: object) -> bool:
        return isinstance(pid, str) and self._find(pid) >= 0

    def get(self, pid: str) -> str:
        """Text of passage ``pid``; KeyError naming it when the collection has no such passage."""
        i = self._find(pid)
        if i < 0:
            raise KeyError(f"passage {pid!r} is not in the collection {self.source} ({len(self):,} passages)")
        return self._read(i)

    def get_many(self, pids: Iterable[str]) -> list[str]:
        """Texts in the order of ``pids`` (vectorised search); KeyError naming the missing ones."""
        pids = list(pids)
        if not pids:
            return []
        encoded = [p.encode() for p in pids]
        width = self._keys.dtype.itemsize
        too_long = np.array([len(b) > width or not b or b"\x00" in b for b in encoded])
        query = np.array([b"" if bad else b for b, bad in zip(encoded, too_long, strict=True)], dtype=self._keys.dtype)
        idx = np.searchsorted(self._keys, query)
        clipped = np.minimum(idx, len(self) - 1)
        hit = (idx < len(self)) & (self._keys[clipped] == query) & ~too_long
        if not hit.all():
            missing = [pids[i] for i in np.flatnonzero(~hit)]
            shown = ", ".join(repr(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise KeyError(f"{len(missing)} passage(s) not in the collection {self.source}: {shown}")
        return [self._read(int(i)) for i in clipped]

    def pids(self) -> Iterator[str]:
        """All pids in collection (file) order."""
        for i in np.argsort(self._offsets, kind="stable"):
            yield self._keys[i].decode()

    def _find(self, pid: str) -> int:
        b = pid.encode()
        if not b or len(b) > self._keys.dtype.itemsize or b"\x00" in b:
            return -1
        i = int(np.searchsorted(self._keys, b))
        return i if i < len(self) and self._keys[i] == b else -1

    def _read(self, i: int) -> str:
        if self._fd is None:
            raise ValueError(f"passage store {self.directory} is closed")
        length = int(self._lengths[i])
        data = os.pread(self._fd, length, int(self._offsets[i]))
        if len(data) != length:
            raise StaleStoreError(
                f"{self.source} is shorter than when the passage store {self.directory} was built; rebuild the store."
            )
        return data.decode("utf-8")

    # --- lifetime -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PassageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return f"PassageStore({str(self.directory)!r}, passages={len(self)}, source={str(self.source)!r})"


def _stored_source(source: Path, out_dir: Path, relative_to: str | os.PathLike | None) -> str:
    if relative_to is not None and source.is_relative_to(Path(relative_to).resolve()):
        return os.path.relpath(source, out_dir.resolve())
    return str(source)


def _scan(source: Path, progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pids (bytes), text offsets and text lengths of every line, in file order; malformed lines raise."""
    key_chunks: list[np.ndarray] = []
    offset_chunks: list[np.ndarray] = []
    length_chunks: list[np.ndarray] = []
    keys: list[bytes] = []
    offsets: list[int] = []
    lengths: list[int] = []

    def flush() -> None:
        key_chunks.append(np.array(keys, dtype=np.bytes_))
        offset_chunks.append(np.array(offsets, dtype=np.uint64))
        length_chunks.append(np.array(lengths, dtype=np.uint32))
        keys.clear(), offsets.clear(), lengths.clear()

    position = 0
    lineno = 0
    with (
        open(source, "rb") as f,
        tqdm(
            total=source.stat().st_size,
            unit="B",
            unit_scale=True,
            desc="index passages",
            mininterval=2,
            disable=not progress,
        ) as bar,
    ):
        for lineno, line in enumerate(f, 1):
            tab = line.find(b"\t")
            body = len(line) - (1 if line.endswith(b"\n") else 0)
            if tab <= 0 or not _PID.fullmatch(line, 0, tab):
                raise DataFormatError(source, lineno, f"expected 'passage id<TAB>text': {line[:80]!r}")
            try:
                line[:body].decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(source, lineno, f"not valid UTF-8 at byte {e.start}") from e
            keys.append(line[:tab])
            offsets.append(position + tab + 1)
            lengths.append(body - tab - 1)
            position += len(line)
            bar.update(len(line))
            if len(keys) >= _CHUNK:
                flush()
    if lineno == 0:
        raise DataFormatError(source, None, "file is empty (expected 'passage id<TAB>text' lines)")
    if keys:
        flush()
    return np.concatenate(key_chunks), np.concatenate(offset_chunks), np.concatenate(length_chunks)


def _sample_digest(source: Path, keys: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> str:
    """sha256 over the pid and bytes of up to SAMPLE_PASSAGES passages spread evenly over the sorted keys."""
    h = hashlib.sha256()
    rows = np.unique(np.linspace(0, keys.size - 1, num=min(SAMPLE_PASSAGES, keys.size)).astype(np.int64))
    fd = os.open(source, os.O_RDONLY)
    try:
        for i in rows:
            h.update(bytes(keys[i]) + b"\t")
            h.update(os.pread(fd, int(lengths[i]), int(offsets[i])))
            h.update(b"\n")
    finally:
        os.close(fd)
    return h.hexdigest()


def _check_source(
    out_dir: Path, manifest: dict, source: Path, keys: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
) -> None:
    built_from = manifest["source"]
    rebuild = f"rebuild it: PassageStore.build({str(source)!r}, {str(out_dir)!r}) (or rerun the 'data' stage)"
    size = source.stat().st_size
    if size != manifest["source_size"]:
        raise StaleStoreError(
            f"passage store {out_dir} was built from {built_from} ({manifest['source_size']:,} bytes) but "
            f"{source} now has {size:,} bytes; {rebuild}."
        )
    if file_checksum(source) != manifest["source_checksum"] or (
        _sample_digest(source, keys, offsets, lengths) != manifest["source_sample_sha256"]
    ):
        raise StaleStoreError(
            f"passage store {out_dir}: the content of {source} differs from {built_from} at build time; {rebuild}."
        )
    if source.stat().st_mtime_ns != manifest["source_mtime_ns"]:
        logger.info(
            "%s was touched or copied since the passage store was built; its content checks still match", source
        )
