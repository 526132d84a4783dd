"""Record which files a block of code opens for writing, to find writes that bypass the atomic writers.

Every Python-level open for writing is seen (``open``/``io.open``, hence ``Path.write_text``, ``np.save``,
``torch.save``, ``shutil.copyfile``; ``os.open`` with write flags). A write counts as atomic when some component of
its path holds ``.tmp-``: a temporary file or a file inside a temporary directory, both renamed into place by
:mod:`dense.atomic` (or the equivalent code in ``sparse``). Appends are journals (caches, logs) whose readers
tolerate a torn last line, so they are reported apart. Writes from native code (faiss, safetensors, Java) are not
seen; they all go into temporary directories.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


@dataclass
class Writes:
    """Files under ``root`` opened for writing, as paths relative to it."""

    root: Path
    in_place: list[str] = field(default_factory=list)  # opened for (over)writing at their final name
    atomic: list[str] = field(default_factory=list)  # temporary files, or files inside temporary directories
    appended: list[str] = field(default_factory=list)

    def _record(self, path: object, mode: str) -> None:
        if not isinstance(path, (str, os.PathLike)):
            return  # a file descriptor
        try:
            relative = Path(os.fspath(path)).resolve().relative_to(self.root)
        except ValueError:
            return  # outside the audited directory
        name = relative.as_posix()
        if any(".tmp-" in part for part in relative.parts):
            self.atomic.append(name)
        elif "a" in mode:
            self.appended.append(name)
        else:
            self.in_place.append(name)


@contextlib.contextmanager
def record_writes(root: str | os.PathLike) -> Iterator[Writes]:
    """Record the writes under ``root`` made inside the block (the patched functions are restored after it)."""
    writes = Writes(Path(root).resolve())
    real_open, real_os_open = builtins.open, os.open

    def audited_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            writes._record(file, mode)
        return real_open(file, mode, *args, **kwargs)

    def audited_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            writes._record(path, "a" if flags & os.O_APPEND else "w")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = audited_open
    os.open = audited_os_open
    try:
        yield writes
    finally:
        builtins.open = io.open = real_open
        os.open = real_os_open
