"""DenseSearcher: the project's search shape over an encoded corpus and a faiss index."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dense.corpus_encoding import encode_corpus
from dense.faiss_index import IndexConfig, build_index, index_corpus
from dense.interfaces import ArtifactMismatchError, Searcher
from dense.searcher import DenseSearcher
from dense_fakes import DIM, HashingEncoder, one_faiss_thread  # noqa: F401 (fixture)



@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread(one_faiss_thread):
    yield


def make_corpus(n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(200)]
    return [(f"doc{i}", " ".join(rng.choice(vocab, size=int(rng.integers(3, 25))))) for i in range(n)]


CORPUS = make_corpus(120)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense_index")
    encode_corpus(
        HashingEncoder(), CORPUS, directory, batch_size=16, shard_size=50, model_fingerprint="m", progress=False
    )
    index_corpus(directory, IndexConfig(), progress=False)
    return directory


@pytest.fixture(scope="module")
def searcher(index_dir) -> DenseSearcher:
    return DenseSearcher.from_dir(index_dir, HashingEncoder(), expected={"model_fingerprint": "m"})


def queries(n: int) -> list[str]:
    rng = np.random.default_rng(2)
    return [" ".join(rng.choice(CORPUS[i % len(CORPUS)][1].split(), size=3)) for i in range(n)]


def test_is_a_searcher_and_finds_a_passage_by_its_own_text(searcher):
    assert isinstance(searcher, Searcher)
    pid, text = CORPUS[17]
    (top_pid, top_score), *_ = searcher.search(text, 3)
    assert top_pid == pid and top_score == pytest.approx(1.0, abs=2e-3)


def test_scores_are_inner_products_best_first(searcher):
    encoder = HashingEncoder()
    stored = {pid: vec for (pid, _), vec in zip(CORPUS, encoder.encode_passages([t for _, t in CORPUS]), strict=True)}
    query = queries(1)[0]
    ranking = searcher.search(query, 10)
    q = encoder.encode_queries([query])[0]
    for pid, score in ranking:
        assert score == pytest.approx(float(q @ stored[pid]), abs=5e-3)  # stored as float16
    assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)


def test_k_larger_than_corpus_returns_every_passage_once(searcher):
    ranking = searcher.search(queries(1)[0], 10 * len(CORPUS))
    assert sorted(pid for pid, _ in ranking) == sorted(pid for pid, _ in CORPUS)


def test_missing_neighbours_are_dropped_not_mapped_to_the_last_pid():
    # One probed cluster holds fewer than k vectors, so faiss pads the answer with id -1.
    pids = [f"p{i}" for i in range(300)]
    embeddings = np.random.default_rng(3).normal(size=(300, DIM)).astype(np.float32)
    config = IndexConfig(kind="ivfpq", nlist=8, pq_m=4, pq_nbits=4, nprobe=1, train_size=300)
    searcher = DenseSearcher(HashingEncoder(), build_index(embeddings, config, progress=False), pids)
    ranking = searcher.search("w1 w2 w3", 300)
    assert 0 < len(ranking) < 300
    assert len({pid for pid, _ in ranking}) == len(ranking)


def test_batch_search_equals_search(searcher):
    qs = queries(12)
    assert searcher.batch_search(qs, 7) == [searcher.search(q, 7) for q in qs]
    assert searcher.batch_search([], 7) == []


def test_concurrent_searches_equal_sequential(searcher):
    qs = queries(64)
    sequential = [searcher.search(q, 5) for q in qs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda q: searcher.search(q, 5), qs))
    assert concurrent == sequential


def test_misuse_is_explained(searcher, index_dir):
    with pytest.raises(TypeError, match="list of queries"):
        searcher.batch_search("one query", 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        searcher.search("w1", 0)
    with pytest.raises(ValueError, match="encoder makes 16-d vectors but the index holds 32-d"):
        DenseSearcher.from_dir(index_dir, HashingEncoder(dim=16))
    with pytest.raises(ArtifactMismatchError, match=r"'model_fingerprint' is 'm'.*rerun the dense index stage"):
        DenseSearcher.from_dir(index_dir, HashingEncoder(), expected={"model_fingerprint": "other"})


def test_index_in_its_own_directory_carries_the_pids(index_dir, tmp_path):
    index_corpus(index_dir, IndexConfig(kind="hnsw", hnsw_m=8), index_dir=tmp_path, progress=False)
    separate = DenseSearcher.from_dir(tmp_path, HashingEncoder())
    pid, text = CORPUS[5]
    assert separate.search(text, 1)[0][0] == pid


def test_an_approximate_index_answers_the_same_for_every_k_up_to_the_search_depth():
    # HNSW searches with efSearch = max(efSearch, k): asked for 10 it explores far less than asked for 1000, so on
    # a narrow graph the top 10 differ unless every search asks for the same number of neighbours.
    rng = np.random.default_rng(4)
    embeddings = rng.normal(size=(3000, DIM)).astype(np.float32)
    config = IndexConfig(kind="hnsw", hnsw_m=4, ef_construction=8, ef_search=1)
    index = build_index(embeddings, config, progress=False)
    pids = [f"p{i}" for i in range(len(embeddings))]
    searcher = DenseSearcher(HashingEncoder(), index, pids, search_depth=1000)
    for query in queries(20):
        assert searcher.search(query, 10) == searcher.search(query, 1000)[:10]
        assert searcher.batch_search([query], 500)[0] == searcher.search(query, 1000)[:500]
    with pytest.raises(ValueError, match="search_depth"):
        DenseSearcher(HashingEncoder(), index, pids, search_depth=0)
