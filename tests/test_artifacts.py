"""The artifact directory's bookkeeping: the upstream chain that require_stage checks, and stored paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid.artifacts import (
    STAGE_FILE,
    ArtifactError,
    from_stored_path,
    require_stage,
    stage_dir,
    to_stored_path,
    write_json_atomic,
)

CHAIN = {"data": {}, "bm25": {"data": "fp-data"}, "fusion": {"bm25": "fp-bm25"}, "rerank": {"fusion": "fp-fusion"}}


def write_chain(root: Path, **fingerprints: str) -> None:
    for stage, upstream in CHAIN.items():
        record = {"stage": stage, "inputs_fingerprint": fingerprints.get(stage, f"fp-{stage}"), "upstream": upstream}
        write_json_atomic(stage_dir(root, stage) / STAGE_FILE, record)


def test_an_intact_chain_loads(tmp_path):
    write_chain(tmp_path)
    assert require_stage(tmp_path, "rerank")["inputs_fingerprint"] == "fp-rerank"


@pytest.mark.parametrize(("rebuilt", "stale"), [("fusion", "rerank"), ("bm25", "fusion"), ("data", "bm25")])
def test_a_rebuilt_stage_anywhere_up_the_chain_names_the_stage_to_rerun(tmp_path, rebuilt, stale):
    write_chain(tmp_path, **{rebuilt: "fp-new"})
    with pytest.raises(ArtifactError, match=f"stage '{stale}' .*from stage '{rebuilt}'.*rerun the '{stale}' stage"):
        require_stage(tmp_path, "rerank")


def test_a_missing_upstream_stage_is_named(tmp_path):
    write_chain(tmp_path)
    (stage_dir(tmp_path, "bm25") / STAGE_FILE).unlink()
    with pytest.raises(ArtifactError, match="stage 'bm25' has not been run"):
        require_stage(tmp_path, "fusion")


def test_stages_written_without_an_upstream_record_still_load(tmp_path):
    write_json_atomic(stage_dir(tmp_path, "bm25") / STAGE_FILE, {"stage": "bm25", "inputs_fingerprint": "x"})
    assert require_stage(tmp_path, "bm25")["inputs_fingerprint"] == "x"


def test_paths_inside_the_root_are_stored_relative(tmp_path):
    root = tmp_path / "artifacts"
    inside = root / "base_models" / "m"
    assert to_stored_path(root, inside) == "base_models/m"
    assert from_stored_path(tmp_path / "moved", "base_models/m") == tmp_path / "moved" / "base_models" / "m"
    outside = tmp_path / "models" / "m"
    assert to_stored_path(root, outside) == str(outside.resolve())
    assert from_stored_path(root, str(outside)) == outside  # absolute (as older manifests hold): as is
