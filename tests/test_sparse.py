"""BM25 index build and search through Anserini (small corpus made here; the real 43k pool when available)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest

from sparse.bm25 import MAX_QUERY_CHARS, BM25Searcher
from sparse.index import IndexBuildError, IndexConfig, build_index, read_manifest
from sparse.jvm import VECTOR_MODULE_OPTION, start_jvm

TOY = [
    ("10", "The quick brown fox jumps over the lazy dog"),
    ("11", "The Manhattan Project produced the first atomic bomb"),
    ("12", "Coffee works by blocking adenosine receptors in the brain"),
    ("13", "A dog is a loyal companion and a good friend"),
    ("14", "Atomic energy has peaceful uses in medicine"),
]


@pytest.fixture(scope="module")
def toy_index(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bm25") / "index"
    return build_index(iter(TOY), out, IndexConfig(threads=1, heap="512m"), manifest_extra={"collection": "toy"})


@pytest.fixture(scope="module")
def toy_searcher(toy_index) -> BM25Searcher:
    return BM25Searcher(toy_index)


def test_jvm_starts_without_vector_module_option():
    start_jvm()
    start_jvm()  # idempotent
    import jnius_config

    assert jnius_config.vm_running
    assert VECTOR_MODULE_OPTION not in jnius_config.get_options()
    assert any(o.startswith("-Xmx") for o in jnius_config.get_options())


def test_build_writes_manifest_and_no_temp_dirs(toy_index):
    manifest = read_manifest(toy_index)
    assert manifest["documents"] == len(TOY)
    assert manifest["collection"] == "toy"
    assert not [p for p in toy_index.parent.iterdir() if ".tmp-" in p.name]


def test_failed_build_leaves_no_index(tmp_path):
    with pytest.raises(IndexBuildError, match="empty"):
        build_index(iter([]), tmp_path / "index", IndexConfig(threads=1, heap="512m"))
    assert not (tmp_path / "index").exists()


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(IndexBuildError, match="duplicate"):
        build_index(iter(TOY + [("10", "again")]), tmp_path / "index", IndexConfig(threads=1, heap="512m"))
    assert not (tmp_path / "index").exists()


def test_missing_index_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="bm25 stage"):
        BM25Searcher(tmp_path / "nothing")


def test_search_ranks_matching_passage_first(toy_searcher):
    hits = toy_searcher.search("how does coffee work", 3)
    assert hits[0][0] == "12"
    assert all(isinstance(pid, str) and isinstance(s, float) for pid, s in hits)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def _reference_bm25(query_terms: list[str], k1=0.82, b=0.68) -> dict[str, float]:
    """A second BM25 implementation with Lucene's formula (no (k1+1) factor since Lucene 8); toy terms only."""
    docs = {pid: [t.strip(".,").lower() for t in text.split()] for pid, text in TOY}
    stop = {"the", "a", "is", "and", "by", "in", "over", "has", "of"}
    docs = {pid: [t for t in toks if t not in stop] for pid, toks in docs.items()}
    n = len(docs)
    avgdl = sum(len(t) for t in docs.values()) / n
    scores = {}
    for pid, toks in docs.items():
        tf = Counter(toks)
        s = 0.0
        for q in query_terms:
            df = sum(1 for d in docs.values() if q in d)
            if df == 0 or tf[q] == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf[q] / (tf[q] + k1 * (1 - b + b * len(toks) / avgdl))
        if s > 0:
            scores[pid] = s
    return scores


def test_scores_match_a_reference_bm25(toy_searcher):
    # single-word queries whose Porter stem equals the word, so the reference needs no stemmer
    for word in ["atomic", "dog", "coffee"]:
        got = dict(toy_searcher.search(word, 10))
        want = _reference_bm25([word])
        assert set(got) == set(want)
        for pid in want:
            # Lucene stores document length lossily (one byte), so allow a small relative error
            assert got[pid] == pytest.approx(want[pid], rel=0.05)


@pytest.mark.parametrize(
    "query, words",
    [
        ('coffee AND "brain" : * ( dog', "coffee and brain dog"),  # no boolean AND, phrase, field or wildcard
        ("field:value coffee", "coffee"),  # not a field query: one unknown token (UAX#29 keeps a colon in a word)
        ("emoji ☕😀 coffee", "emoji coffee"),
        ("\x00\x07 control coffee", "control coffee"),
        ("dog " + "x" * 100_000, "dog"),  # a 100 KB query is answered from its start...
        ("x" * 100_000 + " dog", ""),  # ...being cut before analysis, so a word at its end is never reached
        ("the", ""),  # a stopword alone matches nothing
        ("(((", ""),
    ],
)
def test_odd_queries_are_plain_text(toy_searcher, query, words):
    """Lucene syntax and odd characters are not interpreted: the query ranks as its plain words do."""
    hits = toy_searcher.search(query, 5)
    assert hits == (toy_searcher.search(words, 5) if words else [])
    if "coffee" in words:
        assert hits[0][0] == "12"


def test_a_query_of_many_distinct_terms_is_answered(toy_searcher):
    """Each CJK character is a term, and a clause, of its own: more than Lucene's default 1,024 used to raise
    TooManyClauses. A query cut at MAX_QUERY_CHARS has at most that many terms, and that many are allowed."""
    query = "coffee " + "".join(chr(0x4E00 + i) for i in range(MAX_QUERY_CHARS))
    assert toy_searcher.search(query, 3)[0][0] == "12"
    assert toy_searcher.batch_search([query, "dog"], 3)[0] == toy_searcher.search(query, 3)


def test_batch_search_matches_single_search(toy_searcher):
    queries = ["atomic bomb", "dog friend", "coffee", "nothing matches zzz"]
    batch = toy_searcher.batch_search(queries, 3, threads=2)
    assert len(batch) == len(queries)
    for q, ranking in zip(queries, batch):
        assert ranking == toy_searcher.search(q, 3)
    assert batch[-1] == []


def test_batch_search_refuses_a_single_string(toy_searcher):
    # a str is iterable: without the check each character would be searched as a query
    with pytest.raises(TypeError, match="list of queries"):
        toy_searcher.batch_search("dog friend", 3)


def test_k_larger_than_corpus_and_invalid_k(toy_searcher):
    assert len(toy_searcher.search("the dog atomic coffee fox", 1000)) == 5
    with pytest.raises(ValueError):
        toy_searcher.search("dog", 0)


def test_doc_text_is_stored_raw(toy_searcher):
    assert toy_searcher.doc_text("11") == TOY[1][1]
    assert toy_searcher.doc_text("999") is None


@pytest.mark.integration
def test_bm25_finds_known_relevant_passages_in_the_43k_pool(tmp_path_factory):
    data = Path(os.environ.get("MSMARCO_DIR", ""))
    if not (data / "collection.tsv").exists():
        pytest.skip("MSMARCO_DIR is not set to the marco43k pool")

    def passages():
        with open(data / "collection.tsv", encoding="utf-8") as f:
            for line in f:
                pid, text = line.rstrip("\n").split("\t", 1)
                yield pid, text

    index = build_index(passages(), tmp_path_factory.mktemp("bm25-43k") / "index", IndexConfig(threads=2, heap="2g"))
    assert read_manifest(index)["documents"] == 43_204
    searcher = BM25Searcher(index)
    queries = dict(line.rstrip("\n").split("\t", 1) for line in open(data / "queries.dev.tsv", encoding="utf-8"))
    qrels: dict[str, set[str]] = {}
    for line in open(data / "qrels.dev.txt"):
        qid, _, pid, grade = line.split()
        if int(grade) > 0:
            qrels.setdefault(qid, set()).add(pid)
    qids = sorted(qrels)
    runs = searcher.batch_search([queries[q] for q in qids], 20)
    found = sum(1 for q, r in zip(qids, runs) if qrels[q] & {pid for pid, _ in r})
    # the dev queries of the pool are those whose relevant passage BM25 ranked in its top 20 on the full corpus;
    # on the (smaller) pool nearly all of them must be found again
    assert found / len(qids) >= 0.95
    json.dumps(runs[0])  # plain python types
