"""Canonical MS MARCO layout: readers and their errors, MsMarcoDir, PassageStore, subsets; the real pool if present."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY_PASSAGES, TINY_QRELS, TINY_QUERIES

from hybrid.artifacts import ArtifactError
from hybrid.msmarco import (
    DataFormatError,
    MsMarcoDir,
    build_subset,
    read_collection,
    read_qrels,
    read_queries,
)
from hybrid.passage_store import PassageStore, StaleStoreError


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def error_at(excinfo: pytest.ExceptionInfo, path: Path, line: int | None) -> str:
    """Assert the error names the file (and line) and return its message."""
    message = str(excinfo.value)
    assert str(path) in message
    if line is not None:
        assert f"{path}:{line}:" in message
        assert excinfo.value.line == line
    return message


# --- readers ---------------------------------------------------------------------------------------------------


def test_read_collection_streams_exact_texts(tiny_msmarco_dir):
    passages = read_collection(tiny_msmarco_dir / "collection.tsv")
    assert not isinstance(passages, (list, dict))  # a lazy iterator, not the corpus in memory
    assert dict(passages) == TINY_PASSAGES  # odd separators, CR and the extra tab stay inside their passage


def test_read_queries_and_qrels(tiny_msmarco_dir):
    queries = read_queries(tiny_msmarco_dir / "queries.dl19.tsv")
    assert queries == TINY_QUERIES["dl19"]
    assert list(queries) == ["300", "301", "302"]  # file order
    assert read_qrels(tiny_msmarco_dir / "qrels.dl19.txt", queries) == TINY_QRELS["dl19"]


def test_qrels_accept_tabs_and_q0(tmp_path):
    path = write(tmp_path / "qrels.txt", b"1\t0\t7\t1\n2 Q0 8 3\n2 Q0 8 3\n")  # an exact repeat is harmless
    assert read_qrels(path) == {"1": {"7": 1}, "2": {"8": 3}}


@pytest.mark.parametrize(
    "content, line, pattern",
    [
        (b"1\tok\n2 no tab here\n", 2, "no tab"),
        (b"1\tok\n\tmissing id\n", 2, "empty passage id"),
        (b"1\tok\n2\tfine\n1\tagain\n", 3, "duplicate passage id '1'"),
        (b"1\tok\n2\t\xff\xfe broken\n", 2, "not valid UTF-8"),
        (b"", None, "empty"),
    ],
)
def test_collection_errors_name_file_and_line(tmp_path, content, line, pattern):
    path = write(tmp_path / "collection.tsv", content)
    with pytest.raises(DataFormatError, match=pattern) as excinfo:
        list(read_collection(path))
    error_at(excinfo, path, line)


def test_query_errors_name_file_and_line(tmp_path):
    path = write(tmp_path / "queries.dev.tsv", b"1\ta\n2\tb\n2\tc\n")
    with pytest.raises(DataFormatError, match="duplicate query id '2'") as excinfo:
        read_queries(path)
    error_at(excinfo, path, 3)


@pytest.mark.parametrize(
    "content, line, pattern",
    [
        (b"1 0 7 1\n9 0 7 1\n", 2, "query id '9' is not in the queries file"),
        (b"1 0 7 1\n1 0 8 high\n", 2, "grade 'high' is not an integer"),
        (b"1 0 7 1.5\n", 1, "grade '1.5' is not an integer"),
        (b"1 0 7\n", 1, "expected 4 fields"),
        (b"1 0 7 1\n1 0 7 2\n", 2, "twice, with grades 1 and 2"),
        (b"", None, "empty"),
    ],
)
def test_qrels_errors_name_file_and_line(tmp_path, content, line, pattern):
    path = write(tmp_path / "qrels.dev.txt", content)
    with pytest.raises(DataFormatError, match=pattern) as excinfo:
        read_qrels(path, {"1": "query one"})
    error_at(excinfo, path, line)


def test_missing_files_say_what_to_do(tmp_path):
    for reader in (lambda p: list(read_collection(p)), read_queries, read_qrels):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.tsv"))) as excinfo:
            reader(tmp_path / "nope.tsv")
        assert "prepare_data.py" in str(excinfo.value)


# --- the directory ---------------------------------------------------------------------------------------------


def test_msmarco_dir_paths_and_splits(tiny_msmarco_dir):
    d = MsMarcoDir(str(tiny_msmarco_dir))
    assert d.root == tiny_msmarco_dir
    assert d.collection_path == tiny_msmarco_dir / "collection.tsv"
    assert d.queries_path("dl20") == tiny_msmarco_dir / "queries.dl20.tsv"
    assert d.qrels_path("dev") == tiny_msmarco_dir / "qrels.dev.txt"
    assert d.splits() == ["train", "dev", "dl19"]
    with pytest.raises(ValueError, match="invalid split name"):
        d.queries_path("../x")
    with pytest.raises(FileNotFoundError, match="splits here: train, dev, dl19"):
        d.queries("dl20")


def test_validate_counts(tiny_msmarco_dir):
    summary = MsMarcoDir(tiny_msmarco_dir).validate(progress=False)
    assert summary.passages == len(TINY_PASSAGES)
    train, dl19 = summary.splits["train"], summary.splits["dl19"]
    assert (train.queries, train.judged_queries, train.qrels, train.judged_passages_missing) == (4, 4, 5, 1)
    assert (dl19.queries, dl19.judged_queries, dl19.qrels, dl19.judged_passages_missing) == (3, 2, 6, 1)
    assert "dl19" in summary.format()


def test_validate_reports_the_first_problem(tiny_msmarco_dir):
    with open(tiny_msmarco_dir / "qrels.dev.txt", "ab") as f:
        f.write(b"777 0 3 1\n")
    with pytest.raises(DataFormatError, match="'777' is not in the queries file") as excinfo:
        MsMarcoDir(tiny_msmarco_dir).validate(progress=False)
    error_at(excinfo, tiny_msmarco_dir / "qrels.dev.txt", 4)


def test_validate_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MsMarcoDir(tmp_path / "absent").validate()


# --- PassageStore ----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_store(tiny_msmarco_dir, tmp_path) -> PassageStore:
    with PassageStore.build(tiny_msmarco_dir / "collection.tsv", tmp_path / "passages", progress=False) as store:
        yield store


def test_store_lookups(tiny_store):
    assert len(tiny_store) == len(TINY_PASSAGES)
    for pid, text in TINY_PASSAGES.items():
        assert tiny_store.get(pid) == text
        assert pid in tiny_store
    assert list(tiny_store.pids()) == list(TINY_PASSAGES)  # file order, not byte order ("10" < "2")
    assert tiny_store.get_many(["29", "3", "29"]) == [TINY_PASSAGES["29"], TINY_PASSAGES["3"], TINY_PASSAGES["29"]]
    assert tiny_store.get_many([]) == []
    for absent in ("30", "", "1 ", "0000000000000000000001", "2\x00"):
        assert absent not in tiny_store
    assert 3 not in tiny_store  # pids are strings


def test_store_missing_pid_names_it(tiny_store):
    with pytest.raises(KeyError, match="'123456'"):
        tiny_store.get("123456")
    with pytest.raises(KeyError, match=r"2 passage.*'31', 'a-very-long-passage-id'"):
        tiny_store.get_many(["1", "31", "a-very-long-passage-id"])


def test_store_reopens_without_rebuilding(tiny_store):
    manifest = json.loads((tiny_store.directory / "manifest.json").read_text())
    assert manifest["passages"] == len(TINY_PASSAGES)
    assert manifest["source"] == str(tiny_store.source)
    (tiny_store.directory / "manifest.json").write_text('{"stage": "data", "config": {}}')  # the pipeline's to own
    with PassageStore.open(tiny_store.directory) as again:
        assert again.get("4") == TINY_PASSAGES["4"]
    assert not [p for p in tiny_store.directory.parent.iterdir() if ".tmp-" in p.name]


def test_store_concurrent_reads(tiny_store):
    rng = random.Random(0)
    jobs = [rng.choice(list(TINY_PASSAGES)) for _ in range(4000)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        texts = list(pool.map(tiny_store.get, jobs))
        batches = list(pool.map(tiny_store.get_many, [jobs[i : i + 50] for i in range(0, len(jobs), 50)]))
    assert texts == [TINY_PASSAGES[p] for p in jobs]
    assert [t for batch in batches for t in batch] == texts


def test_store_refuses_a_changed_source(tiny_store):
    source = tiny_store.source
    data = source.read_bytes()
    source.write_bytes(data.replace(b"topic 1 ", b"topic 9 ", 1))  # same size, different content in the middle
    with pytest.raises(StaleStoreError, match=r"content of .*collection\.tsv differs"):
        PassageStore.open(tiny_store.directory)
    source.write_bytes(data + b"30\tnew passage\n")
    with pytest.raises(StaleStoreError, match=r"bytes.*rebuild"):
        PassageStore.open(tiny_store.directory)


def test_store_follows_a_moved_source(tiny_store, tmp_path):
    moved = tmp_path / "elsewhere" / "collection.tsv"
    moved.parent.mkdir()
    os.replace(tiny_store.source, moved)
    with pytest.raises(FileNotFoundError, match="collection_tsv="):
        PassageStore.open(tiny_store.directory)
    with PassageStore.open(tiny_store.directory, collection_tsv=moved) as store:
        assert store.get("5") == TINY_PASSAGES["5"]


def test_store_is_importable_from_msmarco():
    import hybrid.msmarco

    assert hybrid.msmarco.PassageStore is PassageStore
    with pytest.raises(AttributeError):
        hybrid.msmarco.NoSuchThing  # noqa: B018


def test_store_build_errors(tmp_path):
    dup = write(tmp_path / "collection.tsv", b"1\ta\n2\tb\n3\tc\n2\td\n")
    with pytest.raises(DataFormatError, match="duplicate passage id '2' \\(first on line 2\\)") as excinfo:
        PassageStore.build(dup, tmp_path / "store", progress=False)
    error_at(excinfo, dup, 4)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ArtifactError, match="no passage store"):
        PassageStore.open(tmp_path / "store")


# --- subsets ---------------------------------------------------------------------------------------------------


def subset_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != "manifest.json"}


def test_subset_content(tiny_msmarco_dir, tmp_path):
    out = build_subset(
        tiny_msmarco_dir, tmp_path / "sub", ["train", "dl19"], {"train": 2}, n_distractors=5, seed=1, progress=False
    )
    assert out.splits() == ["train", "dl19"]
    train = out.queries("train")
    assert len(train) == 2 and set(train) <= set(TINY_QUERIES["train"])
    assert set(out.queries("dl19")) == {"300", "301"}  # the unjudged query is dropped
    passages = dict(read_collection(out.collection_path))
    judged = {pid for split in ("train", "dl19") for q in out.queries(split) for pid in TINY_QRELS[split][q]}
    present_judged = judged & set(TINY_PASSAGES)
    assert present_judged <= set(passages)  # every judged passage that exists is kept, grade 0 included
    assert len(set(passages) - present_judged) == 5
    assert all(TINY_PASSAGES[pid] == text for pid, text in passages.items())
    assert list(passages) == [p for p in TINY_PASSAGES if p in passages]  # source order
    assert out.qrels("dl19") == TINY_QRELS["dl19"]
    manifest = json.loads((out.root / "manifest.json").read_text())
    assert manifest["distractors"] == 5 and manifest["seed"] == 1
    assert manifest["judged_passages_missing"] == len(judged - set(TINY_PASSAGES))
    out.validate(progress=False)


def test_subset_is_deterministic(tiny_msmarco_dir, tmp_path):
    def make(name: str, seed: int) -> dict[str, bytes]:
        out = build_subset(tiny_msmarco_dir, tmp_path / name, ["train", "dev"], {"train": 2}, 6, seed, progress=False)
        return subset_files(out.root)

    first = make("a", 7)
    assert make("b", 7) == first
    assert make("c", 8) != first
    assert make("a", 7) == first  # rebuilding in place replaces the old directory


def test_subset_min_grade_and_limits(tiny_msmarco_dir, tmp_path):
    out = build_subset(
        tiny_msmarco_dir, tmp_path / "sub", ["dl19"], None, n_distractors=1000, min_grade=2, progress=False
    )
    passages = dict(read_collection(out.collection_path))
    assert {"2", "9"} <= set(passages)
    assert len(passages) == len(TINY_PASSAGES)  # asking for more distractors than exist takes them all
    with pytest.raises(ValueError, match="not in splits"):
        build_subset(tiny_msmarco_dir, tmp_path / "x", ["dev"], {"train": 2}, progress=False)


# --- the real pool ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_marco43k(tmp_path):
    root = os.environ.get("MSMARCO_DIR")
    if not root or not Path(root, "collection.tsv").is_file():
        pytest.skip("MSMARCO_DIR is unset or has no collection.tsv")
    data = MsMarcoDir(root)
    summary = data.validate(progress=False)
    assert summary.passages > 40_000
    assert {"train", "dev", "dl19"} <= set(summary.splits)
    assert summary.splits["dev"].judged_passages_missing == 0
    with PassageStore.build(data.collection_path, tmp_path / "passages", progress=False) as store:
        assert len(store) == summary.passages
        assert store.get("0").startswith("The presence of communication amid scientific minds")
        judged = [pid for rel in data.qrels("dev").values() for pid in rel]
        texts = store.get_many(judged)
        assert len(texts) == len(judged) and all(texts)


def test_subset_refuses_to_overwrite_its_source(tiny_msmarco_dir):
    with pytest.raises(ValueError, match="replace its own source"):
        build_subset(tiny_msmarco_dir, tiny_msmarco_dir, ["dev"], progress=False)
    assert MsMarcoDir(tiny_msmarco_dir).splits() == ["train", "dev", "dl19"]


# --- the command line ------------------------------------------------------------------------------------------


def load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_cli(tiny_msmarco_dir, tmp_path, capsys):
    cli = load_script("prepare_data")
    assert cli.main(["--source", "local", "--dir", str(tiny_msmarco_dir), "--quiet"]) == 0
    assert f"{len(TINY_PASSAGES)} passages" in capsys.readouterr().out
    out = tmp_path / "sub"
    argv = ["--subset", "--src", str(tiny_msmarco_dir), "--out", str(out), "--splits", "dev", "--distractors", "2"]
    assert cli.main([*argv, "--max-queries", "dev=1", "--quiet"]) == 0
    assert len(MsMarcoDir(out).queries("dev")) == 1
    assert "dev" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--subset", "--source", "local", "--dir", str(tiny_msmarco_dir)])
    assert "exactly one of" in capsys.readouterr().err
