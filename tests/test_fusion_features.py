"""Fusion feature rows: candidate union, per-retriever features, the missing-candidate fill rule, text features."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion.analysis import Analyzer, IdfTable
from fusion.features import CANDIDATE_FEATURES, FeatureBuilder, FillPolicy, feature_names_for

TEXTS = {
    "a": "the cat sat on the mat",
    "b": "a cat and a dog",
    "c": "dogs bark",
    "d": "",
    "e": "mat mat mat",
}
RANKINGS = {
    "bm25": [("a", 10.0), ("b", 8.0), ("c", 6.0)],
    "dense": [("b", 0.9), ("d", 0.5)],
}


def passage_text(pids: list[str]) -> list[str]:
    return [TEXTS[p] for p in pids]


@pytest.fixture(scope="module")
def idf() -> IdfTable:
    return IdfTable.build(TEXTS.values(), progress=False)


def builder(
    idf: IdfTable, retrievers=("bm25", "dense"), depth: int = 3, fill: FillPolicy = FillPolicy()
) -> FeatureBuilder:
    return FeatureBuilder(retrievers, depth, Analyzer(), idf, fill)


def row(cands, pid: str) -> dict[str, float]:
    return dict(zip(cands.feature_names, cands.X[cands.pids.index(pid)].tolist()))


def test_feature_names_are_stable_and_generated_per_retriever(idf: IdfTable) -> None:
    names = builder(idf).feature_names
    assert names[:6] == ("bm25.score", "bm25.minmax", "bm25.z", "bm25.rank", "bm25.rrf", "bm25.missing")
    assert names[6:12] == tuple(f"dense.{f}" for f in ("score", "minmax", "z", "rank", "rrf", "missing"))
    assert names[12:] == CANDIDATE_FEATURES == ("in_all_lists", "query_len", "passage_len", "overlap", "idf_overlap")
    three = feature_names_for(["bm25", "dense", "rerank"])
    assert len(three) == 3 * 6 + 5 and "rerank.rrf" in three


def test_candidates_are_the_union_of_top_depth(idf: IdfTable) -> None:
    cands = builder(idf).build("cat", RANKINGS, passage_text)
    assert cands.pids == ["a", "b", "c", "d"]
    assert cands.X.dtype == np.float32 and cands.X.shape == (4, 17)
    assert builder(idf, depth=2).build("cat", RANKINGS, passage_text).pids == ["a", "b", "d"]


def test_present_candidate_features(idf: IdfTable) -> None:
    cands = builder(idf).build("cat", RANKINGS, passage_text)
    b = row(cands, "b")
    z_bm25 = (8.0 - 8.0) / np.std([10.0, 8.0, 6.0])
    assert b["bm25.score"] == 8.0 and b["bm25.minmax"] == 0.5 and b["bm25.z"] == pytest.approx(z_bm25)
    assert b["bm25.rank"] == 2 and b["bm25.rrf"] == pytest.approx(1 / 62) and b["bm25.missing"] == 0
    assert b["dense.score"] == pytest.approx(0.9) and b["dense.minmax"] == 1.0 and b["dense.z"] == pytest.approx(1.0)
    assert b["dense.rank"] == 1 and b["dense.rrf"] == pytest.approx(1 / 61)
    assert b["in_all_lists"] == 1.0 and row(cands, "a")["in_all_lists"] == 0.0


@pytest.mark.parametrize("std_below", [0.0, 1.0])
def test_missing_candidate_gets_exactly_the_documented_fill(idf: IdfTable, std_below: float) -> None:
    cands = builder(idf, fill=FillPolicy(std_below=std_below)).build("cat", RANKINGS, passage_text)
    bm25 = np.array([10.0, 8.0, 6.0])
    d = row(cands, "d")  # only in dense
    min_z = (6.0 - bm25.mean()) / bm25.std()
    assert d["bm25.score"] == pytest.approx(6.0 - std_below * bm25.std())  # list min, minus std_below stds
    assert d["bm25.minmax"] == pytest.approx(-std_below * bm25.std() / 4.0)  # 0 by default
    assert d["bm25.z"] == pytest.approx(min_z - std_below)  # the list's min z by default
    assert (d["bm25.rank"], d["bm25.rrf"], d["bm25.missing"]) == (4.0, 0.0, 1.0)  # depth + 1, 0, flagged
    a = row(cands, "a")  # only in bm25; dense list is [0.9, 0.5]
    assert a["dense.score"] == pytest.approx(0.5 - std_below * 0.2)
    assert a["dense.z"] == pytest.approx(-1.0 - std_below)
    assert a["dense.missing"] == 1.0


def test_text_features_against_a_hand_count(idf: IdfTable) -> None:
    cands = builder(idf).build("The cat on the mat", RANKINGS, passage_text)
    a, b, d = row(cands, "a"), row(cands, "b"), row(cands, "d")
    assert a["query_len"] == 2  # "cat", "mat"; stopwords dropped
    assert a["passage_len"] == pytest.approx(math.log1p(3))  # cat sat mat
    assert d["passage_len"] == 0.0 and d["overlap"] == 0.0 and d["idf_overlap"] == 0.0
    assert a["overlap"] == 1.0 and a["idf_overlap"] == pytest.approx(1.0)
    assert b["overlap"] == 0.5  # has "cat", not "mat"
    idf_cat, idf_mat = idf.idf("cat"), idf.idf("mat")
    assert b["idf_overlap"] == pytest.approx(idf_cat / (idf_cat + idf_mat))
    empty_query = builder(idf).build("the of", RANKINGS, passage_text)
    assert not empty_query.column("overlap").any() and not empty_query.column("query_len").any()


def test_any_number_of_retrievers_and_extra_rankings_are_ignored(idf: IdfTable) -> None:
    rankings = {**RANKINGS, "rerank": [("c", 3.0)], "unused": [("e", 1.0)]}
    cands = builder(idf, retrievers=("rerank", "bm25", "dense")).build("cat", rankings, passage_text)
    assert cands.feature_names[0] == "rerank.score" and "e" not in cands.pids
    assert row(cands, "c")["in_all_lists"] == 0.0 and row(cands, "c")["rerank.rank"] == 1.0


def test_empty_list_and_missing_retriever(idf: IdfTable) -> None:
    cands = builder(idf, fill=FillPolicy(empty_list=-1.0)).build(
        "cat", {"bm25": RANKINGS["bm25"], "dense": []}, passage_text
    )
    assert cands.column("dense.missing").tolist() == [1.0, 1.0, 1.0]
    assert cands.column("dense.score").tolist() == [-1.0] * 3 and cands.column("dense.rank").tolist() == [4.0] * 3
    none = builder(idf).build("cat", {"bm25": [], "dense": []}, passage_text)
    assert none.X.shape == (0, 17)
    with pytest.raises(ValueError, match=r"lack retrievers \['dense'\]"):
        builder(idf).build("cat", {"bm25": RANKINGS["bm25"]}, passage_text)


def test_builder_refuses_inconsistent_setup(idf: IdfTable) -> None:
    with pytest.raises(ValueError, match="same analyzer"):
        FeatureBuilder(("bm25",), 3, Analyzer(remove_stopwords=False), idf)
    with pytest.raises(ValueError, match="unique"):
        builder(idf, retrievers=("bm25", "bm25"))
    with pytest.raises(ValueError, match="one per pid"):
        builder(idf).build("cat", RANKINGS, lambda pids: ["x"])
