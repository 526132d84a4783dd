"""The fusion stage's directory: written whole, and loadable; a failed rerun leaves the previous one untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hybrid.fusion_stage as fusion_stage
from hybrid.fusion_stage import FusionArtifacts, train_fusion_artifacts
from test_fusion_model import toy_query


def _toy_inputs(n: int = 12) -> dict:
    rng = np.random.default_rng(1)
    texts: dict[str, str] = {}
    queries, rankings, qrels = {}, {}, {}
    for i in range(n):
        qid = f"q{i}"
        queries[qid], rankings[qid] = toy_query(rng, i, texts)
        qrels[qid] = {f"q{i}-rel": 1}
    return {"queries": queries, "rankings": rankings, "qrels": qrels, "texts": texts}


def _train(out: Path, toy: dict) -> dict:
    texts = toy["texts"]
    return train_fusion_artifacts(
        out, toy["queries"], toy["rankings"], toy["qrels"], lambda pids: [texts[p] for p in pids],
        list(texts.items()), len(texts), depth=10,
    )


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_fusion_directory_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toy = _toy_inputs()
    out = tmp_path / "fusion"
    summary = _train(out, toy)
    assert sorted(p.name for p in out.iterdir()) == ["lexicon", "model.json", "settings.json"]
    loaded = FusionArtifacts.load(out)
    assert loaded.settings.depth == 10 and loaded.settings.convex_weight == summary["convex_weight"]
    (out / "stage.json").write_text("{}")  # the pipeline's record of the finished stage
    before = _snapshot(out)

    def killed(*args, **kwargs):
        raise RuntimeError("killed while tuning the convex weight")

    monkeypatch.setattr(fusion_stage, "tune_convex_weight", killed)
    other = dict(toy, texts={pid: f"{text} changed" for pid, text in toy["texts"].items()})
    with pytest.raises(RuntimeError, match="killed"):
        _train(out, other)
    assert _snapshot(out) == before  # old lexicon, model, settings and stage record, nothing half-new
    assert [p.name for p in tmp_path.iterdir()] == ["fusion"]  # no temporary directory left behind
