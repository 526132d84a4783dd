"""One MS MARCO reader behind every entry point: a carriage return (as the official collection holds) or another
line-separator character inside a passage or query stays inside it, whichever module reads the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_PASSAGES, TINY_QRELS

import dense.msmarco_files as msmarco_files
import hybrid.msmarco as msmarco
from dense.querygen import data as querygen_data
from dense.training_data import read_passages
from hybrid.passage_store import PassageStore


def test_every_reader_keeps_a_carriage_return_inside_its_passage(tiny_msmarco_dir: Path, tmp_path: Path) -> None:
    path = tiny_msmarco_dir / "collection.tsv"
    assert "\r" in TINY_PASSAGES["4"] and "\u2028" in TINY_PASSAGES["4"]
    readers = {
        "hybrid.msmarco.read_collection": lambda: dict(msmarco.read_collection(path)),
        "hybrid.msmarco.Collection": lambda: dict(msmarco.Collection(path)),
        "hybrid.msmarco.MsMarcoDir.validate": lambda: {str(i): "" for i in range(
            msmarco.MsMarcoDir(tiny_msmarco_dir).validate(["dev"], progress=False).passages)},
        "dense.querygen.data.iter_tsv": lambda: dict(querygen_data.iter_tsv(path)),
        "dense.querygen.data.read_tsv": lambda: querygen_data.read_tsv(path),
        "dense.training_data.read_passages": lambda: read_passages(path),
        "hybrid.passage_store.PassageStore": lambda: dict(zip(
            TINY_PASSAGES, PassageStore.build(path, tmp_path / "store", progress=False).get_many(list(TINY_PASSAGES)),
        )),
    }
    for name, read in readers.items():
        passages = read()
        assert list(passages) == list(TINY_PASSAGES), name  # 30 passages, none split in two
        if name != "hybrid.msmarco.MsMarcoDir.validate":
            assert passages["4"] == TINY_PASSAGES["4"], name
    assert querygen_data.read_collection_pids(path) == list(TINY_PASSAGES)
    assert querygen_data.read_tsv(path, ids={"4", "5"}) == {p: TINY_PASSAGES[p] for p in ("4", "5")}
    assert read_passages(path, {"4"}) == {"4": TINY_PASSAGES["4"]}


def test_queries_with_a_carriage_return_are_one_query(tmp_path: Path) -> None:
    path = tmp_path / "queries.dev.tsv"
    want = {"1": "what is\ra carriage return", "2": "second\x85query\u2028too"}
    path.write_bytes("".join(f"{qid}\t{text}\n" for qid, text in want.items()).encode())
    assert msmarco.read_queries(path) == want
    assert querygen_data.read_tsv(path) == want
    assert dict(querygen_data.iter_tsv(path)) == want


def test_qrels_readers_agree(tiny_msmarco_dir: Path) -> None:
    path = tiny_msmarco_dir / "qrels.dl19.txt"
    assert msmarco.read_qrels(path) == TINY_QRELS["dl19"]
    for min_grade in (0, 1, 2, 3):
        want = {q: [p for p, g in judged.items() if g >= min_grade] for q, judged in TINY_QRELS["dl19"].items()}
        assert querygen_data.read_qrels(path, min_grade) == {q: pids for q, pids in want.items() if pids}


def test_errors_name_the_file_and_line_in_every_entry_point(tmp_path: Path) -> None:
    path = tmp_path / "collection.tsv"
    path.write_bytes(b"1\tfine\n2 no tab here\n")
    for read in (lambda: dict(msmarco.read_collection(path)), lambda: querygen_data.read_tsv(path),
                 lambda: read_passages(path)):
        with pytest.raises(msmarco.DataFormatError, match=rf"{path}:2: expected 'passage id<TAB>text'"):
            read()
    qrels = tmp_path / "qrels.txt"
    qrels.write_bytes(b"1 0 7 1\n1 0 8\n")
    with pytest.raises(msmarco.DataFormatError, match=rf"{qrels}:2: expected 4 fields"):
        querygen_data.read_qrels(qrels)


def test_hybrid_re_exports_the_one_reader() -> None:
    for name in ("DataFormatError", "Collection", "read_collection", "read_queries", "read_qrels",
                 "parse_tsv_lines", "parse_qrels_lines", "require_file", "pid_key"):
        assert getattr(msmarco, name) is getattr(msmarco_files, name), name
