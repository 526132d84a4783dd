"""Learned fusion: training on a toy set, ranking, JSON round trip and the feature-list check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fusion.analysis import Analyzer, IdfTable
from fusion.features import CandidateSet, FeatureBuilder, feature_names_for
from fusion.model import FeatureMismatchError, FusionModel, NotFittedError
from fusion.training import build_training_set, train_fusion

N_DISTRACTORS = 9


def toy_query(rng: np.random.Generator, i: int, texts: dict[str, str]) -> tuple[str, dict]:
    """Query ``i``: its relevant passage is BM25's top hit and shares the query words; dense prefers a distractor."""
    query = f"topic{i} subject{i}"
    rel = f"q{i}-rel"
    distractors = [f"q{i}-d{j}" for j in range(N_DISTRACTORS)]
    texts[rel] = f"all about topic{i} and subject{i} here"
    for j, pid in enumerate(distractors):
        # Some distractors share one query word, so overlap alone is not a perfect separator.
        texts[pid] = f"filler{rng.integers(50)} noise{j} " + (f"topic{i}" if j % 3 == 0 else f"other{j}")
    bm25_scores = np.sort(rng.uniform(5, 15, size=N_DISTRACTORS))[::-1]
    bm25 = [(rel, 20.0 + rng.uniform())] + list(zip(distractors, bm25_scores.tolist()))
    dense_order = [distractors[-1]] + list(rng.permutation(distractors[:-1] + [rel]))
    dense = list(zip(dense_order, np.sort(rng.uniform(0, 1, size=len(dense_order)))[::-1].tolist()))
    return query, {"bm25": bm25, "dense": dense}


@pytest.fixture(scope="module")
def toy() -> dict:
    rng = np.random.default_rng(0)
    texts: dict[str, str] = {}
    queries, rankings, qrels = {}, {}, {}
    for i in range(50):
        qid = f"q{i}"
        queries[qid], rankings[qid] = toy_query(rng, i, texts)
        qrels[qid] = {f"q{i}-rel": 1, f"q{i}-d0": 0}
    queries["noqrels"], rankings["noqrels"] = "topic0", rankings["q0"]
    queries["nopos"], rankings["nopos"] = "topic1", rankings["q1"]
    qrels["nopos"] = {"not-a-candidate": 2}
    idf = IdfTable.build(texts.values(), progress=False)
    builder = FeatureBuilder(("bm25", "dense"), 10, Analyzer(), idf)
    return {"texts": texts, "queries": queries, "rankings": rankings, "qrels": qrels, "builder": builder}


def passage_text_for(texts: dict[str, str]):
    return lambda pids: [texts[p] for p in pids]


@pytest.fixture(scope="module")
def trained(toy: dict) -> tuple[FusionModel, object]:
    train_qids = [f"q{i}" for i in range(40)] + ["noqrels", "nopos"]
    return train_fusion(
        {q: toy["queries"][q] for q in train_qids},
        toy["rankings"],
        toy["qrels"],
        toy["builder"],
        passage_text_for(toy["texts"]),
        C=1.0,
        progress=False,
    )


def test_training_set_labels_and_drops(toy: dict) -> None:
    queries = {q: toy["queries"][q] for q in ("q0", "q1", "noqrels", "nopos")}
    X, y, groups, stats = build_training_set(
        queries, toy["rankings"], toy["qrels"], toy["builder"], passage_text_for(toy["texts"]), progress=False
    )
    assert X.shape == (20, len(toy["builder"].feature_names)) and X.dtype == np.float32
    assert y.tolist().count(1) == 2 and groups.tolist() == ["q0"] * 10 + ["q1"] * 10
    assert stats.as_dict() == {
        "queries_in": 4,
        "queries_used": 2,
        "dropped_no_qrels": 1,
        "dropped_no_positive_candidate": 1,
        "candidates": 20,
        "positives": 2,
    }
    with pytest.raises(ValueError, match="have no rankings"):
        build_training_set({"zzz": "x"}, toy["rankings"], toy["qrels"], toy["builder"], str, progress=False)


def test_trained_fusion_ranks_the_relevant_passage_first(toy: dict, trained) -> None:
    model, stats = trained
    assert stats.queries_used == 40 and model.metadata["training_set"]["dropped_no_qrels"] == 1
    text = passage_text_for(toy["texts"])
    for i in range(40, 50):  # held-out queries
        cands = toy["builder"].build(toy["queries"][f"q{i}"], toy["rankings"][f"q{i}"], text)
        fused = model.fuse(cands)
        assert fused[0][0] == f"q{i}-rel"
        assert [s for _, s in fused] == sorted((s for _, s in fused), reverse=True)
        assert len(model.fuse(cands, k=3)) == 3
    coef = model.coefficients()
    assert set(coef) == set(toy["builder"].feature_names)
    assert coef["bm25.score"] > 0 and coef["overlap"] > 0


def test_scores_equal_the_sklearn_pipeline_and_original_units(toy: dict) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    y = (X[:, 0] + 0.3 * X[:, 1] + rng.normal(size=200) > 1.5).astype(int)
    model = FusionModel(["f1", "f2", "f3"], C=0.5, balanced=True).fit(X, y)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=1000)).fit(
        X, y
    )
    np.testing.assert_allclose(model.score(X), reference.decision_function(X), rtol=1e-9, atol=1e-9)
    original = model.coefficients("original")
    by_hand = X @ np.array([original[f] for f in ("f1", "f2", "f3")]) + model.intercept("original")
    np.testing.assert_allclose(by_hand, model.score(X), rtol=1e-9, atol=1e-9)


def test_save_load_round_trip_gives_identical_scores(toy: dict, trained, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "fusion" / "model.json"
    model.save(path)
    loaded = FusionModel.load(path, toy["builder"].feature_names)
    cands = toy["builder"].build(toy["queries"]["q45"], toy["rankings"]["q45"], passage_text_for(toy["texts"]))
    np.testing.assert_array_equal(loaded.score(cands.X), model.score(cands.X))
    assert loaded.fuse(cands) == model.fuse(cands)
    assert loaded.coefficients() == model.coefficients() and loaded.metadata == model.metadata
    saved = json.loads(path.read_text())  # reviewable JSON, not pickle
    assert saved["feature_names"] == list(model.feature_names) and saved["format_version"] == 1


def test_loading_a_model_with_other_features_is_refused(toy: dict, trained, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "model.json"
    model.save(path)
    with pytest.raises(FeatureMismatchError, match=r"lacks: \['rerank.score'.*Rerun the fusion training stage"):
        FusionModel.load(path, feature_names_for(["bm25", "dense", "rerank"]))
    with pytest.raises(FeatureMismatchError, match="not expected here: \\['dense.score'"):
        FusionModel.load(path, feature_names_for(["bm25"]))
    with pytest.raises(FeatureMismatchError, match="different order"):
        FusionModel.load(path, feature_names_for(["dense", "bm25"]))
    other = CandidateSet(["x"], np.zeros((1, 11), dtype=np.float32), feature_names_for(["bm25"]))
    with pytest.raises(FeatureMismatchError):
        model.fuse(other)
    data = json.loads(path.read_text())
    data["format_version"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(FeatureMismatchError, match="version 0"):
        FusionModel.load(path, model.feature_names)
    with pytest.raises(FileNotFoundError, match="Rerun the fusion"):
        FusionModel.load(tmp_path / "absent.json", model.feature_names)


def test_fit_refuses_bad_input() -> None:
    model = FusionModel(["a", "b"])
    with pytest.raises(NotFittedError):
        model.score(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="both labels"):
        model.fit(np.zeros((3, 2)), [0, 0, 0])
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        model.fit(np.zeros((3, 3)), [0, 1, 0])
    with pytest.raises(ValueError, match="non-finite values in columns \\['b'\\]"):
        model.fit(np.array([[0.0, np.inf], [1.0, 0.0]]), [0, 1])
