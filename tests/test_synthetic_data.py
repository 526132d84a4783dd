"""The committed synthetic set is checked before training: checksum, evaluation-query leaks, held-out examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dense.querygen.cache import QueryCache
from dense.querygen.output import file_sha256
from dense.querygen.prompt import ForbiddenQueries
from dense.querygen.records import GeneratedQueries
from hybrid.synthetic_data import SyntheticDataError, publish, verify_precomputed


def _records(path: Path, queries: list[str]) -> Path:
    path.write_text("".join(json.dumps({"qid": f"llm-{i}-0", "query": q, "positives": [str(i)], "negatives": [],
                                        "source": "llm"}) + "\n" for i, q in enumerate(queries)))
    return path


FORBIDDEN = ForbiddenQueries(qids=frozenset({"7"}), texts=frozenset({"what is metformin"}))


def test_verify_accepts_clean_data_and_checks_the_checksum(tmp_path: Path) -> None:
    path = _records(tmp_path / "set.jsonl", ["how long is a marathon", "carbon steel contents"])
    (tmp_path / "set.manifest.json").write_text(json.dumps({"fewshot_qids": ["1", "2"]}))
    assert verify_precomputed(path, file_sha256(path), FORBIDDEN, {"3"}) == {"fewshot_qids": ["1", "2"]}
    with pytest.raises(SyntheticDataError, match="sha256"):
        verify_precomputed(path, "0" * 64, FORBIDDEN, {"3"})
    with pytest.raises(SyntheticDataError, match="does not exist"):
        verify_precomputed(tmp_path / "missing.jsonl", "", FORBIDDEN, set())


def test_verify_refuses_an_evaluation_query_whatever_its_case_and_punctuation(tmp_path: Path) -> None:
    path = _records(tmp_path / "set.jsonl", ["how long is a marathon", "What is Metformin?"])
    with pytest.raises(SyntheticDataError, match=r"set.jsonl:2: .*Metformin"):
        verify_precomputed(path, "", FORBIDDEN, set())


def test_verify_refuses_prompts_that_used_heldout_train_queries(tmp_path: Path) -> None:
    path = _records(tmp_path / "set.jsonl", ["how long is a marathon"])
    (tmp_path / "set.manifest.json").write_text(json.dumps({"fewshot_qids": ["1", "2", "3"]}))
    with pytest.raises(SyntheticDataError, match="held-out"):
        verify_precomputed(path, "", FORBIDDEN, {"3", "4"})


def test_publish_copies_records_and_manifest_with_checksum(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    _records(stage / "train.jsonl", ["how long is a marathon"])
    (stage / "manifest.json").write_text(json.dumps({"counts": {"records": 1}}))
    records, manifest = publish(stage, tmp_path / "data" / "llm-set.jsonl")
    assert records.read_bytes() == (stage / "train.jsonl").read_bytes()
    meta = json.loads(manifest.read_text())
    assert manifest.name == "llm-set.manifest.json" and meta["records_sha256"] == file_sha256(records)
    assert meta["counts"] == {"records": 1}
    with pytest.raises(ValueError, match=".jsonl"):
        publish(stage, tmp_path / "data" / "llm-set.txt")


def test_publish_snapshots_the_generation_cache_and_a_new_checkout_resumes_from_it(tmp_path: Path) -> None:
    from hybrid.synthetic_data import seed_cache

    stage = tmp_path / "stage"
    stage.mkdir()
    _records(stage / "train.jsonl", ["how long is a marathon"])
    (stage / "manifest.json").write_text("{}")
    writer = QueryCache(stage / "cache" / "generation.jsonl", "fp")
    writer.append([GeneratedQueries("p1", ("q one",))], seconds=1.0)
    with (stage / "cache" / "generation.jsonl").open("a") as f:
        f.write('{"fingerprint": "fp", "pid": "p2"')  # the writer is mid-line: not part of the snapshot
    publish(stage, tmp_path / "data" / "set.jsonl")
    snapshot = tmp_path / "data" / "set.cache.jsonl.gz"
    fresh = tmp_path / "checkout" / "stage"
    assert seed_cache(snapshot, fresh)
    resumed = QueryCache(fresh / "cache" / "generation.jsonl", "fp")
    assert len(resumed) == 1 and resumed.get("p1").queries == ("q one",)
    assert resumed.generation_seconds == pytest.approx(1.0)
    resumed.append([GeneratedQueries("p3", ("q three",))])
    assert not seed_cache(snapshot, fresh)  # an existing cache is further along: left as it is
    assert len(QueryCache(fresh / "cache" / "generation.jsonl", "fp")) == 2


def test_read_only_cache_leaves_a_torn_last_line_to_its_writer(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    writer = QueryCache(path, "fp")
    writer.append([GeneratedQueries("p1", ("q one",))], seconds=2.0)
    writer.append([GeneratedQueries("p2", ("q two",)), GeneratedQueries("p3", ("q three",))], seconds=3.0)
    with path.open("a") as f:
        f.write('{"fingerprint": "fp", "pid": "p4", "que')  # a line still being written
    size = path.stat().st_size
    reader = QueryCache(path, "fp", read_only=True)
    assert len(reader) == 3 and path.stat().st_size == size  # nothing truncated
    assert reader.generation_seconds == pytest.approx(5.0)
    with pytest.raises(PermissionError):
        reader.append([GeneratedQueries("p5", ("q",))])
    assert len(QueryCache(path, "fp")) == 3 and path.stat().st_size < size  # a writer repairs it


def test_verify_reads_the_examples_of_older_manifests(tmp_path: Path) -> None:
    path = _records(tmp_path / "old.jsonl", ["how long is a marathon"])
    (tmp_path / "old.manifest.json").write_text(json.dumps({"generation": {"prompt": {"example_qids": ["3"]}}}))
    with pytest.raises(SyntheticDataError, match="held-out"):
        verify_precomputed(path, "", FORBIDDEN, {"3"})


def test_pipeline_trains_on_a_checked_precomputed_set(tmp_path: Path, tiny_msmarco_dir: Path) -> None:
    """The synthetic stage checks the committed file, drops records whose passage the collection lacks and takes the
    first ``precomputed_max_records``; a changed file with the old checksum is refused."""
    from hybrid.config import load_config
    from hybrid.pipeline import Pipeline

    records = _records(tmp_path / "set.jsonl", ["passage about topic", "number thirty nine", "nothing here"])
    lines = records.read_text().splitlines()
    lines[2] = lines[2].replace('["2"]', '["999999"]')  # a passage this collection does not have
    records.write_text("\n".join(lines) + "\n")
    (tmp_path / "set.manifest.json").write_text(json.dumps({"fewshot_qids": []}))
    sha = file_sha256(records)
    repo = Path(__file__).resolve().parents[1]

    def config(*extra: str):
        return load_config(repo / "configs" / "cpu-marco43k.toml", [
            f'data.dir="{tiny_msmarco_dir}"', 'data.eval_splits=["dev"]', 'sparse.heap="512m"',
            "synthetic.methods=[]", f'synthetic.precomputed="{records}"', f'synthetic.precomputed_sha256="{sha}"',
            "fusion.holdout_queries=1", *extra])

    root = tmp_path / "artifacts"
    done = Pipeline(config(), root).run(["data", "bm25", "synthetic"])
    assert done["synthetic"]["precomputed"] == {"records": 3, "without_passage": 1, "equal_to_heldout_query": 0,
                                                "used": 2}
    used = (root / "synthetic" / "precomputed.jsonl").read_text().splitlines()
    assert [json.loads(line)["query"] for line in used] == ["passage about topic", "number thirty nine"]
    # a generated query that equals the held-out selection query's text (case and punctuation aside) is not trained on
    queries, _, _, heldout = Pipeline(config(), root).real_train_split()
    echo = _records(tmp_path / "echo.jsonl", ["passage about topic", queries[heldout[0]].upper() + "?"])
    (tmp_path / "echo.manifest.json").write_text(json.dumps({"fewshot_qids": []}))
    done = Pipeline(config(f'synthetic.precomputed="{echo}"', f'synthetic.precomputed_sha256="{file_sha256(echo)}"'),
                    root).run(["synthetic"])
    assert done["synthetic"]["precomputed"] == {"records": 2, "without_passage": 0, "equal_to_heldout_query": 1,
                                                "used": 1}
    done = Pipeline(config("synthetic.precomputed_max_records=1"), root).run(["synthetic"])
    assert done["synthetic"]["precomputed"]["used"] == 1

    records.write_text(records.read_text().replace("topic", "topics"))
    with pytest.raises(SyntheticDataError, match="sha256"):
        Pipeline(config(), root).run(["synthetic"], force=["synthetic"])
    # a leak is refused whatever the checksum says: the dev query "apostrophe", with other case and punctuation
    _records(records, ["Apostrophe!"])
    with pytest.raises(SyntheticDataError, match="Apostrophe!.*forbidden"):
        Pipeline(config(f'synthetic.precomputed_sha256="{file_sha256(records)}"'), root).run(
            ["synthetic"], force=["synthetic"])
