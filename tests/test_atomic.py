"""Atomic writes: a failed write leaves the previous file (or nothing) and no temporary file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dense.atomic import (
    atomic_directory,
    atomic_file,
    copy_file_atomic,
    remove_dead_temporaries,
    write_json_atomic,
    write_text_atomic,
)


class Unserialisable:
    """json.dumps cannot encode it (without default=str)."""


def _listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_json_writer_leaves_the_old_file_and_no_partial_file_when_serialising_fails(tmp_path: Path) -> None:
    target = tmp_path / "settings.json"
    write_json_atomic(target, {"depth": 1})
    before = _listing(tmp_path)
    with pytest.raises(TypeError):
        write_json_atomic(target, {"depth": 2, "bad": Unserialisable()})
    assert _listing(tmp_path) == before
    assert json.loads(target.read_text()) == {"depth": 1}


def test_file_writer_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "run.trec"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(target, "w") as f:
            f.write("half of a new file")
            raise RuntimeError("killed mid-write")
    assert _listing(tmp_path) == {"run.trec": b"old\n"}
    with atomic_file(target, "w") as f:
        f.write("new\n")
        assert target.read_text() == "old\n"  # readers see the old file until the block ends
    assert _listing(tmp_path) == {"run.trec": b"new\n"}


def test_binary_writer_and_copy(tmp_path: Path) -> None:
    with atomic_file(tmp_path / "a.npy") as f:
        np.save(f, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))
    copy_file_atomic(tmp_path / "a.npy", tmp_path / "sub" / "b.npy")
    assert (tmp_path / "sub" / "b.npy").read_bytes() == (tmp_path / "a.npy").read_bytes()
    with pytest.raises(FileNotFoundError):
        copy_file_atomic(tmp_path / "missing", tmp_path / "sub" / "b.npy")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["b.npy"]


def test_json_writer_default_and_indent(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "m.json", {"b": Path("/x"), "a": "é"}, default=str, indent=None)
    assert (tmp_path / "m.json").read_text(encoding="utf-8") == '{"a": "é", "b": "/x"}\n'


def test_directory_writer_keeps_the_old_directory_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "fusion"
    with atomic_directory(target) as tmp:
        (tmp / "model.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "model.json").write_text("new")
            raise RuntimeError("killed")
    assert _listing(tmp_path / "fusion") == {"model.json": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["fusion"]


def test_the_write_audit_tells_in_place_writes_from_atomic_ones(tmp_path: Path) -> None:
    """The audit used by the pipeline test (tests/write_audit.py) must itself catch an in-place write."""
    from write_audit import record_writes

    (tmp_path / "old.json").write_text("{}")
    with record_writes(tmp_path) as writes:
        (tmp_path / "in_place.txt").write_text("x")
        np.save(tmp_path / "in_place.npy", np.zeros(2))
        with open(tmp_path / "journal.jsonl", "a") as f:
            f.write("{}\n")
        write_json_atomic(tmp_path / "settings.json", {"a": 1})
        with atomic_directory(tmp_path / "dir") as tmp:
            np.save(tmp / "inside.npy", np.zeros(2))
        (tmp_path / "old.json").read_text()
        write_text_atomic(tmp_path.parent / "outside.txt", "not audited")
    assert sorted(writes.in_place) == ["in_place.npy", "in_place.txt"]
    assert writes.appended == ["journal.jsonl"]
    assert len(writes.atomic) == 2 and all(".tmp-" in p for p in writes.atomic)


def test_a_killed_writers_temporaries_are_removed_a_live_ones_kept(tmp_path: Path) -> None:
    """SIGKILL skips the clean-up of ``<target>.tmp-<pid>``; the next writer of the same target removes it, unless
    that pid still runs (a concurrent writer), and leaves other targets' files alone."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    target = tmp_path / "index.faiss"
    (tmp_path / f"index.faiss.tmp-{dead.pid}").write_bytes(b"partial")
    (tmp_path / f"lucene.tmp-{dead.pid}").mkdir()  # another target's
    (tmp_path / f"index.faiss.tmp-{os.getppid()}").write_bytes(b"live")  # a running process's
    assert remove_dead_temporaries(target) == [tmp_path / f"index.faiss.tmp-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"lucene.tmp-{dead.pid}",
                                                                f"index.faiss.tmp-{os.getppid()}"])
    stale_dir = tmp_path / f"out.tmp-{dead.pid}"
    (stale_dir / "sub").mkdir(parents=True)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale_dir.exists() and (tmp_path / "out" / "x").read_text() == "x"
