"""Precomputed passage lexicon: same text features as tokenising, the same idf table, errors for foreign pids."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.analysis import Analyzer, IdfTable
from fusion.features import FeatureBuilder
from fusion.lexicon import LexiconError, PassageLexicon, build_and_save

TEXTS = {
    "10": "The cat sat on the mat; the cat purred.",
    "7": "a cat and a dog",
    "300": "dogs bark at night, Dogs BARK",
    "4": "",
    "55": "mat mat mat été ünïcode 42",
}
RANKINGS = {"bm25": [("10", 3.0), ("7", 2.0), ("300", 1.0)], "dense": [("4", 0.9), ("55", 0.5), ("7", 0.1)]}


def passage_text(pids):
    return [TEXTS[p] for p in pids]


def test_build_gives_the_same_idf_table_as_the_idf_pass() -> None:
    lexicon, idf = PassageLexicon.build(TEXTS.items(), progress=False)
    assert idf == IdfTable.build(TEXTS.values(), progress=False)
    assert len(lexicon) == 5


@pytest.mark.parametrize("query", ["cat mat", "Dogs bark loudly", "the and of", "été 42 cat cat", "zebra"])
def test_lexicon_features_equal_tokenised_features(tmp_path, query: str) -> None:
    lexicon, idf = build_and_save(TEXTS.items(), tmp_path / "lex", progress=False)
    plain = FeatureBuilder(("bm25", "dense"), 3, Analyzer(), idf)
    fast = FeatureBuilder(("bm25", "dense"), 3, Analyzer(), idf, lexicon=lexicon)
    a = plain.build(query, RANKINGS, passage_text)
    b = fast.build(query, RANKINGS, lambda pids: pytest.fail("passage_text must not be called with a lexicon"))
    assert a.pids == b.pids
    np.testing.assert_allclose(a.X, b.X, rtol=1e-6)


def test_overlap_counts_and_weights() -> None:
    lexicon, _ = PassageLexicon.build(TEXTS.items(), progress=False)
    ids = lexicon.term_ids(["cat", "mat", "unseen"])
    assert ids[2] == -1
    lengths, shared, weight = lexicon.overlap(["10", "4", "55"], ids, np.array([1.0, 10.0, 100.0]))
    assert lengths.tolist() == [5, 0, 6]  # cat sat mat cat purred: stopwords dropped, repeats counted
    assert shared.tolist() == [2, 0, 1]
    assert weight.tolist() == [11.0, 0.0, 10.0]


def test_unknown_pid_and_missing_files_raise_clearly(tmp_path) -> None:
    lexicon, _ = build_and_save(TEXTS.items(), tmp_path / "lex", progress=False)
    with pytest.raises(KeyError, match="not in the lexicon"):
        lexicon.rows(["10", "999999999999"])
    (tmp_path / "lex" / "terms.npy").unlink()
    with pytest.raises(LexiconError, match="fusion stage"):
        PassageLexicon.load(tmp_path / "lex")


def test_duplicate_pid_and_analyzer_mismatch_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate passage id '1'"):
        PassageLexicon.build([("1", "a"), ("2", "b"), ("1", "c")], progress=False)
    lexicon, idf = PassageLexicon.build(TEXTS.items(), progress=False)
    with pytest.raises(ValueError, match="lexicon was built with"):
        FeatureBuilder(("bm25",), 3, idf.analyzer, idf, lexicon=PassageLexicon.build(
            TEXTS.items(), Analyzer(remove_stopwords=False), progress=False)[0])
    assert lexicon.analyzer == Analyzer()


def test_save_replaces_an_existing_lexicon(tmp_path) -> None:
    build_and_save([("1", "old text")], tmp_path / "lex", progress=False)
    lexicon, _ = build_and_save(TEXTS.items(), tmp_path / "lex", progress=False)
    assert len(PassageLexicon.load(tmp_path / "lex")) == 5 == len(lexicon)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lex"]
