"""FusedSearcher: the first stages are asked for a fixed depth, so the fused answer is one ranking whatever k is."""

from __future__ import annotations

import pytest

from fusion.analysis import Analyzer, IdfTable
from fusion.features import FeatureBuilder, feature_names_for
from fusion.model import FusionModel
from fusion.searcher import ConvexStrategy, FusedSearcher, LearnedStrategy, RRFStrategy

DEPTH = 5
N = 40  # passages each fake retriever can rank


class FakeSearcher:
    """Ranks ``d0..d39`` in a fixed order per retriever; records every k it was asked for."""

    def __init__(self, name: str, stride: int) -> None:
        self.name, self.stride, self.asked = name, stride, []

    def _ranking(self, query: str, k: int):
        order = [(i * self.stride + len(query)) % N for i in range(N)]
        return [(f"d{j}", float(N - r) * (1.0 if self.name == "bm25" else 0.05)) for r, j in enumerate(order)][:k]

    def search(self, query: str, k: int):
        self.asked.append(k)
        return self._ranking(query, k)

    def batch_search(self, queries: list[str], k: int):
        self.asked.append(k)
        return [self._ranking(q, k) for q in queries]


def learned() -> LearnedStrategy:
    import numpy as np

    names = feature_names_for(("bm25", "dense"))
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, len(names))), np.arange(60) % 2
    analyzer = Analyzer()
    builder = FeatureBuilder(("bm25", "dense"), DEPTH, analyzer, IdfTable({}, 1, analyzer))
    return LearnedStrategy(FusionModel(names).fit(X, y), builder, lambda pids: [f"text of {p}" for p in pids])


STRATEGIES = {
    "rrf": lambda: RRFStrategy(60),
    "convex": lambda: ConvexStrategy({"bm25": 0.3, "dense": 0.7}),
    "learned": learned,
}


@pytest.fixture(params=list(STRATEGIES))
def fused(request):
    searcher = FusedSearcher(FakeSearcher("bm25", 7), FakeSearcher("dense", 11), STRATEGIES[request.param](), DEPTH)
    yield searcher
    searcher.close()


def test_first_stages_are_asked_for_the_depth_whatever_k_is(fused):
    for k in (1, 3, 10, 1000):
        fused.search("some query", k)
    fused.batch_search(["a", "bb"], 1000)
    assert fused.sparse.asked == fused.dense.asked == [DEPTH] * 5


def test_the_answer_is_a_prefix_of_one_ranking(fused):
    for query in ("q", "a longer query", "third one here"):
        full = fused.search(query, 1000)
        assert 0 < len(full) <= 2 * DEPTH  # at most the union of the two top-depth lists
        assert len({p for p, _ in full}) == len(full)
        assert [s for _, s in full] == sorted((s for _, s in full), reverse=True)
        for k in (1, 3, 7):
            assert fused.search(query, k) == full[:k]
        assert fused.batch_search([query], 3) == [full[:3]]


def test_candidates_are_each_first_stage_top_depth(fused):
    candidates = fused.candidates("q")
    assert set(candidates) == {"bm25", "dense"} and all(len(r) == DEPTH for r in candidates.values())
    assert fused.search("q", 1000) == fused.strategy.fuse("q", candidates)


def test_misuse(fused):
    with pytest.raises(TypeError, match="list of queries"):
        fused.batch_search("one query", 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fused.search("q", 0)
    assert fused.batch_search([], 3) == []
    with pytest.raises(ValueError, match="depth"):
        FusedSearcher(FakeSearcher("bm25", 7), FakeSearcher("dense", 11), RRFStrategy(), 0)
