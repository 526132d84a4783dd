"""Analyzer, IDF table and per-list normalisation of the fusion package."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fusion.analysis import Analyzer, IdfTable, StemmerUnavailableError
from fusion.normalise import FillPolicy, minmax, normalise, split_ranking, zscore

HAVE_STEMMER = any(importlib.util.find_spec(m) is not None for m in ("Stemmer", "nltk"))


def test_analyzer_lowercases_splits_unicode_and_drops_stopwords() -> None:
    assert Analyzer().tokenize("The Café’s naïve-Test, of IT and dogs_cats 42!") == [
        "café",
        "s",
        "naïve",
        "test",
        "dogs",
        "cats",
        "42",
    ]
    assert Analyzer(remove_stopwords=False).tokenize("The cat") == ["the", "cat"]


def test_stemming_without_a_stemmer_library_is_refused(monkeypatch) -> None:
    for module in ("Stemmer", "nltk", "nltk.stem", "nltk.stem.porter"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(StemmerUnavailableError, match="PyStemmer"):
        Analyzer(stem=True)


def test_stemming_uses_pystemmer_when_installed(monkeypatch) -> None:
    """Neither library is a dependency, so a stand-in PyStemmer module checks the wiring on every box."""
    fake = types.ModuleType("Stemmer")

    class Stemmer:
        def __init__(self, algorithm: str) -> None:
            assert algorithm == "porter"

        def stemWord(self, word: str) -> str:  # noqa: N802 (PyStemmer's name)
            return {"running": "run", "cats": "cat"}.get(word, word)

    fake.Stemmer = Stemmer
    monkeypatch.setitem(sys.modules, "Stemmer", fake)
    assert Analyzer(stem=True).tokenize("running cats") == ["run", "cat"]


@pytest.mark.skipif(not HAVE_STEMMER, reason="no stemmer library installed")
def test_stemming_with_an_installed_stemmer() -> None:
    assert Analyzer(stem=True).tokenize("running cats") == ["run", "cat"]


def test_idf_table_matches_a_hand_count() -> None:
    texts = ["The cat sat", "the cat ran ran", "a dog ran"]
    table = IdfTable.build((t for t in texts), progress=False)  # a generator: streamed, no len()
    assert table.n_docs == 3
    assert table.df == {"cat": 2, "sat": 1, "ran": 2, "dog": 1}  # stopwords gone, "ran" counted once per doc
    assert table.idf("cat") == pytest.approx(math.log(1 + (3 - 2 + 0.5) / (2 + 0.5)))
    assert table.idf("dog") == pytest.approx(math.log(1 + (3 - 1 + 0.5) / (1 + 0.5)))
    assert table.idf("unicorn") == pytest.approx(math.log(1 + 3.5 / 0.5)) == table.unseen_idf
    assert table.unseen_idf > table.idf("dog") > table.idf("cat")
    np.testing.assert_allclose(table.idfs(["cat", "unicorn"]), [table.idf("cat"), table.unseen_idf])


def test_idf_table_save_load_round_trip_is_atomic(tmp_path: Path) -> None:
    table = IdfTable.build(["alpha beta", "beta gamma"], analyzer=Analyzer(remove_stopwords=False), progress=False)
    path = tmp_path / "sub" / "idf.json"
    table.save(path)
    assert sorted(os.listdir(path.parent)) == ["idf.json"]  # no temp file left behind
    loaded = IdfTable.load(path)
    assert loaded == table and loaded.analyzer == Analyzer(remove_stopwords=False)


def test_idf_table_refuses_a_wrong_version(tmp_path: Path) -> None:
    path = tmp_path / "idf.json"
    IdfTable.build(["a b"], progress=False).save(path)
    data = json.loads(path.read_text())
    data["format_version"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 999.*Rebuild"):
        IdfTable.load(path)
    with pytest.raises(FileNotFoundError, match="IdfTable.build"):
        IdfTable.load(tmp_path / "missing.json")


@pytest.mark.integration
def test_idf_table_on_the_real_pool() -> None:
    root = os.environ.get("MSMARCO_DIR")
    if not root or not (Path(root) / "collection.tsv").is_file():
        pytest.skip("MSMARCO_DIR is unset or has no collection.tsv")
    lines = (Path(root) / "collection.tsv").read_text(encoding="utf-8").splitlines()[:5000]
    table = IdfTable.build((line.split("\t", 1)[1] for line in lines), progress=False, total=len(lines))
    assert table.n_docs == len(lines)
    assert "the" not in table.df  # stopword
    # A common word is less informative than a rare one.
    assert table.idf("water") < table.idf("photosynthesis") <= table.unseen_idf


def test_normalising_constant_and_empty_lists_is_defined() -> None:
    np.testing.assert_array_equal(minmax([3.0, 3.0, 3.0]), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(zscore([3.0, 3.0]), [0.0, 0.0])
    assert minmax([]).size == 0 and zscore([]).size == 0
    np.testing.assert_allclose(minmax([4.0, 3.0, 2.0]), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(normalise([3.0, 1.0], "z"), [1.0, -1.0])
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise([1.0], "softmax")  # type: ignore[arg-type]


def test_fill_policy_values() -> None:
    scores = [10.0, 8.0, 6.0]
    std = np.std(scores)
    default = FillPolicy().fill(scores)
    assert (default.raw, default.minmax, default.z) == (6.0, 0.0, pytest.approx(-4 / (2 * std)))
    one_std = FillPolicy(std_below=1.0).fill(scores)
    assert one_std.raw == pytest.approx(6.0 - std)
    assert one_std.minmax == pytest.approx(-std / 4.0)
    assert one_std.z == pytest.approx(default.z - 1.0)
    constant = FillPolicy(std_below=1.0).fill([5.0, 5.0])
    assert (constant.raw, constant.minmax, constant.z) == (5.0, 0.0, -1.0)
    empty = FillPolicy(empty_list=-3.0).fill([])
    assert (empty.raw, empty.minmax, empty.z) == (-3.0, -3.0, -3.0)
    with pytest.raises(ValueError, match="std_below"):
        FillPolicy(std_below=-1.0)


def test_split_ranking_refuses_bad_rankings() -> None:
    assert split_ranking("bm25", [("a", 2.0), ("b", 1.0), ("c", 0.0)], depth=2)[0] == ["a", "b"]
    with pytest.raises(ValueError, match="'bm25' is not sorted best first: rank 1"):
        split_ranking("bm25", [("a", 1.0), ("b", 2.0)])
    with pytest.raises(ValueError, match="more than once: \\['a'\\]"):
        split_ranking("dense", [("a", 2.0), ("a", 1.0)])
    with pytest.raises(ValueError, match="non-finite"):
        split_ranking("dense", [("a", float("nan"))])
