"""The one place that writes files: atomic writes of whole directories and single files, and checksums.

A stage writes into ``<target>.tmp-<pid>`` and moves it into place with ``os.replace`` only once everything is
on disk, so a killed job leaves either the old artifact or the new one, never half of one. ``os.replace`` cannot
swap a directory onto a non-empty one, so an existing target is first renamed aside and removed afterwards.
Single files go through a uniquely named temporary sibling (fsynced, then renamed); a failed write, including a
value that cannot be serialised, removes the temporary file and leaves the previous file as it was.

The module is a leaf (no torch, no ``hybrid``) so that every package can write through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_dead_temporaries(target: str | Path) -> list[Path]:
    """Remove ``<target>.tmp-<pid>`` and ``<target>.old-<pid>`` siblings whose process is gone, and return them.

    The ``finally`` blocks that clean these up do not run when a job is killed (SIGKILL, the OOM killer), and the
    next run, with another pid, would never look at them: on the A10G recipe one such leftover is a 30 GB HNSW file
    or a 3.5 GB Lucene input. A live writer's temporaries (its pid still running) are left alone."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f"{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` when the block exits without error (leftovers of
    killed earlier writers of ``target`` are removed first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; it replaces ``path`` only if the block succeeds.

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8 unless ``encoding`` says otherwise). Until the block ends,
    readers keep seeing the previous file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name: two threads (or processes) writing the same file must not share a temporary file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600 files; artifacts are shared read-only
        text = mode == "w"
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(
    path: str | Path, data: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None
) -> Path:
    """Write ``data`` as JSON (sorted keys, UTF-8, trailing newline) to ``path`` atomically.

    The text is serialised before any file is opened, so a value JSON cannot encode leaves nothing behind.
    ``default`` is passed to ``json.dumps`` (``str`` records paths and other objects by their text).
    """
    text = json.dumps(data, indent=indent, sort_keys=True, ensure_ascii=False, default=default) + "\n"
    return write_text_atomic(path, text)


def copy_file_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically (``shutil.copyfile`` would leave half a file if killed)."""
    with open(src, "rb") as source, atomic_file(dst) as out:
        shutil.copyfileobj(source, out, 1 << 20)
    return Path(dst)


def drop_partial_last_line(path: str | Path) -> None:
    """Cut a JSONL journal back to its last complete line: a line half-written when a run was killed is removed, so
    that appends after it stay valid JSONL (a missing or empty file is left as it is)."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (recorded in manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
