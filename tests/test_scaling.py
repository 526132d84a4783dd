"""Data-scaling curves (hybrid/scaling.py): x values read from the runs, a table row per run, a PNG written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid.artifacts import STAGE_FILE, ArtifactError, stage_dir
from hybrid.scaling import load_run, scaling_chart, scaling_table


def _fake_run(root: Path, synthetic: int, r1: float, splits=("holdout", "dev")) -> Path:
    stage_dir(root, "dense_train").mkdir(parents=True)
    (stage_dir(root, "dense_train") / STAGE_FILE).write_text(json.dumps({"real_queries": 219, "synthetic_queries": synthetic}))
    (root / "eval").mkdir()
    for split in splits:
        (root / "eval" / f"dense.{split}.trec").write_text("")
        (root / "eval" / f"dense.{split}.metrics.json").write_text(json.dumps({
            "name": "dense", "split": split, "metrics": {"R@1": r1, "MRR@10": r1 + 0.1, "n": 150.0},
            "per_query": {}, "latency": None, "run_file": f"dense.{split}.trec", "inputs": "x"}))
    return root


def test_points_take_their_x_from_the_run_and_sort_by_it(tmp_path: Path) -> None:
    runs = [load_run(_fake_run(tmp_path / name, n, r1), "dense", ["holdout", "dev"])
            for name, n, r1 in [("all", 8000, 0.3), ("none", 0, 0.1), ("half", 4000, 0.2)]]
    assert [r.synthetic_queries for r in runs] == [8000, 0, 4000]
    table = scaling_table(runs, [], ["holdout"], ["R@1"])
    body = [line for line in table.splitlines()[2:]]
    assert [line.split("|")[1].strip() for line in body] == ["none", "half", "all"]
    assert "0.200" in body[1]
    png = scaling_chart(runs, {"crops": runs[0]}, ["holdout", "dev"], ["R@1", "MRR@10"], tmp_path / "out" / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_directory_that_is_not_an_ablation_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="dense_train"):
        load_run(tmp_path, "dense", ["dev"])
    _fake_run(tmp_path / "r", 10, 0.1, splits=("dev",))
    with pytest.raises(ArtifactError, match="holdout"):
        load_run(tmp_path / "r", "dense", ["holdout"])
