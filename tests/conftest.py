"""Shared fixtures. ``tiny_msmarco_dir``: a canonical MS MARCO directory small enough for any unit test."""

from __future__ import annotations

from pathlib import Path

import pytest

# 30 passages, pids "0".."29" in numeric order (so byte-wise sorting differs from file order). A few carry what the
# real collection has: mis-decoded characters, U+0085 / U+2028 / vertical tab / CR inside the text, an extra tab.
TINY_PASSAGES: dict[str, str] = {
    str(i): f"Passage {i} talks about topic {i % 7} and the number {i * 13}." for i in range(30)
}
TINY_PASSAGES["0"] = "The presence of communication amid scientific minds was equally important."
TINY_PASSAGES["3"] = "Itâ€™s a mis-decoded apostrophe, kept as in the official file."
TINY_PASSAGES["4"] = "odd\x85line\u2028separators\x0band a\rcarriage return stay inside one passage"
TINY_PASSAGES["5"] = "a text\twith a tab in it"

TINY_QUERIES: dict[str, dict[str, str]] = {
    "train": {"100": "what is topic one", "101": "number thirteen", "102": "scientific minds", "103": "lost passage"},
    "dev": {"200": "apostrophe", "201": "carriage return", "202": "tab in text"},
    "dl19": {"300": "graded topic two", "301": "graded topic three", "302": "never judged"},
}
TINY_QRELS: dict[str, dict[str, dict[str, int]]] = {
    "train": {"100": {"1": 1}, "101": {"1": 1, "8": 1}, "102": {"0": 1}, "103": {"999999": 1}},
    "dev": {"200": {"3": 1}, "201": {"4": 1}, "202": {"5": 1}},
    "dl19": {"300": {"2": 3, "9": 2, "16": 0}, "301": {"10": 1, "17": 0, "999998": 2}},
}


def write_tiny_msmarco(root: Path) -> Path:
    """Write the tiny collection, queries and qrels above into ``root`` in the canonical layout."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "collection.tsv", "wb") as f:
        f.writelines(f"{pid}\t{text}\n".encode() for pid, text in TINY_PASSAGES.items())
    for split, queries in TINY_QUERIES.items():
        with open(root / f"queries.{split}.tsv", "wb") as f:
            f.writelines(f"{qid}\t{text}\n".encode() for qid, text in queries.items())
        with open(root / f"qrels.{split}.txt", "wb") as f:
            f.writelines(
                f"{qid} 0 {pid} {grade}\n".encode()
                for qid, judged in TINY_QRELS[split].items()
                for pid, grade in judged.items()
            )
    return root


@pytest.fixture
def tiny_msmarco_dir(tmp_path: Path) -> Path:
    """A fresh canonical directory (collection.tsv, queries/qrels for train, dev, dl19) under tmp_path."""
    return write_tiny_msmarco(tmp_path / "msmarco")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """A tiny artifact directory built by the real pipeline, once per test run (tests/retriever_fixture.py)."""
    from retriever_fixture import build_tiny_artifacts

    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny-artifacts"))
