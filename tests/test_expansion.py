"""Document expansion (doc2query): the expansion file reader, and the bm25_expanded stage's index and checks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from hybrid.config import ConfigError, ExpansionConfig, load_config
from hybrid.pipeline import UPSTREAM, Pipeline
from hybrid.synthetic_data import SyntheticDataError
from sparse.expansion import (
    ExpansionFormatError,
    Expansions,
    expanded_passages,
    merge_expansions,
    read_expansions,
)

CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu-marco43k.toml"


def _write(path: Path, records: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_expansions_joins_a_pids_queries_and_skips_blank_ones(tmp_path, gz):
    path = _write(tmp_path / ("e.jsonl.gz" if gz else "e.jsonl"), [
        {"pid": "1", "queries": ["first  query ", ""], "example_qids": ["11", "12"]},
        {"pid": "2", "queries": ["  "]},
        {"pid": "1", "queries": ["second"], "example_qids": ["13"]},
    ], gz=gz)
    expansions = read_expansions(path)
    assert dict(expansions.queries) == {"1": ("first query", "second")}
    assert expansions.example_qids == {"11", "12", "13"} and expansions.num_queries == 2 and len(expansions) == 1


def test_bad_expansion_files_are_refused_with_the_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_expansions(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"pid": "1", "queries": ["q"]}\nnot json\n')
    with pytest.raises(ExpansionFormatError, match=r"bad.jsonl:2: invalid JSON"):
        read_expansions(tmp_path / "bad.jsonl")
    (tmp_path / "shape.jsonl").write_text('{"pid": 1, "queries": "q"}\n')
    with pytest.raises(ExpansionFormatError, match=r"shape.jsonl:1: expected"):
        read_expansions(tmp_path / "shape.jsonl")


def test_expanded_passages_append_the_queries_and_without_drops_some():
    expansions = Expansions({"a": ("q one", "q two"), "b": ("drop me",)})
    assert list(expanded_passages([("a", "text a"), ("c", "text c")], expansions)) == [
        ("a", "text a\nq one q two"), ("c", "text c")]
    kept, dropped = expansions.without(lambda q: q == "drop me")
    assert dict(kept.queries) == {"a": ("q one", "q two")} and dropped == 1


def test_an_enabled_expansion_needs_a_file():
    with pytest.raises(ConfigError, match="needs sparse.expansion.file"):
        ExpansionConfig(enabled=True)


def _config(data: Path, expansion: Path, *extra: str):
    return load_config(CPU_CONFIG, [
        f'data.dir="{data}"', 'data.eval_splits=["dev"]', 'sparse.heap="1g"', "fusion.holdout_queries=1",
        f'sparse.expansion.file="{expansion}"', 'sparse.expansion.sha256=""', *extra,
    ])


def test_the_stage_indexes_expanded_passages_without_evaluation_queries(tmp_path, tiny_msmarco_dir):
    from sparse.bm25 import BM25Searcher

    root = tmp_path / "artifacts"
    setup = Pipeline(_config(tiny_msmarco_dir, tmp_path / "e.jsonl"), root)
    setup.run(["data"])
    queries, _, _, heldout = setup.real_train_split()
    path = _write(tmp_path / "e.jsonl", [
        {"pid": "2", "queries": ["Graded topic, two!"]},  # a DL19 query (a split the config does not evaluate)
        {"pid": "6", "queries": ["walrus moustache"]},
        {"pid": "7", "queries": [queries[heldout[0]].title()]},  # a held-out selection query's text
        {"pid": "999", "queries": ["not in the collection"]},
    ])
    record = Pipeline(_config(tiny_msmarco_dir, path), root).run(["data", "bm25_expanded"])["bm25_expanded"]
    assert (record["enabled"], record["dropped_evaluation_queries"], record["dropped_heldout_queries"],
            record["expanded_passages"], record["not_in_collection"], record["queries"]) == (True, 1, 1, 1, 1, 2)
    expanded = BM25Searcher(root / "bm25_expanded")
    assert [pid for pid, _ in expanded.search("walrus", 3)] == ["6"]
    assert expanded.search("graded", 3) == []  # the dropped query left no trace
    assert expanded.doc_text("6").endswith("\nwalrus moustache")


def test_the_stage_refuses_a_changed_file_and_held_out_examples(tmp_path, tiny_msmarco_dir):
    root = tmp_path / "artifacts"
    path = _write(tmp_path / "e.jsonl", [{"pid": "6", "queries": ["walrus"]}])
    with pytest.raises(SyntheticDataError, match="sha256 .* but the config expects 0000"):
        Pipeline(_config(tiny_msmarco_dir, path, f'sparse.expansion.sha256="{"0" * 64}"'), root).run(
            ["data", "bm25_expanded"])
    holdout = Pipeline(_config(tiny_msmarco_dir, path), root).real_train_split()[3]
    leaky = _write(tmp_path / "leaky.jsonl", [{"pid": "6", "queries": ["walrus"], "example_qids": holdout}])
    with pytest.raises(SyntheticDataError, match="held-out train queries as few-shot examples"):
        Pipeline(_config(tiny_msmarco_dir, leaky), root).run(["bm25_expanded"])
    with pytest.raises(FileNotFoundError, match="sparse.expansion.file"):
        Pipeline(_config(tiny_msmarco_dir, tmp_path / "nowhere.jsonl"), root).run(["bm25_expanded"])


def test_expansion_off_builds_nothing_and_changes_no_other_fingerprint(tmp_path, tiny_msmarco_dir):
    path = _write(tmp_path / "e.jsonl", [{"pid": "6", "queries": ["walrus"]}])
    on = Pipeline(_config(tiny_msmarco_dir, path), tmp_path / "a")
    off = Pipeline(_config(tiny_msmarco_dir, path, "sparse.expansion.enabled=false"), tmp_path / "a")
    # the plain index and what reads it do not depend on the expansion; the fused modes do, only while it is on
    for stage in ("bm25", "synthetic", "dense_train", "dense_index"):
        assert on.inputs_fingerprint(stage) == off.inputs_fingerprint(stage)
    assert on.inputs_fingerprint("fusion") != off.inputs_fingerprint("fusion")
    assert "bm25_expanded" in on.upstream("fusion") and "bm25_expanded" not in off.upstream("fusion")
    assert off.upstream("evaluate") == tuple(u for u in UPSTREAM["evaluate"] if u != "bm25_expanded")
    record = off.run(["data", "bm25_expanded"])["bm25_expanded"]
    assert record["enabled"] is False and not (tmp_path / "a" / "bm25_expanded" / "lucene").exists()


def test_merged_expansions_keep_every_files_queries_in_order():
    first = Expansions({"a": ("q1",), "b": ("same",)}, frozenset({"11"}))
    second = Expansions({"b": ("same",), "c": ("q3",)}, frozenset({"12"}))
    merged = merge_expansions([first, second])
    assert dict(merged.queries) == {"a": ("q1",), "b": ("same", "same"), "c": ("q3",)}
    assert merged.example_qids == {"11", "12"} and merged.num_queries == 4


def test_extra_files_need_a_first_file_and_one_checksum_each():
    with pytest.raises(ConfigError, match="2 checksums for 1 extra_files"):
        ExpansionConfig(enabled=True, file="a", extra_files=("b",), extra_sha256=("x", "y"))
    with pytest.raises(ConfigError, match="needs sparse.expansion.file"):
        ExpansionConfig(extra_files=("b",))
    assert ExpansionConfig(enabled=True, file="a", sha256="s", extra_files=("b", "c")).files == (
        ("a", "s"), ("b", ""), ("c", ""))


def test_the_stage_appends_the_extra_files_queries_and_checks_each(tmp_path, tiny_msmarco_dir):
    from sparse.bm25 import BM25Searcher

    first = _write(tmp_path / "e1.jsonl", [{"pid": "6", "queries": ["walrus"]}])
    second = _write(tmp_path / "e2.jsonl", [{"pid": "6", "queries": ["moustache"]}, {"pid": "2", "queries": ["okapi"]}])
    root = tmp_path / "artifacts"
    plain = Pipeline(_config(tiny_msmarco_dir, first), root)
    both = Pipeline(_config(tiny_msmarco_dir, first, f'sparse.expansion.extra_files=["{second}"]'), root)
    # an index built before extra files existed keeps its fingerprint; adding one rebuilds it
    assert plain.inputs_fingerprint("bm25_expanded") == Pipeline(
        _config(tiny_msmarco_dir, first, "sparse.expansion.extra_files=[]"), root).inputs_fingerprint("bm25_expanded")
    assert plain.inputs_fingerprint("bm25_expanded") != both.inputs_fingerprint("bm25_expanded")
    record = both.run(["data", "bm25_expanded"])["bm25_expanded"]
    assert (record["expanded_passages"], record["queries"], len(record["extra_sha256"])) == (2, 3, 1)
    searcher = BM25Searcher(root / "bm25_expanded")
    assert searcher.doc_text("6").endswith("\nwalrus moustache")
    assert [pid for pid, _ in searcher.search("okapi", 3)] == ["2"]
    with pytest.raises(SyntheticDataError, match=r"sparse.expansion.extra_sha256\[0\]"):
        Pipeline(_config(tiny_msmarco_dir, first, f'sparse.expansion.extra_files=["{second}"]',
                         f'sparse.expansion.extra_sha256=["{"0" * 64}"]'), root).run(["bm25_expanded"])
    with pytest.raises(FileNotFoundError, match=r"sparse.expansion.extra_files\[0\]"):
        Pipeline(_config(tiny_msmarco_dir, first, f'sparse.expansion.extra_files=["{tmp_path / "no.jsonl"}"]'),
                 root).run(["bm25_expanded"])
