"""End to end: the pipeline on a small slice of the real 43k pool with a tiny dense model, then ``Retriever`` on real
passages. The Retriever's own behaviour (modes, errors, threads, stale stages, budget) is tested without the pool in
tests/test_retriever.py."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from retriever_fixture import tiny_causal_lm, tiny_encoder_backbone
from write_audit import record_writes

from hybrid.config import load_config
from hybrid.msmarco import MsMarcoDir, read_collection
from hybrid.pipeline import Pipeline

pytestmark = pytest.mark.integration

N_DEV, N_DL19, N_TRAIN, N_DISTRACTORS = 25, 6, 120, 1500


def _write_slice(src: MsMarcoDir, out: Path) -> Path:
    """Dev/DL19/train queries (the train ones with a positive in the pool), their judged passages, distractors."""
    rng = random.Random(0)
    pool = dict(read_collection(src.collection_path))
    keep: set[str] = set()
    out.mkdir(parents=True)
    for split, n in (("dev", N_DEV), ("dl19", N_DL19), ("train", N_TRAIN)):
        queries, qrels = src.queries(split), src.qrels(split)
        qids = sorted(q for q, judged in qrels.items() if any(g > 0 and p in pool for p, g in judged.items()))[:n]
        with open(out / f"queries.{split}.tsv", "w", encoding="utf-8") as f:
            f.writelines(f"{q}\t{queries[q]}\n" for q in qids)
        with open(out / f"qrels.{split}.txt", "w") as f:
            for q in qids:
                for p, g in qrels[q].items():
                    if p in pool:
                        f.write(f"{q} 0 {p} {g}\n")
                        keep.add(p)
    keep |= set(rng.sample(sorted(pool), N_DISTRACTORS))
    with open(out / "collection.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{p}\t{pool[p]}\n" for p in pool if p in keep)
    return out


def _slice_expansions(slice_dir: Path, out: Path) -> Path:
    """The committed generation cache's queries for the slice's passages (the CPU config's document expansion).
    Without the few-shot example ids: its prompts were kept away from the CPU config's holdout on the whole pool,
    not from the slice's (the stage's check of them is tested in tests/test_expansion.py)."""
    import gzip
    import json

    from hybrid.synthetic_data import resolve_precomputed

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "cpu-marco43k.toml")
    pids = {pid for pid, _ in read_collection(slice_dir / "collection.tsv")}
    with gzip.open(resolve_precomputed(config.sparse.expansion.file), "rt", encoding="utf-8") as f, \
            open(out, "w", encoding="utf-8") as w:
        for line in f:
            record = json.loads(line)
            if record["pid"] in pids:
                w.write(json.dumps({"pid": record["pid"], "queries": record["queries"]}) + "\n")
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The pipeline run once on the slice, with a record of every file its stages opened for writing."""
    data = Path(os.environ.get("MSMARCO_DIR", ""))
    if not (data / "collection.tsv").exists():
        pytest.skip("MSMARCO_DIR is not set to the marco43k pool")
    root = tmp_path_factory.mktemp("e2e")
    slice_dir = _write_slice(MsMarcoDir(data), root / "slice")
    texts = [t for _, t in read_collection(slice_dir / "collection.tsv")]
    expansions = _slice_expansions(slice_dir, root / "expansions.jsonl")
    model = tiny_encoder_backbone(texts[:2000], root / "tiny-bert")
    lm = tiny_causal_lm(texts[:2000], root / "tiny-lm")
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "cpu-marco43k.toml",
        [
            f'data.dir="{slice_dir}"',
            "sparse.heap=\"1g\"",
            # crop queries generated on the slice (the committed LLM set is checked in test_synthetic_data.py)
            'synthetic.methods=["crop"]',
            'synthetic.precomputed=""',
            "synthetic.max_passages=200",
            f'sparse.expansion.file="{expansions}"',
            'sparse.expansion.sha256=""',
            f'dense.base_model="{model}"',
            "dense.base_layers=0",
            "dense.hard_negatives_depth=10",
            "dense.encode_batch_size=128",
            "dense.encode_shard_size=500",
            "dense.encoder.query_max_len=16",
            "dense.encoder.passage_max_len=32",
            "dense.train.max_steps=6",
            "dense.train.batch_size=8",
            "dense.train.checkpoint_every=3",
            "fusion.holdout_queries=40",
            "fusion.depth=20",
            "eval.k=50",
            "eval.latency_queries=5",
            "rerank.enabled=true",
            f'rerank.model="{lm}"',
            "rerank.depth=3",
            "rerank.max_passage_tokens=24",
        ],
    )
    pipeline = Pipeline(config, root / "artifacts")
    with record_writes(pipeline.root) as writes:
        done = pipeline.run()
    return pipeline, done, slice_dir, writes


@pytest.fixture(scope="module")
def built(build):
    pipeline, done, slice_dir, _ = build
    return pipeline, done, slice_dir


def test_every_stage_ran_and_recorded_its_inputs(built):
    pipeline, done, _ = built
    assert list(done) == ["data", "bm25", "bm25_expanded", "synthetic", "dense_train", "dense_index", "fusion",
                          "rerank", "evaluate"]
    for stage, record in done.items():
        assert record["inputs_fingerprint"] == pipeline.inputs_fingerprint(stage)
        assert record["machine"]["logical_cpus"] >= 1  # its seconds depend on the box
    assert done["fusion"]["train_queries"] == 40
    # the CPU config's document expansion: the committed generation cache, for the slice's passages
    assert done["bm25_expanded"]["enabled"] and done["fusion"]["sparse_index"] == "bm25_expanded"
    assert 0 < done["bm25_expanded"]["expanded_passages"] <= len(pipeline.passages())
    assert done["dense_train"]["real_queries"] == N_TRAIN - 40
    assert set(done["evaluate"]["tables"]) == {"dev", "dl19"}
    assert (pipeline.root / "eval" / "ablation.dev.md").exists()
    assert "| rerank |" in done["evaluate"]["tables"]["dev"] and done["rerank"]["depth"] == 3


def test_every_file_the_stages_write_goes_through_an_atomic_writer(build):
    writes = build[3]
    assert len(writes.atomic) > 20  # the audit saw the stages write (temporary files and directories)
    # The corpus encoding fills its embedding matrix in place, shard by shard, to resume after a kill; the
    # manifest written last (atomically) is what marks it finished.
    resumable = {"dense_index/embeddings/embeddings.f16.npy"}
    assert sorted(set(writes.in_place) - resumable) == []
    # Journals appended to: the training validation log (none here) and generation caches; none in this run.
    assert writes.appended == []


def test_rerun_skips_up_to_date_stages(built):
    pipeline, done, _ = built
    again = Pipeline(pipeline.config, pipeline.root).run(["data", "bm25", "fusion"])
    assert {s: r["seconds"] for s, r in again.items()} == {s: done[s]["seconds"] for s in again}


@pytest.mark.parametrize("mode", ["sparse", "dense", "rrf", "convex", "hybrid", "rerank"])
def test_retriever_results_carry_the_right_passage_text(built, mode):
    from hybrid import Result, Retriever

    pipeline, _, slice_dir = built
    texts = dict(read_collection(slice_dir / "collection.tsv"))
    retriever = Retriever(mode=mode, artifacts_dir=pipeline.root)
    results = retriever.search("what is the manhattan project", 5)
    assert 1 <= len(results) <= 5
    assert all(isinstance(r, Result) for r in results)
    for r in results:
        assert r.document_text == texts[r.document_id]
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    # k larger than the corpus returns what exists
    assert len(retriever.search("manhattan", 10_000)) <= len(texts)
    # and the answer does not depend on k (real dev queries, HNSW over ~1.6k real passages)
    for query in list(MsMarcoDir(slice_dir).queries("dev").values())[:4]:
        assert retriever.search(query, 10) == retriever.search(query, 1000)[:10]


def test_changed_dense_config_retrains_from_scratch_and_outdates_downstream(built, tmp_path):
    import dataclasses
    import shutil

    pipeline, done, _ = built
    root = tmp_path / "artifacts"
    shutil.copytree(pipeline.root, root)
    dense = dataclasses.replace(pipeline.config.dense, train={**pipeline.config.dense.train, "max_steps": 4})
    changed = Pipeline(dataclasses.replace(pipeline.config, dense=dense), root)
    assert not changed.up_to_date("dense_train") and not changed.up_to_date("fusion")
    assert changed.up_to_date("bm25")
    record = changed.run(["dense_train"])["dense_train"]
    assert record["model_fingerprint"] != done["dense_train"]["model_fingerprint"]
    import json

    assert json.loads((root / "dense_model" / "model" / "manifest.json").read_text())["steps"] == 4


def test_second_round_trains_on_negatives_mined_by_the_first_rounds_index(built, tmp_path):
    import dataclasses
    import json
    import shutil

    from dense.training_data import read_records
    from hybrid.config import SelfMinedRoundConfig

    pipeline, done, _ = built
    root = tmp_path / "artifacts"
    shutil.copytree(pipeline.root, root)
    refine = SelfMinedRoundConfig(steps=3, depth=10, skip_top=2, negatives=3)
    config = dataclasses.replace(pipeline.config, dense=dataclasses.replace(pipeline.config.dense, refine=refine))
    record = Pipeline(config, root).run(["dense_train"])["dense_train"]
    assert (record["first_round_steps"], record["second_round_steps"]) == (6, 3)

    out = root / "dense_model"
    first, final = out / "first_round" / "model", out / "model"
    assert json.loads((first / "manifest.json").read_text())["steps"] == 6
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["steps"] == 3 and manifest["encoder_config"]["model_name_or_path"] == str(first)
    # the first round's model, not the base model, is where the second round started: its trained weights differ
    assert record["model_fingerprint"] != done["dense_train"]["model_fingerprint"]

    mined = read_records(out / "first_round" / "self_mined_records.jsonl")
    assert len(mined) == record["records"]
    grew = sum(len(r.negatives) > 3 for r in mined)  # the BM25 negatives (3) kept, mined ones added
    assert grew > len(mined) // 2
    assert all(not set(r.negatives) & set(r.positives) for r in mined)
    # the mining scratch (corpus encoding, index) is gone; the records stay
    assert not (out / "first_round" / "embeddings").exists() and not (out / "first_round" / "faiss").exists()

    # a killed second round resumes on the same mined records, without training the first round again
    kept = {p: p.stat().st_mtime_ns for p in (first / "manifest.json", out / "first_round" / "self_mined_records.jsonl")}
    weights = (final / "model.safetensors").read_bytes()
    shutil.rmtree(final)
    (out / "stage.json").unlink()
    Pipeline(config, root).run(["dense_train"])
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (final / "model.safetensors").read_bytes() == weights  # the same data, the same start: the same model


def test_without_a_second_round_its_settings_leave_the_dense_fingerprint_alone(built):
    import dataclasses

    from hybrid.config import SelfMinedRoundConfig

    pipeline, _, _ = built

    def fingerprint(refine: SelfMinedRoundConfig) -> str:
        dense = dataclasses.replace(pipeline.config.dense, refine=refine)
        return Pipeline(dataclasses.replace(pipeline.config, dense=dense), pipeline.root).inputs_fingerprint(
            "dense_train")

    off = fingerprint(SelfMinedRoundConfig())
    assert off == pipeline.inputs_fingerprint("dense_train")
    assert fingerprint(SelfMinedRoundConfig(depth=99)) == off  # steps = 0: no second round, nothing changes
    assert fingerprint(SelfMinedRoundConfig(steps=5)) != off


def test_dense_training_distils_from_teacher_scores_made_from_the_artifacts(built, tmp_path):
    import dataclasses
    import json
    import shutil

    from hybrid.config import ConfigError
    from hybrid.teacher_scores import manifest_path, score_teacher_file

    pipeline, done, slice_dir = built
    root = tmp_path / "artifacts"
    shutil.copytree(pipeline.root, root)
    heldout = pipeline.real_train_split()[3]
    teacher = tmp_path / "teacher.jsonl"
    # the rerank stage's scorer (the tiny LM here) over the slice's BM25 top 4 of 12 train queries
    assert score_teacher_file(root, slice_dir, heldout, teacher, 12, depth=4, progress=False) == 12
    groups = [json.loads(line) for line in teacher.read_text().splitlines()]
    assert not {g["qid"] for g in groups} & set(heldout) and all(len(g["pids"]) == 4 for g in groups)
    assert json.loads(manifest_path(teacher).read_text())["identity"]["excluded_heldout"] == len(heldout)

    def config_with(**dense_changes):
        train = {**pipeline.config.dense.train, "distill_batch_size": 4, "distill_passages": 3}
        dense = dataclasses.replace(pipeline.config.dense, train=train, **dense_changes)
        return dataclasses.replace(pipeline.config, dense=dense)

    with pytest.raises(ConfigError, match="teacher_scores"):
        Pipeline(config_with(), root).run(["dense_train"])
    record = Pipeline(config_with(teacher_scores=str(teacher), teacher_groups=8), root).run(["dense_train"])
    assert record["dense_train"]["teacher_groups"] == 8
    manifest = json.loads((root / "dense_model" / "model" / "manifest.json").read_text())
    assert manifest["data"]["teacher_groups"] == 8 and manifest["train_config"]["distill_batch_size"] == 4
    assert record["dense_train"]["model_fingerprint"] != done["dense_train"]["model_fingerprint"]
    # a teacher file that does not match its configured checksum is refused
    with pytest.raises(ValueError, match="sha256"):
        Pipeline(config_with(teacher_scores=str(teacher), teacher_scores_sha256="0" * 64), root).run(["dense_train"])


def test_without_distillation_the_teacher_settings_leave_the_dense_fingerprint_alone(built):
    import dataclasses

    pipeline, _, _ = built
    dense = dataclasses.replace(pipeline.config.dense, teacher_groups=5, teacher_scores_sha256="ab")
    same = Pipeline(dataclasses.replace(pipeline.config, dense=dense), pipeline.root)
    assert same.inputs_fingerprint("dense_train") == pipeline.inputs_fingerprint("dense_train")


def test_few_shot_rerank_stage_draws_train_demonstrations_the_retriever_uses(built, tmp_path):
    import dataclasses
    import json
    import shutil

    from hybrid import Retriever
    from hybrid.artifacts import ArtifactError
    from hybrid.searchers import RerankSettings

    pipeline, done, _ = built
    root = tmp_path / "artifacts"
    shutil.copytree(pipeline.root, root)
    rerank = dataclasses.replace(pipeline.config.rerank, few_shot=2, few_shot_seed=1)
    few = Pipeline(dataclasses.replace(pipeline.config, rerank=rerank), root)
    few.run(["rerank"])
    queries, qrels, dense_qids, heldout = pipeline.real_train_split()
    examples = json.loads((root / "rerank" / "settings.json").read_text())["examples"]
    # real train queries the dense model trains on, never the held-out selection queries, each with a positive
    assert len(examples) == 2 and all(e["qid"] in dense_qids and e["qid"] not in heldout for e in examples)
    assert all(qrels[e["qid"]][e["pid"]] > 0 and e["query"] == queries[e["qid"]] for e in examples)
    assert examples == [dataclasses.asdict(e) for e in few.ql_examples(2, 1)]  # the draw is reproducible
    settings = RerankSettings.read(root)
    assert settings.examples == tuple((e["passage"], e["query"]) for e in examples)
    retriever = Retriever(mode="rerank", artifacts_dir=root)
    try:
        assert retriever.searcher.scorer.config.examples == settings.examples
        assert len(retriever.search("what is a marathon", k=5)) == 5
    finally:
        retriever.close()
    # settings whose examples do not match their few_shot count are refused
    path = root / "rerank" / "settings.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "examples": examples[:1]}))
    with pytest.raises(ArtifactError, match="few-shot examples"):
        RerankSettings.read(root)


def test_a_killed_evaluation_resumes_and_a_forced_one_starts_over(built, tmp_path, monkeypatch):
    """The evaluate stage reuses the metrics a killed run of the same inputs finished (hours of searching on the
    A10G recipe), but a deliberate rerun of a finished evaluation (--force) searches again."""
    import shutil

    import hybrid.report
    from hybrid.artifacts import STAGE_FILE

    pipeline, _, _ = built
    root = tmp_path / "artifacts"
    shutil.copytree(pipeline.root, root)
    searched = []

    def no_search(searcher, queries, qrels, *, name, **kwargs):
        searched.append(name)
        raise RuntimeError(f"{name} was searched again")

    monkeypatch.setattr(hybrid.report, "evaluate_searcher", no_search)
    (root / "eval" / STAGE_FILE).unlink()  # killed after every mode's metrics were written, before the stage record
    again = Pipeline(pipeline.config, root)
    assert not again.up_to_date("evaluate")
    assert set(again.run(["evaluate"])["evaluate"]["tables"]) == {"dev", "dl19"} and searched == []
    with pytest.raises(RuntimeError, match="searched again"):
        Pipeline(pipeline.config, root).run(["evaluate"], force=["evaluate"])
    assert len(searched) == 1


def test_a_resumed_dense_training_reuses_its_mined_negatives(built, tmp_path, monkeypatch):
    """BM25 negatives are mined once per inputs and kept in the stage directory: rerunning a training killed before
    it finished reads them back instead of mining again (~600k queries x 200 hits on the A10G recipe); other inputs
    mine afresh. (That the training itself resumes from its checkpoint is tests/test_training.py's.)"""
    import dataclasses
    import shutil

    from dense.training_data import read_records
    from hybrid.artifacts import STAGE_FILE, stage_dir
    from hybrid.pipeline import MINED_RECORDS

    pipeline, _, _ = built
    root = tmp_path / "artifacts"
    shutil.copytree(pipeline.root, root)
    out = stage_dir(root, "dense_train")
    kept = read_records(out / MINED_RECORDS)
    assert kept and all(r.negatives for r in kept)
    (out / STAGE_FILE).unlink()  # killed before the stage finished
    mined = []
    monkeypatch.setattr(Pipeline, "_mine", lambda self, records, search, **kw: mined.append(1) or records)
    again = Pipeline(pipeline.config, root)
    assert again.run(["dense_train"])["dense_train"]["records"] == len(kept) and mined == []
    dense = dataclasses.replace(pipeline.config.dense, hard_negatives=2)
    Pipeline(dataclasses.replace(pipeline.config, dense=dense), root).run(["dense_train"])
    assert mined == [1]


def test_cached_gpu_memory_is_released_only_where_cuda_is(monkeypatch):
    """After each stage the pipeline empties PyTorch's CUDA cache (faiss-gpu allocates outside it); on a CPU box, or
    before torch is imported, it does nothing. The real release is checked on a GPU in tests/test_gpu.py."""
    import sys
    import types

    from hybrid.pipeline import release_gpu_cache

    emptied = []
    for available in (False, True):
        cuda = types.SimpleNamespace(is_available=lambda a=available: a, empty_cache=lambda: emptied.append(1))
        monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
        release_gpu_cache()
    assert emptied == [1]
    monkeypatch.delitem(sys.modules, "torch")
    release_gpu_cache()  # torch not imported: nothing to release, and nothing imported for it
    assert "torch" not in sys.modules
