"""Distributed training and encoding under ``torchrun`` with two CPU processes (gloo) equal one process.

Two launches of tests/distributed_worker.py serve every test here (a launch costs seconds of imports): the first
trains and encodes and ends with a run killed after a checkpoint, the second resumes it. The references are
single-process runs in this process with the same global batch. Dropout is off where one process is compared with
two, because each rank draws its own dropout masks; the resumed run keeps dropout on and is compared with an
uninterrupted two-process run, which checks that every rank's RNG state is restored.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dense.config import TrainConfig
from dense.corpus_encoding import EncodedCorpus, encode_corpus
from dense.distributed import SINGLE, DistContext, env_context, gather_with_grad
from dense.encoder import build_encoder, load_encoder
from dense.training import train
from dense_fixtures import (
    make_tiny_bert_dir,
    make_tiny_encoder_dir,
    tiny_encoder_config,
    toy_records_and_passages,
    toy_teacher_groups,
)
from distributed_worker import DISTILL

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TRAIN_CONFIG = {"lr": 3e-3, "batch_size": 8, "hard_negatives": 2, "max_steps": 6, "warmup_ratio": 0.1,
                "checkpoint_every": 100, "log_every": 1, "seed": 3}
SHARD_SIZE, ENCODE_BATCH = 7, 4
KILL_BEFORE_STEP = 5  # checkpoint at step 3, step 4 done and lost, killed fetching step 5
LAUNCH_TIMEOUT_S = 300


def corpus() -> list[tuple[str, str]]:
    rng = np.random.default_rng(1)
    words = ["paris", "tiger", "coffee", "price", "history", "the", "of", "and", "river", "music", "old"]
    return [(str(500 + 7 * i), " ".join(rng.choice(words, size=int(rng.integers(2, 20))))) for i in range(40)]


class KilledEncoder:
    """Delegates to ``encoder`` and raises on call ``fail_on_call`` (two calls per shard here: 7 texts, batch 4)."""

    def __init__(self, encoder, fail_on_call: int) -> None:
        self.encoder, self.fail_on_call, self.calls = encoder, fail_on_call, 0

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def encode_passages(self, texts, batch_size=64):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        return self.encoder.encode_passages(texts, batch_size=batch_size)


def encode(encoder, out: Path) -> EncodedCorpus:
    return encode_corpus(encoder, corpus(), out, batch_size=ENCODE_BATCH, shard_size=SHARD_SIZE, fp16=False,
                         model_fingerprint="tiny", progress=False)


def launch(spec: dict, path: Path) -> None:
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(WORKER.parent), env.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )
    assert done.returncode == 0, f"torchrun {spec['phase']} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    paths = {
        "backbone": make_tiny_bert_dir(root / "plain", dropout=0.0),
        "backbone_dropout": make_tiny_bert_dir(root / "dropout"),
        "encoder_dir": make_tiny_encoder_dir(root / "encoder"),
        "out": root / "out",
    }
    paths["out"].mkdir()
    # a single process encodes 2 of the 6 shards and is killed; the second launch finishes it on two processes
    with pytest.raises(RuntimeError, match="killed"):
        encode(KilledEncoder(load_encoder(paths["encoder_dir"], device="cpu"), fail_on_call=5),
               paths["out"] / "encoded-resumed")
    spec = {**{k: str(v) for k, v in paths.items()}, "train_config": TRAIN_CONFIG, "corpus": corpus(),
            "shard_size": SHARD_SIZE, "encode_batch_size": ENCODE_BATCH, "kill_before_step": KILL_BEFORE_STEP}
    launch({**spec, "phase": "first"}, root / "first.json")
    launch({**spec, "phase": "resume"}, root / "resume.json")
    return paths


def manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


def assert_same_model(a: Path, b: Path, atol: float) -> None:
    curve_a, curve_b = manifest(a)["loss_curve"], manifest(b)["loss_curve"]
    assert [p["step"] for p in curve_a] == [p["step"] for p in curve_b] == list(range(1, 7))
    np.testing.assert_allclose([p["loss"] for p in curve_a], [p["loss"] for p in curve_b], rtol=0, atol=atol)
    first, second = load_encoder(a), load_encoder(b)
    for (name, x), (_, y) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("name, changes", [("full", {}), ("gradcache", {"grad_cache_chunk": 5}), ("distill", DISTILL)])
def test_two_processes_train_what_one_process_trains(runs: dict[str, Path], tmp_path: Path, name: str,
                                                      changes: dict) -> None:
    records, passages = toy_records_and_passages()
    config = TrainConfig.from_dict({**TRAIN_CONFIG, **changes})
    teacher = toy_teacher_groups(shift=1) if config.distill_batch_size else ()
    single = train(tiny_encoder_config(runs["backbone"]), config, records, passages, tmp_path / name, device="cpu",
                   teacher_groups=teacher)
    distributed = runs["out"] / name / "model"
    assert manifest(distributed)["world_size"] == 2 and manifest(single)["world_size"] == 1
    assert_same_model(single, distributed, atol=1e-5)
    losses = [p["loss"] for p in manifest(distributed)["loss_curve"]]
    assert losses[-1] < losses[0]  # it learned: the comparison is not between two untouched models
    untrained = build_encoder(tiny_encoder_config(runs["backbone"]), device="cpu")
    trained = load_encoder(distributed)
    pairs = zip(untrained.parameters(), trained.parameters(), strict=True)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in pairs)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_exactly(runs: dict[str, Path]) -> None:
    out = runs["out"]
    for rank in (0, 1):  # both ranks stopped at the same step, with the step-3 checkpoint on disk
        assert json.loads((out / f"killed.rank{rank}.json").read_text()) == {"checkpoints": [3]}
    assert_same_model(out / "dropout-straight" / "model", out / "killed" / "model", atol=1e-6)


@pytest.mark.slow
def test_checkpoints_and_models_are_written_by_rank_zero_only(runs: dict[str, Path]) -> None:
    writes = {(phase, rank): json.loads((runs["out"] / f"writes.{phase}.rank{rank}.json").read_text())
              for phase in ("first", "resume") for rank in (0, 1)}
    # first launch: 4 finished models (full, gradcache, distill, dropout-straight); the two dropout runs checkpoint
    # at step 3 (the killed one dies before 6)
    assert writes["first", 0] == {"checkpoints": 2, "models": 4, "other": 2}
    assert writes["resume", 0] == {"checkpoints": 0, "models": 1, "other": 0}  # resumed after the last checkpoint
    assert writes["first", 1] == writes["resume", 1] == {"checkpoints": 0, "models": 0, "other": 0}


@pytest.mark.slow
def test_two_processes_encode_what_one_process_encodes(runs: dict[str, Path], tmp_path: Path) -> None:
    single = encode(load_encoder(runs["encoder_dir"], device="cpu"), tmp_path / "single")
    for name, resumed in (("encoded", 0), ("encoded-resumed", 2)):
        distributed = EncodedCorpus.open(runs["out"] / name)
        assert distributed.pids == single.pids == [pid for pid, _ in corpus()]
        np.testing.assert_array_equal(distributed.embeddings, single.embeddings)
        assert distributed.manifest["processes"] == 2 and distributed.manifest["shards_resumed"] == resumed
        assert distributed.manifest["passages_encoded_this_run"] == len(corpus()) - resumed * SHARD_SIZE
        assert not (runs["out"] / name / "shards").exists()
    assert np.abs(single.embeddings).sum() > 0


def test_launch_environment_and_single_process_defaults() -> None:
    assert env_context({}) == SINGLE and not SINGLE.enabled and SINGLE.is_main
    assert env_context({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == DistContext(2, 4, 0)
    with pytest.raises(RuntimeError, match="inconsistent launch environment"):
        env_context({"WORLD_SIZE": "2", "RANK": "2"})
    x = torch.ones(3, requires_grad=True)
    assert gather_with_grad(x, SINGLE) is x
    assert DistContext(1, 2, 1).resolve_device("cpu") == torch.device("cpu")


@pytest.mark.slow
def test_the_pipeline_runs_its_dense_stages_on_two_processes(tiny_artifacts, tmp_path: Path) -> None:
    from hybrid.artifacts import stage_dir
    from hybrid.retriever import Retriever

    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, root)
    shutil.rmtree(root / "dense_model" / "checkpoints")  # train from the start, not from the one-process checkpoint
    stages = ["dense_train", "dense_index", "fusion"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "scripts" / "run_pipeline.py"), "--config", str(tiny_artifacts.config_path),
               *(f"--set={o}" for o in tiny_artifacts.overrides), "--artifacts", str(root),
               "--stages", *stages, "--force", *stages]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    started = time.time_ns()
    done = subprocess.run(command, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert manifest(root / "dense_model" / "model")["world_size"] == 2
    assert json.loads((root / "dense_index" / "embeddings" / "manifest.json").read_text())["processes"] == 2
    for stage in stages:  # written anew by this launch (copytree kept the old files' times)
        assert (stage_dir(root, stage) / "stage.json").stat().st_mtime_ns > started
    retriever = Retriever(mode="hybrid", artifacts_dir=root)
    assert len(retriever.search(next(iter(tiny_artifacts.dev_queries.values())), 5)) == 5
    retriever.close()


def test_a_torchrun_launch_refuses_to_wait_for_stages_before_the_dense_ones(tiny_artifacts) -> None:
    from hybrid.artifacts import ArtifactError
    from hybrid.config import load_config
    from hybrid.pipeline import Pipeline

    pipeline = Pipeline(load_config(tiny_artifacts.config_path, list(tiny_artifacts.overrides)), tiny_artifacts.root)
    pipeline._context = DistContext(rank=1, world_size=2)
    stages = ["bm25", "dense_train", "dense_index", "fusion", "evaluate"]
    assert pipeline._distributed_plan(stages, force=()) == stages[:3]  # bm25 is up to date; rank 1 stops after encoding
    with pytest.raises(ArtifactError, match=r"--stages bm25\)"):
        pipeline._distributed_plan(stages, force=["bm25"])
    with pytest.raises(ArtifactError, match="none of"):
        pipeline._distributed_plan(["fusion"], force=())
    pipeline._context = DistContext(rank=0, world_size=2)
    assert pipeline._distributed_plan(stages, force=()) == stages
