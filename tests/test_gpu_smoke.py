"""The GPU smoke test (scripts/gpu_smoke.sh, hybrid/gpu_smoke.py) on CPU: it refuses to start, its extrapolation
arithmetic holds, and every phase runs at toy size (on the CPU, with a CPU index) so the day a GPU is lent it does
not die on a typo."""

from __future__ import annotations

import os
from dataclasses import replace
import subprocess
from pathlib import Path

import pytest
import torch

from hybrid.full_scale import FullScale, Measured, duration, extrapolate, flat_search_ms, render_table
from hybrid.gpu_smoke import (
    GpuUnavailableError,
    SmokeSettings,
    base_model,
    cli,
    full_train_steps,
    plan_train_steps,
    require_gpu,
    run_smoke,
    step_rate,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "a10g-full.toml"


def test_the_script_refuses_to_start_without_a_gpu() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this holds on a GPU box too
    done = subprocess.run([str(REPO / "scripts" / "gpu_smoke.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu_smoke: error: no CUDA GPU is visible")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: nothing to refuse")
def test_refusal_comes_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(GpuUnavailableError, match="make gpu-smoke FAISS=gpu"):
        require_gpu()
    assert cli(["--data-dir", str(tmp_path / "not-even-there"), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
    assert "no CUDA GPU" in capsys.readouterr().err


def test_extrapolation_arithmetic() -> None:
    measured = Measured(device="GPU", pool_passages=43_000, train_steps_per_s=0.5, encode_passages_per_s=2_000.0,
                        index_vectors_per_s=1e6, query_encode_ms=4.0, search_ms=5.0, rerank_ms=15.0, rerank_depth=5,
                        generate_passages_per_s=25.0, generation_model="SmolLM2-1.7B",
                        skipped=(("anchor", "not asked for"),))
    full = FullScale(train_steps=12_000, dim=768, passages=8_841_823, eval_queries=6_980, synthetic_passages=100_000)
    rows = {row.what: row for row in extrapolate(measured, full)}
    assert rows["dense training"].full_scale == "6.7 h for 12,000 steps"  # 12000 / 0.5 = 24000 s
    assert rows["corpus encoding"].full_scale == "73.7 min for 8,841,823 passages"  # 8841823 / 2000 = 4421 s
    assert rows["flat index build + save"].full_scale == "9 s; 13.6 GB of float16 on the GPU"  # 8841823 * 768 * 2 B
    # the scan (1 ms of the 5) grows with the corpus, the 4 ms of query encoding does not
    assert flat_search_ms(measured, full.passages) == pytest.approx(4.0 + 1.0 * 8_841_823 / 43_000)
    assert rows["dense search, k=1000 (flat)"].full_scale == "210 ms/query at 8,841,823"
    assert rows["rerank, depth 5"].full_scale == "15.0 ms/query; 105 s for 6,980 dev queries"  # 6980 * 15 ms
    assert rows["LLM query generation (SmolLM2-1.7B)"].full_scale == "66.7 min for 100,000 passages"  # 100000 / 25
    assert rows["anchor"].measured == "not measured: not asked for"
    table = render_table(list(rows.values()), "GPU", 43_000)
    assert table.splitlines()[0].startswith("| phase | measured (GPU, 43,000 passages)") and table.count("\n") == 8


def test_durations_and_step_planning() -> None:
    assert [duration(s) for s in (42, 750, 24_000)] == ["42 s", "12.5 min", "6.7 h"]
    assert plan_train_steps(10, 30.0, 180.0, 300) == 50  # 150 s left at 3 s/step
    assert plan_train_steps(10, 1.0, 180.0, 300) == 300  # capped
    assert plan_train_steps(10, 200.0, 180.0, 300) == 20  # over budget already: still twice the probe
    assert step_rate((10, 30.0), (50, 110.0)) == pytest.approx(0.5)  # the 10 s of loading cancel out
    assert step_rate((10, 30.0), (50, 25.0)) == pytest.approx(50 / 25.0)  # noise: the long run's own rate
    with pytest.raises(ValueError, match="more steps"):
        step_rate((10, 30.0), (10, 40.0))


def test_full_steps_come_from_the_config() -> None:
    from hybrid.config import load_config

    assert full_train_steps(load_config(CONFIG)) == load_config(CONFIG).dense.train["max_steps"]
    with pytest.raises(ValueError, match="max_steps"):
        full_train_steps(load_config(CONFIG, ["dense.train={}"]))


def test_a_stand_in_bert_when_the_base_model_is_unreachable(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, BertConfig

    small = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=128)
    texts = ["the climate of paris is mild", "tigers run fast in the forest"] * 20
    model, note = base_model(str(tmp_path / "no-such-bert-base"), texts, tmp_path, small)
    assert "stand-in" in note and AutoConfig.from_pretrained(model).model_type == "bert"
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer("Paris")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and tokenizer.unk_token_id not in ids
    with pytest.raises(OSError):
        base_model(str(tmp_path / "no-such-llama"), texts, tmp_path, small)  # only BERT has a stand-in


def test_every_phase_runs_at_toy_size_on_cpu(tmp_path: Path) -> None:
    from dense_fixtures import toy_corpus
    from recipe_models import tiny_bert, tiny_chat_lm
    from retriever_fixture import write_tiny_corpus

    from hybrid.config import load_config

    data = write_tiny_corpus(tmp_path / "pool")
    bert = tiny_bert(toy_corpus(), tmp_path / "bert")
    lm = tiny_chat_lm(toy_corpus(), tmp_path / "lm")
    config = load_config(CONFIG, [f'dense.base_model="{bert}"', f'rerank.cross_encoder.base_model="{bert}"',
                                  f'synthetic.llm_model="{lm}"', "synthetic.llm_batch_size=4",
                                  "synthetic.llm_num_prefixes=2", "synthetic.llm_max_new_tokens=4",
                                  "dense.train.batch_size=8",
                                  "dense.train.grad_cache_chunk=16", "dense.train.bf16=false",
                                  "dense.encode_shard_size=100"])
    settings = SmokeSettings(device="cpu", probe_steps=2, max_train_steps=4, train_budget_s=60, search_queries=4,
                             rerank_queries=3, warmup=1, gpu_index=False, generation_warmup=2)
    out = tmp_path / "out"
    measured, dim, note = run_smoke(config, data, out, settings)
    assert note == "" and dim == 32 and measured.skipped == () and measured.rerank_depth == config.rerank.depth
    assert measured.pool_passages == sum(1 for _ in open(data / "collection.tsv"))
    rates = [measured.train_steps_per_s, measured.encode_passages_per_s, measured.index_vectors_per_s,
             measured.query_encode_ms, measured.search_ms, measured.rerank_ms, measured.generate_passages_per_s]
    assert all(rate is not None and rate > 0 for rate in rates)
    # one full batch (4) per prompt prefix (2) timed, after the 2 warm-up passages: 10 generated in all
    assert sum(1 for _ in open(out / "generation.jsonl")) == 10 and measured.generation_model == str(lm)
    full = FullScale(full_train_steps(config), dim, synthetic_passages=config.synthetic.max_passages)
    assert len(extrapolate(measured, full)) == 6
    off, _, _ = run_smoke(config, data, tmp_path / "off", replace(settings, generation_batches=0))
    assert off.generate_passages_per_s is None and dict(off.skipped) == {
        "LLM query generation": "switched off (--generation-batches 0)"}
