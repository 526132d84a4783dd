"""faiss index: exact search equals numpy, approximate kinds have sane recall, manifests guard stale indexes."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from dense.faiss_index import IndexConfig, build_index, gpu_available, load_index, save_index
from dense.interfaces import ArtifactMismatchError, IncompleteArtifactError
from dense_fakes import one_faiss_thread  # noqa: F401 (fixture)

DIM, COUNT, CLUSTERS, QUERIES, K = 32, 3000, 60, 50, 10


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread(one_faiss_thread):
    yield


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors stored as float16 (like the encoded corpus) and noisy copies of some as queries."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLUSTERS, DIM))
    points = centers[rng.integers(0, CLUSTERS, COUNT)] + 0.4 * rng.normal(size=(COUNT, DIM))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    queries = points[rng.choice(COUNT, QUERIES, replace=False)] + 0.1 * rng.normal(size=(QUERIES, DIM))
    return points.astype(np.float16), queries.astype(np.float32)


@pytest.fixture(scope="module")
def memmapped(data, tmp_path_factory) -> np.ndarray:
    path = tmp_path_factory.mktemp("emb") / "embeddings.f16.npy"
    np.save(path, data[0])
    return np.load(path, mmap_mode="r")


def brute_force(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ embeddings.astype(np.float32).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def manifest_for(index: faiss.Index, config: IndexConfig) -> dict:
    return {
        "model_fingerprint": "model-a", "encoder_config": {"pooling": "mean"}, "corpus_sha256": "abc",
        "dim": index.d, "count": index.ntotal, "kind": config.kind, "metric": config.metric,
        "params": config.params(),
    }


def test_flat_equals_numpy_brute_force(memmapped, data):
    queries = data[1]
    index = build_index(memmapped, IndexConfig(add_batch_size=700), progress=False)  # 5 uneven add batches
    scores, ids = index.search(queries, K)
    want_scores, want_ids = brute_force(memmapped, queries, K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("config", "min_recall"),
    [
        (IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=64, ef_search=64), 0.9),
        (IndexConfig(kind="ivfpq", nlist=32, pq_m=16, pq_nbits=6, nprobe=8, train_size=COUNT), 0.5),
    ],
    ids=["hnsw", "ivfpq"],
)
def test_approximate_kinds_recall_against_flat(memmapped, data, config, min_recall):
    queries = data[1]
    _, truth = brute_force(memmapped, queries, K)
    index = build_index(memmapped, config, progress=False)
    assert index.ntotal == COUNT
    _, found = index.search(queries, K)
    assert recall(found, truth) >= min_recall


def test_save_load_round_trip_restores_search_params(memmapped, data, tmp_path):
    config = IndexConfig(kind="hnsw", hnsw_m=8, ef_construction=40, ef_search=77)
    index = build_index(memmapped, config, progress=False)
    save_index(index, tmp_path, manifest_for(index, config))
    loaded, manifest = load_index(tmp_path, {"model_fingerprint": "model-a", "dim": DIM, "count": COUNT})
    assert manifest["kind"] == "hnsw" and manifest["params"]["ef_search"] == 77
    assert faiss.downcast_index(loaded).hnsw.efSearch == 77
    np.testing.assert_array_equal(loaded.search(data[1], K)[1], index.search(data[1], K)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index_manifest.json"]  # no temp files


def test_mismatched_manifest_is_refused_naming_field_values_and_stage(memmapped, tmp_path):
    config = IndexConfig()
    index = build_index(memmapped, config, progress=False)
    save_index(index, tmp_path, manifest_for(index, config))
    with pytest.raises(ArtifactMismatchError) as err:
        load_index(tmp_path, {"model_fingerprint": "model-b", "encoder_config": {"pooling": "mean"}})
    message = str(err.value)
    assert "'model_fingerprint' is 'model-a'" in message and "'model-b' is expected" in message
    assert "rerun the dense index stage" in message and "encoder_config" not in message


def test_missing_or_unfinished_index_is_reported(tmp_path):
    with pytest.raises(IncompleteArtifactError, match=r"no index.*rerun the dense index stage"):
        load_index(tmp_path)
    (tmp_path / "index.faiss").write_bytes(b"")
    with pytest.raises(IncompleteArtifactError, match="unfinished index"):
        load_index(tmp_path)


def test_bad_settings_are_explained(memmapped):
    with pytest.raises(ValueError, match="pq_m=5 must divide the embedding dimension 32"):
        build_index(memmapped, IndexConfig(kind="ivfpq", nlist=8, pq_m=5), progress=False)
    with pytest.raises(ValueError, match="training needs at least"):
        build_index(memmapped[:100], IndexConfig(kind="ivfpq", nlist=8, pq_m=8), progress=False)
    with pytest.raises(ValueError, match="manifest lacks"):
        save_index(faiss.IndexFlatIP(DIM), "unused", {"kind": "flat"})


@pytest.mark.skipif(gpu_available(), reason="checks the message shown when faiss has no usable GPU")
def test_use_gpu_without_gpu_says_what_to_install(memmapped):
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        build_index(memmapped, IndexConfig(), use_gpu=True, progress=False)
    assert build_index(memmapped[:10], IndexConfig(), use_gpu="auto", progress=False).ntotal == 10
