"""Distillation from teacher scores: the group format, the KL term, batches with teacher groups (deterministic,
GradCache equal to the full batch), a distilling run that moves the encoder toward the teacher and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dense.config import ConfigError, TrainConfig
from dense.encoder import build_encoder, load_encoder
from dense.teacher_data import TeacherFormatError, TeacherGroup, read_teacher_groups
from dense.training import (
    TrainingBatches,
    TrainingStateError,
    full_batch_loss,
    grad_cache_loss,
    group_scores,
    list_checkpoints,
    train,
)
from dense_fixtures import make_tiny_bert_dir, tiny_encoder_config, toy_records_and_passages, toy_teacher_groups

RECORDS, PASSAGES = toy_records_and_passages()


def _groups(n: int = 6, size: int = 5, shift: int = 0) -> list[TeacherGroup]:
    return toy_teacher_groups(n, size, shift)


def _train_config(**changes: object) -> TrainConfig:
    base = {"lr": 3e-3, "batch_size": 4, "hard_negatives": 1, "max_steps": 6, "warmup_ratio": 0.1,
            "checkpoint_every": 100, "log_every": 2, "seed": 3, "distill_batch_size": 2, "distill_passages": 4}
    return TrainConfig.from_dict({**base, **changes})


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert_dir(tmp_path_factory.mktemp("backbone"))


def test_group_format_round_trips_and_rejects_bad_lines(tmp_path: Path) -> None:
    group = _groups(1)[0]
    assert TeacherGroup.from_json(json.loads(json.dumps(group.to_json()))) == group
    assert group.log_likelihoods()[0] == pytest.approx(-4.0)  # mean per token x 4 query tokens
    path = tmp_path / "teacher.jsonl"
    path.write_text(json.dumps(group.to_json()) + "\n" + json.dumps({**group.to_json(), "scores": [1.0]}) + "\n")
    with pytest.raises(TeacherFormatError, match=f"{path}:2: .*5 pids but 1 scores"):
        read_teacher_groups(path)
    assert read_teacher_groups(path, limit=1) == [group]
    for bad, message in (({"pids": ["a", "a"], "scores": [1.0, 2.0]}, "twice"),
                         ({"pids": ["a"], "scores": [1.0]}, "at least 2"),
                         ({"query_tokens": 0}, "query_tokens"),
                         ({"scores": [float("nan")] * 5}, "finite")):
        with pytest.raises(TeacherFormatError, match=message):
            TeacherGroup.from_json({**group.to_json(), **bad})
    with pytest.raises(FileNotFoundError, match="score_teacher"):
        read_teacher_groups(tmp_path / "missing.jsonl")


def test_distillation_loss_is_zero_at_the_teacher_and_its_gradient_points_there(bert: Path) -> None:
    encoder = build_encoder(tiny_encoder_config(bert), device="cpu")
    teacher = torch.tensor([[-1.0, -2.0, -4.0], [0.0, 0.0, 0.0]])
    at_teacher = teacher * encoder.temperature  # the encoder's softmax(scores / T) is then the teacher's
    assert float(encoder.distillation_loss(at_teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    scores = torch.zeros(2, 3, requires_grad=True)
    loss = encoder.distillation_loss(scores, teacher)
    assert float(loss.detach()) > 0
    loss.backward()
    # descending the gradient raises the score of the teacher's best passage and lowers its worst one
    assert scores.grad[0, 0] < 0 < scores.grad[0, 2] and torch.allclose(scores.grad[1], torch.zeros(3), atol=1e-5)


def test_group_scores_take_each_query_against_its_own_group(bert: Path) -> None:
    encoder = build_encoder(tiny_encoder_config(bert), device="cpu")
    q, p = torch.randn(3, 8), torch.randn(6, 8)
    expected = torch.stack([q[i] @ p[2 * i : 2 * i + 2].T for i in range(3)])
    torch.testing.assert_close(group_scores(encoder, q, p), expected)


def test_batches_carry_teacher_groups_deterministically(bert: Path) -> None:
    encoder = build_encoder(tiny_encoder_config(bert), device="cpu")
    groups = _groups()
    batches = TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, _train_config(), teacher_groups=groups)
    batch = batches[1]
    assert batch["teacher"].shape == (2, 4)
    assert batch["distill_queries"][0]["input_ids"].shape[0] == 2
    assert batch["distill_passages"][0]["input_ids"].shape[0] == 8
    again = TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, _train_config(), teacher_groups=groups)[1]
    assert torch.equal(again["teacher"], batch["teacher"])
    assert torch.equal(again["distill_passages"][0]["input_ids"], batch["distill_passages"][0]["input_ids"])
    # the teacher values are the groups' log-likelihoods (score x query tokens), of the passages sampled
    allowed = {round(v, 4) for g in groups for v in g.log_likelihoods()}
    assert {round(float(v), 4) for v in batch["teacher"].flatten()} <= allowed
    # 6 groups, 2 per step: step 3 starts a new epoch of the groups, in another order
    epochs = [batches[s]["teacher"] for s in range(6)]
    assert not all(torch.equal(a, b) for a, b in zip(epochs[:3], epochs[3:], strict=True))


def test_distillation_settings_are_checked(bert: Path) -> None:
    encoder = build_encoder(tiny_encoder_config(bert), device="cpu")
    with pytest.raises(ValueError, match="at least that many teacher groups"):
        TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, _train_config(), teacher_groups=_groups(1))
    with pytest.raises(ValueError, match="fewer than distill_passages"):
        TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, _train_config(distill_passages=6),
                        teacher_groups=_groups())
    with pytest.raises(ValueError, match="split evenly"):
        TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, _train_config(distill_batch_size=3, batch_size=4),
                        world_size=2, teacher_groups=_groups())
    with pytest.raises(ConfigError, match="distill_passages"):
        _train_config(distill_passages=1)


def test_grad_cache_gives_the_full_batch_gradients_with_distillation(bert: Path) -> None:
    encoder = build_encoder(tiny_encoder_config(bert), device="cpu")
    encoder.eval()
    grads = []
    for chunk, step in ((None, full_batch_loss), (3, grad_cache_loss)):
        config = _train_config(grad_cache_chunk=chunk)
        batch = TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, config, teacher_groups=_groups())[0]
        encoder.zero_grad()
        loss = step(encoder, batch, False, config=config)
        grads.append((loss, [p.grad.clone() for p in encoder.parameters() if p.grad is not None]))
    (full_loss, full), (cached_loss, cached) = grads
    assert full_loss == pytest.approx(cached_loss, abs=1e-6) and len(full) == len(cached) > 0
    for a, b in zip(full, cached, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the distillation term is part of the loss: without the teacher groups it is smaller
    config = _train_config()
    batch = TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, config, teacher_groups=_groups())[0]
    plain = {k: v for k, v in batch.items() if not k.startswith("distill") and k != "teacher"}
    encoder.zero_grad()
    assert full_batch_loss(encoder, plain, False) < full_loss


def _teacher_agreement(encoder, groups: list[TeacherGroup]) -> float:
    """Mean probability the encoder's softmax over each group gives the teacher's best passage."""
    encoder.eval()
    with torch.no_grad():
        total = 0.0
        for g in groups:
            q = encoder.encode_query(encoder.tokenize_queries([g.query]))
            p = encoder.encode_passage(encoder.tokenize_passages([PASSAGES[x] for x in g.pids]))
            total += float(torch.softmax((q @ p.T)[0] / encoder.temperature, -1)[0])
    return total / len(groups)


def test_distilling_run_moves_toward_the_teacher_and_resumes_exactly(bert: Path, tmp_path: Path) -> None:
    config = tiny_encoder_config(bert)
    # the teacher prefers the *next* query's passage, against the records' positives: only the distillation term
    # pulls the encoder that way, so a run with it agrees with the teacher more than the same run without it
    groups = _groups(size=4, shift=1)
    train_config = _train_config(max_steps=12, distill_weight=4.0, checkpoint_every=5, keep_checkpoints=1)
    plain = train(config, train_config.replace(distill_batch_size=0), RECORDS, PASSAGES, tmp_path / "plain",
                  device="cpu", teacher_groups=groups)
    straight = train(config, train_config, RECORDS, PASSAGES, tmp_path / "straight", device="cpu",
                     teacher_groups=groups)
    without, with_teacher = (_teacher_agreement(load_encoder(d), groups) for d in (plain, straight))
    assert with_teacher > without + 0.05, (without, with_teacher)
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["data"]["teacher_groups"] == len(groups) and "teacher_sha256" in manifest

    class Killed(Exception):
        pass

    def kill(encoder: object) -> dict[str, float]:
        raise Killed

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        train(config, train_config.replace(eval_every=7), RECORDS, PASSAGES, killed, validate=kill, device="cpu",
              teacher_groups=groups)
    assert [s for s, _ in list_checkpoints(killed / "checkpoints")] == [5]
    with pytest.raises(TrainingStateError, match="teacher_sha256 differs"):
        train(config, train_config, RECORDS, PASSAGES, killed, resume=True, device="cpu", teacher_groups=groups[::-1])
    resumed = load_encoder(train(config, train_config, RECORDS, PASSAGES, killed, resume=True, device="cpu",
                                 teacher_groups=groups))
    for (name, a), (_, b) in zip(load_encoder(straight).named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
