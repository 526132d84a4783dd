"""``hybrid.Retriever`` on the tiny artifact directory (tests/retriever_fixture.py): every mode, bad input, threads,
answers independent of k, moved and copied directories, stale stages, the reranker's time budget, the benchmark."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from retriever_fixture import FUSION_DEPTH, RERANK_DEPTH

from hybrid import Result, Retriever
from hybrid.artifacts import (
    STAGE_FILE,
    ArtifactError,
    read_stage,
    stage_dir,
    write_json_atomic,
)
from hybrid.config import ConfigError, RerankConfig
from hybrid.msmarco import read_collection
from hybrid.pipeline import UPSTREAM
from hybrid.rerank import RerankingSearcher
from hybrid.searchers import RerankSettings
from sparse.bm25 import MAX_QUERY_CHARS

MODES = ("sparse", "dense", "rrf", "convex", "hybrid", "rerank")
_cache: dict[tuple[str, str], Retriever] = {}


def retriever(artifacts, mode: str | None) -> Retriever:
    """One Retriever per (directory, mode) for the whole run: loading is the slow part."""
    key = (str(artifacts.root), str(mode))
    if key not in _cache:
        _cache[key] = Retriever(mode=mode, artifacts_dir=artifacts.root)
    return _cache[key]


def queries(artifacts, n: int = 4) -> list[str]:
    return list(artifacts.dev_queries.values())[:n]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_returns_results_with_their_passage_text_best_first(tiny_artifacts, mode):
    texts = dict(read_collection(tiny_artifacts.root / "msmarco-subset" / "collection.tsv"))
    r = retriever(tiny_artifacts, mode)
    assert r.mode == mode
    for query in queries(tiny_artifacts):
        results = r.search(query, 5)
        assert len(results) == 5 and all(isinstance(x, Result) for x in results)
        assert all(x.document_text == texts[x.document_id] for x in results)
        assert [x.score for x in results] == sorted((x.score for x in results), reverse=True)


def test_the_default_mode_comes_from_the_rerank_stage(tiny_artifacts):
    assert retriever(tiny_artifacts, None).mode == "rerank"  # rerank.default = true in the fixture's config


@pytest.mark.parametrize("mode", MODES)
def test_the_answer_does_not_depend_on_k(tiny_artifacts, mode):
    r = retriever(tiny_artifacts, mode)
    for query in queries(tiny_artifacts):
        top10 = r.search(query, 10)
        assert top10 == r.search(query, 1000)[:10]  # ids, texts and scores
        assert r.batch_search([query], 1000)[0][:10] == top10


@pytest.mark.parametrize("mode", ["rrf", "convex", "hybrid", "rerank"])
def test_fused_modes_return_at_most_their_candidates(tiny_artifacts, mode):
    r = retriever(tiny_artifacts, mode)
    assert len(r.search(queries(tiny_artifacts, 1)[0], 1000)) <= 2 * FUSION_DEPTH


@pytest.mark.parametrize("mode", MODES)
def test_batch_search_takes_a_list_and_equals_search(tiny_artifacts, mode):
    r = retriever(tiny_artifacts, mode)
    with pytest.raises(TypeError, match="list of queries"):
        r.batch_search("what is the climate of oslo", 3)
    with pytest.raises(TypeError, match="list of queries"):
        r.searcher.batch_search("what is the climate of oslo", 3)  # the composed searcher refuses it too
    qs = queries(tiny_artifacts)
    assert r.batch_search(qs, 5) == [r.search(q, 5) for q in qs]
    assert r.batch_search([], 5) == []


def test_bad_input_errors(tiny_artifacts):
    r = retriever(tiny_artifacts, "sparse")
    for bad in (b"bytes", None, 3):
        with pytest.raises(TypeError, match="query must be a str"):
            r.search(bad, 3)
    for blank in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty"):
            r.search(blank, 3)
    with pytest.raises(ValueError, match="k must be"):
        r.search("oslo", 0)
    with pytest.raises(TypeError, match="k must be an int"):
        r.search("oslo", 2.5)
    assert r.search("oslo", np.int64(2)) == r.search("oslo", 2)  # any integer type
    with pytest.raises(ValueError, match="not valid Unicode"):
        r.search("oslo \ud800", 3)  # a lone surrogate: Lucene and the tokenizers cannot take it
    with pytest.raises(TypeError, match="query must be a str"):
        r.batch_search(["oslo", None], 3)
    with pytest.raises(ValueError, match="unknown mode"):
        Retriever(mode="magic", artifacts_dir=tiny_artifacts.root)


@pytest.mark.parametrize("query, words", [
    ('oslo AND "climate" : * ( paris', "oslo and climate paris"),  # no boolean AND, phrase, field or wildcard
    ("\x00\x07 control oslo", "control oslo"),
    ("emoji 😀☕ oslo", "emoji oslo"),
    ("oslo " + "x" * 100_000, "oslo"),  # cut at MAX_QUERY_CHARS; the run of x's matches nothing
])
def test_odd_queries_are_searched_as_plain_text(tiny_artifacts, query, words):
    """The sparse mode ranks an odd query as its plain words; the fused mode answers it with k valid passages."""
    texts = dict(read_collection(tiny_artifacts.root / "msmarco-subset" / "collection.tsv"))
    sparse = retriever(tiny_artifacts, "sparse").search(query, 3)
    assert sparse and sparse == retriever(tiny_artifacts, "sparse").search(words, 3)
    results = retriever(tiny_artifacts, "hybrid").search(query, 3)
    assert len(results) == 3 and len({x.document_id for x in results}) == 3
    assert all(x.document_text == texts[x.document_id] for x in results)


@pytest.mark.parametrize("mode", ["hybrid", "rerank"])
def test_a_long_query_is_searched_as_its_first_characters_in_every_stage(tiny_artifacts, mode, monkeypatch):
    """BM25 cut a long query at MAX_QUERY_CHARS; the dense encoder and the reranker tokenized all of it (0.8 s for
    1 MB) to keep 32 tokens. Every stage now gets the cut query, so what follows the cut changes nothing."""
    from dense.encoder_base import DenseEncoder
    from fusion.query_likelihood import QueryLikelihoodScorer

    r = retriever(tiny_artifacts, mode)  # loaded (and warmed up, in rerank mode) before the recording starts
    seen: dict[str, list[str]] = {"dense": [], "ql": []}
    encode, score = DenseEncoder.encode_queries, QueryLikelihoodScorer.score

    def recording_encode(self, texts, *args, **kwargs):
        seen["dense"].extend(texts)
        return encode(self, texts, *args, **kwargs)

    def recording_score(self, query, passages):
        seen["ql"].append(query)
        return score(self, query, passages)

    monkeypatch.setattr(DenseEncoder, "encode_queries", recording_encode)
    monkeypatch.setattr(QueryLikelihoodScorer, "score", recording_score)
    head = "oslo " * (MAX_QUERY_CHARS // 5)
    assert r.search(head + "bergen fjord " * 1000, 5) == r.search(head, 5)
    assert seen["dense"] and all(q == head for q in seen["dense"])  # the encoder never saw the text past the cut
    if mode == "rerank":
        assert seen["ql"] and all(q == head for q in seen["ql"])


@pytest.mark.parametrize("mode", ["hybrid", "rerank"])
def test_search_is_thread_safe(tiny_artifacts, mode):
    r = retriever(tiny_artifacts, mode)
    qs = list(tiny_artifacts.dev_queries.values())
    sequential = [r.search(q, 10) for q in qs]
    results: dict[int, list[Result]] = {}

    def work(i: int) -> None:
        results[i] = r.search(qs[i], 10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(qs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(qs))] == sequential


# ---- the artifact directory ---------------------------------------------------------------------------------------


def test_paths_inside_the_directory_are_stored_relative_to_it(tiny_artifacts):
    assert not tiny_artifacts.built_at.exists()  # the fixture renamed the directory after building it
    settings = json.loads((tiny_artifacts.root / "rerank" / "settings.json").read_text())
    assert settings["model_dir"] == "base_models/tiny-lm"
    store = json.loads((tiny_artifacts.root / "passages" / "passage_store.json").read_text())
    assert store["source"] == "../msmarco-subset/collection.tsv"
    assert read_stage(tiny_artifacts.root, "dense_index")["index_dir"] == "dense_index/faiss"


def test_a_copied_directory_gives_the_same_answers(tiny_artifacts, tmp_path):
    copy = tmp_path / "elsewhere" / "artifacts"
    shutil.copytree(tiny_artifacts.root, copy)
    for mode in MODES:
        moved = Retriever(mode=mode, artifacts_dir=copy)
        assert moved.passages.source.is_relative_to(copy.resolve())
        for query in queries(tiny_artifacts, 2):
            assert moved.search(query, 10) == retriever(tiny_artifacts, mode).search(query, 10)
        moved.close()


def test_a_moved_collection_is_found_through_msmarco_dir_and_checked(tiny_artifacts, tmp_path, monkeypatch):
    from hybrid.passage_store import StaleStoreError

    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, copy)
    recorded = (copy / "passages" / json.loads((copy / "passages" / "passage_store.json").read_text())["source"])
    moved = tmp_path / "data-now"
    moved.mkdir()
    shutil.move(recorded.resolve(), moved / "collection.tsv")
    monkeypatch.delenv("MSMARCO_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="MSMARCO_DIR"):
        Retriever(mode="sparse", artifacts_dir=copy)
    monkeypatch.setenv("MSMARCO_DIR", str(moved))
    query = queries(tiny_artifacts, 1)[0]
    assert Retriever(mode="sparse", artifacts_dir=copy).search(query, 5) == \
        retriever(tiny_artifacts, "sparse").search(query, 5)
    text = (moved / "collection.tsv").read_text()
    (moved / "collection.tsv").write_text(text.replace("\t", "\tchanged ", 1))  # another collection
    with pytest.raises(StaleStoreError):
        Retriever(mode="sparse", artifacts_dir=copy)


def test_absolute_paths_written_by_older_runs_are_still_read(tiny_artifacts, tmp_path):
    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, copy)
    path = copy / "rerank" / "settings.json"
    settings = json.loads(path.read_text())
    path.write_text(json.dumps({**settings, "model_dir": str((copy / settings["model_dir"]).resolve())}))
    old = Retriever(mode="rerank", artifacts_dir=copy)
    query = queries(tiny_artifacts, 1)[0]
    assert old.search(query, 10) == retriever(tiny_artifacts, "rerank").search(query, 10)


@pytest.fixture
def artifacts_copy(tiny_artifacts, tmp_path):
    """A copy of the fixture's directory that a test may damage."""
    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, copy)
    return copy


def test_missing_artifacts_name_what_to_run(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist; run the pipeline"):
        Retriever(artifacts_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="stage 'data' has not been run"):
        Retriever(artifacts_dir=tmp_path / "empty")


def test_every_stage_records_the_fingerprints_of_what_it_read(tiny_artifacts):
    for stage in ("data", "bm25", "bm25_expanded", "dense_train", "dense_index", "fusion", "rerank"):
        record = read_stage(tiny_artifacts.root, stage)
        assert set(record["upstream"]) == set(UPSTREAM[stage])
        for up, fingerprint in record["upstream"].items():
            assert read_stage(tiny_artifacts.root, up)["inputs_fingerprint"] == fingerprint


@pytest.mark.parametrize(("changed", "mode", "rerun"), [
    ("bm25", "hybrid", "fusion"),  # fusion <- bm25
    ("bm25", "rerank", "fusion"),  # rerank <- fusion <- bm25
    ("fusion", "rerank", "rerank"),  # rerank <- fusion
    ("data", "sparse", "bm25_expanded"),  # the sparse mode searches bm25_expanded <- data (expansion is on)
    ("bm25_expanded", "hybrid", "fusion"),  # fusion <- bm25_expanded
    ("dense_train", "dense", "dense_index"),  # dense_index <- dense_train
])
def test_a_rebuilt_upstream_stage_makes_the_retriever_refuse(artifacts_copy, changed, mode, rerun):
    record = read_stage(artifacts_copy, changed)
    write_json_atomic(stage_dir(artifacts_copy, changed) / STAGE_FILE, {**record, "inputs_fingerprint": "rebuilt-since"})
    with pytest.raises(ArtifactError, match=f"stage '{rerun}' .* from stage '{changed}'.*rerun the '{rerun}' stage"):
        Retriever(mode=mode, artifacts_dir=artifacts_copy)


def test_the_bm25_searcher_uses_the_configured_lucene_threads(artifacts_copy):
    """``sparse.threads`` (16 in the A10G recipe) reaches ``bm25_searcher``, through which the fused modes, the
    evaluation and the teacher-score mining get their BM25 searcher, not only the pipeline's own."""
    from hybrid.searchers import bm25_searcher, sparse_index_stage

    stage = sparse_index_stage(artifacts_copy)
    record = read_stage(artifacts_copy, stage)
    config = record["config"]
    config.get("sparse", config)["threads"] = 3
    write_json_atomic(stage_dir(artifacts_copy, stage) / STAGE_FILE, record)
    assert bm25_searcher(artifacts_copy).threads == 3


def test_the_sparse_and_fused_modes_search_the_expanded_index_and_return_the_original_text(tiny_artifacts):
    collection = dict(read_collection(tiny_artifacts.data / "collection.tsv"))
    first = next(iter(tiny_artifacts.expanded))  # the only passage whose expansion holds "zanzibar"
    sparse = retriever(tiny_artifacts, "sparse").search("zanzibar", 5)
    assert [r.document_id for r in sparse] == [first]
    hybrid = {r.document_id: r for r in retriever(tiny_artifacts, "hybrid").search("zanzibar", 2 * FUSION_DEPTH)}
    for hit in (sparse[0], hybrid[first]):  # what is returned is the passage as the collection has it
        assert hit.document_text == collection[first] and "zanzibar" not in hit.document_text
    hits = {r.document_id for r in retriever(tiny_artifacts, "sparse").search("quokka", 5)}
    assert hits == set(tiny_artifacts.expanded)
    assert read_stage(tiny_artifacts.root, "bm25_expanded")["expanded_passages"] == len(tiny_artifacts.expanded)
    assert read_stage(tiny_artifacts.root, "fusion")["sparse_index"] == "bm25_expanded"


def test_a_fusion_model_trained_on_the_other_index_is_refused(artifacts_copy):
    record = read_stage(artifacts_copy, "fusion")
    write_json_atomic(stage_dir(artifacts_copy, "fusion") / STAGE_FILE, {**record, "sparse_index": "bm25"})
    Retriever(mode="sparse", artifacts_dir=artifacts_copy)  # BM25 alone has no fusion model to disagree with
    with pytest.raises(ArtifactError, match="trained on rankings of the 'bm25' index.*now 'bm25_expanded'"):
        Retriever(mode="hybrid", artifacts_dir=artifacts_copy)


def test_a_dense_index_from_another_model_is_refused(artifacts_copy):
    record = read_stage(artifacts_copy, "dense_index")
    write_json_atomic(artifacts_copy / "dense_index" / "stage.json", {**record, "model_fingerprint": "another-model"})
    with pytest.raises(ArtifactError, match="dense_index"):
        Retriever(mode="dense", artifacts_dir=artifacts_copy)


# ---- rerank -------------------------------------------------------------------------------------------------------


def test_the_reranker_is_a_searcher_over_the_hybrid_mode_built_from_the_stage_settings(tiny_artifacts):
    searcher = retriever(tiny_artifacts, "rerank").searcher
    assert isinstance(searcher, RerankingSearcher)
    stage = RerankSettings.read(tiny_artifacts.root).config  # what the rerank stage wrote
    weight = None if stage.combine == "replace" else stage.weight
    assert (searcher.depth, searcher.weight, searcher.time_budget_s) == (RERANK_DEPTH, weight, stage.time_budget_s)
    assert stage.time_budget_s == RerankConfig().time_budget_s
    assert searcher.scorer.config.max_passage_tokens == 24
    hybrid = retriever(tiny_artifacts, "hybrid")
    for query in queries(tiny_artifacts):
        a = [x.document_id for x in hybrid.search(query, 10)]
        b = [x.document_id for x in retriever(tiny_artifacts, "rerank").search(query, 10)]
        assert sorted(a[:RERANK_DEPTH]) == sorted(b[:RERANK_DEPTH]) and a[RERANK_DEPTH:] == b[RERANK_DEPTH:]


def _write_rerank_settings(root, **changes):
    path = root / "rerank" / "settings.json"
    settings = json.loads(path.read_text())
    path.write_text(json.dumps({**settings, **changes}) if changes.get("enabled", True) else json.dumps(changes))


def test_rerank_default_and_disabled_settings(artifacts_copy):
    _write_rerank_settings(artifacts_copy, default=False)
    assert Retriever(artifacts_dir=artifacts_copy).mode == "hybrid"
    _write_rerank_settings(artifacts_copy, enabled=False)
    assert Retriever(artifacts_dir=artifacts_copy).mode == "hybrid"
    with pytest.raises(ArtifactError, match="rerank"):
        Retriever(mode="rerank", artifacts_dir=artifacts_copy)


def test_settings_written_before_the_time_budget_existed_get_the_default(artifacts_copy):
    path = artifacts_copy / "rerank" / "settings.json"
    settings = json.loads(path.read_text())
    del settings["time_budget_s"]
    path.write_text(json.dumps(settings))
    assert Retriever(mode="rerank", artifacts_dir=artifacts_copy).searcher.time_budget_s == RerankConfig().time_budget_s


def test_the_scorer_precision_comes_from_the_stage_settings(tiny_artifacts, artifacts_copy):
    from fusion.query_likelihood import resolve_dtype

    stage = RerankSettings.read(tiny_artifacts.root).config  # the CPU config's "auto"
    scorer = retriever(tiny_artifacts, "rerank").searcher.scorer
    assert scorer.dtype == resolve_dtype(stage.dtype, scorer.device)
    settings = json.loads((artifacts_copy / "rerank" / "settings.json").read_text())
    del settings["dtype"]  # settings written before the field existed: float32
    (artifacts_copy / "rerank" / "settings.json").write_text(json.dumps(settings))
    assert Retriever(mode="rerank", artifacts_dir=artifacts_copy).searcher.scorer.dtype == "float32"
    _write_rerank_settings(artifacts_copy, dtype="bfloat16")
    bf16 = Retriever(mode="rerank", artifacts_dir=artifacts_copy)
    assert bf16.searcher.scorer.dtype == "bfloat16"
    hybrid = retriever(tiny_artifacts, "hybrid")
    for query in queries(tiny_artifacts):  # still a reordering of the fused top, nothing else moves
        a = [x.document_id for x in hybrid.search(query, 10)]
        b = [x.document_id for x in bf16.search(query, 10)]
        assert sorted(a[:RERANK_DEPTH]) == sorted(b[:RERANK_DEPTH]) and a[RERANK_DEPTH:] == b[RERANK_DEPTH:]
    _write_rerank_settings(artifacts_copy, dtype="float16")
    with pytest.raises(ConfigError, match="rerank.dtype"):
        Retriever(mode="rerank", artifacts_dir=artifacts_copy)


def test_a_spent_time_budget_falls_back_to_the_fused_order_and_is_counted(tiny_artifacts, artifacts_copy):
    _write_rerank_settings(artifacts_copy, time_budget_s=1e-9)  # nothing fits
    starved = Retriever(mode="rerank", artifacts_dir=artifacts_copy)
    hybrid = retriever(tiny_artifacts, "hybrid")
    qs = queries(tiny_artifacts)
    for query in qs:
        assert starved.search(query, 10) == hybrid.search(query, 10)
    stats = starved.searcher.budget_stats()
    assert (stats.queries, stats.cut, stats.candidates_scored, stats.cut_rate) == (len(qs), len(qs), 0, 1.0)
    _write_rerank_settings(artifacts_copy, time_budget_s=1e6)  # everything fits, however busy the box
    roomy = Retriever(mode="rerank", artifacts_dir=artifacts_copy).searcher
    for query in qs:
        roomy.search(query, 10)
    stats = roomy.budget_stats()
    assert (stats.queries, stats.cut) == (len(qs), 0)


def test_latency_benchmark_reports_percentiles_and_the_budget_cut_rate(artifacts_copy, tiny_artifacts):
    from hybrid.benchmark import benchmark

    _write_rerank_settings(artifacts_copy, time_budget_s=1e-9)
    table, raw = benchmark(artifacts_copy, list(tiny_artifacts.dev_queries.values())[:6], k=10,
                           modes=["hybrid", "dense", "rerank"], warmup=2)
    assert "| p50 ms | p95 ms | p99 ms |" in table and "budget cut %" in table
    assert "bm25-only (k=100)" in table and "hybrid (k=10)" in table and "rerank (k=10)" in table
    assert raw["hybrid"]["n"] == 4 and "budget_cut_rate" not in raw["hybrid"]
    assert raw["rerank"]["budget_cut_rate"] == 1.0 and "| 100.0 |" in table
    # nothing fits a budget of 1e-9 s: no candidate is scored, and the table says so
    assert raw["rerank"]["candidates_scored_per_query"] == 0.0 and "scored / query" in table
    assert "candidates_scored_per_query" not in raw["hybrid"]
    assert any(name.startswith("fusion") for name in raw["breakdown_ms"]["hybrid"])
    assert any(name.startswith("rerank") for name in raw["breakdown_ms"]["rerank"])
    assert "dense query encoding" in raw["breakdown_ms"]["dense"]
    # the box it was timed on heads the table and the raw numbers
    assert raw["machine"]["logical_cpus"] >= 1 and table.startswith(f"Machine: {raw['machine']['cpu']}")
