"""End to end: the pipeline on a small slice of the real 43k pool with a tiny dense model, then ``Retriever``."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
import torch
from dense_fixtures import train_bpe_tokenizer, train_wordpiece_tokenizer
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from write_audit import record_writes

from hybrid.artifacts import ArtifactError, read_stage, write_json_atomic
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


def _tiny_bert(texts: list[str], out: Path) -> Path:
    tokenizer = train_wordpiece_tokenizer(texts)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _tiny_causal_lm(texts: list[str], out: Path) -> Path:
    """A random 1-layer Llama LM standing in for SmolLM2 in the rerank stage (plain prompt: no chat template)."""
    tokenizer = train_bpe_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
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
    model = _tiny_bert(texts[:2000], root / "tiny-bert")
    lm = _tiny_causal_lm(texts[:2000], root / "tiny-lm")
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "cpu-marco43k.toml",
        [
            f'data.dir="{slice_dir}"',
            "sparse.heap=\"1g\"",
            "synthetic.max_passages=200",
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
    assert list(done) == ["data", "bm25", "synthetic", "dense_train", "dense_index", "fusion", "rerank", "evaluate"]
    for stage, record in done.items():
        assert record["inputs_fingerprint"] == pipeline.inputs_fingerprint(stage)
    assert done["fusion"]["train_queries"] == 40
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


@pytest.mark.parametrize("mode", [None, "rerank"])
def test_search_is_thread_safe(built, mode):
    from hybrid import Retriever

    pipeline, _, slice_dir = built
    retriever = Retriever(mode=mode, artifacts_dir=pipeline.root)
    queries = list(MsMarcoDir(slice_dir).queries("dev").values())[:16]
    sequential = [retriever.search(q, 10) for q in queries]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = retriever.search(queries[i], 10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(queries))]
    for t in threads[:8]:
        t.start()
    for t in threads[:8]:
        t.join()
    for t in threads[8:]:
        t.start()
    for t in threads[8:]:
        t.join()
    assert [results[i] for i in range(len(queries))] == sequential


@pytest.mark.parametrize(
    "query", ["x" * 100_000, "\x00\x07 control chars", "emoji 😀☕ coffee", 'a AND "b" : * ( c', "   padded   "]
)
def test_odd_queries_are_searched_as_plain_text(built, query):
    from hybrid import Retriever

    retriever = Retriever(artifacts_dir=built[0].root)
    assert isinstance(retriever.search(query, 3), list)


def test_bad_input_errors(built):
    from hybrid import Retriever

    retriever = Retriever(mode="sparse", artifacts_dir=built[0].root)
    with pytest.raises(TypeError):
        retriever.search(b"bytes", 3)
    with pytest.raises(TypeError):
        retriever.search(None, 3)
    for bad in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty"):
            retriever.search(bad, 3)
    with pytest.raises(ValueError, match="k must be"):
        retriever.search("dog", 0)
    with pytest.raises(ValueError, match="unknown mode"):
        Retriever(mode="magic", artifacts_dir=built[0].root)


def test_missing_or_mismatched_artifacts_name_the_stage(built, tmp_path):
    from hybrid import Retriever

    with pytest.raises(ArtifactError, match="pipeline"):
        Retriever(artifacts_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="'data'"):
        Retriever(artifacts_dir=tmp_path / "empty")
    # a dense index built from another model is refused
    pipeline = built[0]
    stage = pipeline.root / "dense_index" / "stage.json"
    original = read_stage(pipeline.root, "dense_index")
    try:
        write_json_atomic(stage, {**original, "model_fingerprint": "another-model"})
        with pytest.raises(ArtifactError, match="dense_index"):
            Retriever(mode="dense", artifacts_dir=pipeline.root)
    finally:
        write_json_atomic(stage, original)


def test_rerank_reorders_only_the_fused_top(built):
    from hybrid import Retriever

    pipeline, _, slice_dir = built
    hybrid, reranked = (Retriever(mode=m, artifacts_dir=pipeline.root) for m in ("hybrid", "rerank"))
    assert Retriever(artifacts_dir=pipeline.root).mode == "rerank"  # rerank.default = true in the CPU config
    scorer, depth, weight = reranked._reranker  # built from the stage's settings.json
    assert (scorer.config.max_passage_tokens, scorer.config.system_prompt, depth, weight) == (24, None, 3, None)
    for query in list(MsMarcoDir(slice_dir).queries("dev").values())[:5]:
        a = [r.document_id for r in hybrid.search(query, 10)]
        b = [r.document_id for r in reranked.search(query, 10)]
        assert sorted(a[:3]) == sorted(b[:3]) and a[3:] == b[3:]


def test_rerank_default_and_disabled_settings(built, tmp_path):
    import json
    import shutil

    from hybrid import Retriever

    root = tmp_path / "artifacts"
    shutil.copytree(built[0].root, root, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    settings_path = root / "rerank" / "settings.json"
    settings = json.loads(settings_path.read_text())
    settings_path.write_text(json.dumps({**settings, "default": False}))
    assert Retriever(artifacts_dir=root).mode == "hybrid"
    settings_path.write_text(json.dumps({**settings, "default": True}))
    assert Retriever(artifacts_dir=root).mode == "rerank"
    settings_path.write_text(json.dumps({"enabled": False}))
    assert Retriever(artifacts_dir=root).mode == "hybrid"
    with pytest.raises(ArtifactError, match="rerank"):
        Retriever(mode="rerank", artifacts_dir=root)


def test_latency_benchmark_reports_every_mode_and_the_bm25_ratio(built):
    from hybrid.benchmark import benchmark

    pipeline, _, slice_dir = built
    queries = list(MsMarcoDir(slice_dir).queries("dev").values())[:6]
    table, raw = benchmark(pipeline.root, queries, k=10, modes=["hybrid", "dense"], warmup=2)
    assert "bm25-only (k=100)" in table and "hybrid (k=10)" in table and "dense (k=10)" in table
    assert raw["hybrid"]["n"] == 4
    assert {"hybrid", "dense"} == set(raw["breakdown_ms"])
    assert any(name.startswith("fusion") for name in raw["breakdown_ms"]["hybrid"])


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
