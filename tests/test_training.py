"""Dense training: the loss falls, GradCache equals the full batch, a killed run resumes exactly, frozen input
embeddings stay as they were; training data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dense.config import TrainConfig
from dense.encoder import build_encoder, load_encoder
from dense.encoder_base import DenseEncoder
from dense.training import (
    STATE_FILE,
    TrainingBatches,
    TrainingStateError,
    _comparable,
    apply_update,
    full_batch_loss,
    grad_cache_loss,
    list_checkpoints,
    make_optimizer,
    train,
)
from dense.training_data import (
    RecordFormatError,
    RecordSource,
    TrainingRecord,
    mine_hard_negatives,
    mix_records,
    read_msmarco_train_records,
    read_records,
    write_records,
)
from dense_fixtures import make_tiny_bert_dir, make_tiny_llama_dir, tiny_encoder_config, toy_records_and_passages

RECORDS, PASSAGES = toy_records_and_passages()


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {"bert": make_tiny_bert_dir(root), "llama": make_tiny_llama_dir(root)}


def _train_config(**changes: object) -> TrainConfig:
    base = {"lr": 3e-3, "batch_size": 8, "hard_negatives": 2, "max_steps": 8, "warmup_ratio": 0.1,
            "checkpoint_every": 100, "log_every": 4, "seed": 3}
    return TrainConfig.from_dict({**base, **changes})


def _mean_loss(encoder: DenseEncoder) -> float:
    """In-batch InfoNCE over all toy pairs, in eval mode (no dropout)."""
    encoder.eval()
    with torch.no_grad():
        q = encoder.encode_query(encoder.tokenize_queries([r.query for r in RECORDS]))
        p = encoder.encode_passage(encoder.tokenize_passages([PASSAGES[r.positives[0]] for r in RECORDS]))
        return float(encoder.loss(encoder.similarity(q, p)))


@pytest.mark.parametrize(
    "model, changes",
    [("bert", {"pooling": "mean"}), ("llama", {"pooling": "last"}), ("llama", {"kind": "static", "temperature": 0.05}),
     ("llama", {"pooling": "mean", "cpu_bf16": True})],  # bf16 autocast on the CPU (E29)
)
def test_loss_falls_on_a_toy_set(backbones: dict[str, Path], tmp_path: Path, model: str, changes: dict) -> None:
    config = tiny_encoder_config(backbones[model], **changes)
    torch.manual_seed(0)
    before = _mean_loss(build_encoder(config, device="cpu"))
    lr = 0.05 if config.kind == "static" else 3e-3
    model_dir = train(config, _train_config(max_steps=12, lr=lr), RECORDS, PASSAGES, tmp_path / "run", device="cpu")
    after = _mean_loss(load_encoder(model_dir))
    assert after < 0.7 * before, (before, after)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["steps"] == 12 and manifest["data"]["sources"] == {"toy": len(RECORDS)}


def test_grad_cache_gives_the_full_batch_gradients(backbones: dict[str, Path]) -> None:
    encoder = build_encoder(tiny_encoder_config(backbones["bert"]), device="cpu")
    encoder.eval()  # no dropout, so both ways see the same network
    grads = []
    for chunk, step in ((None, full_batch_loss), (5, grad_cache_loss)):
        batch = TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, _train_config(grad_cache_chunk=chunk))[0]
        assert len(batch["passages"]) == (1 if chunk is None else 5)  # 24 passages in chunks of 5
        encoder.zero_grad()
        loss = step(encoder, batch, bf16=False)
        grads.append((loss, [p.grad.clone() for p in encoder.parameters() if p.grad is not None]))
    (full_loss, full), (cached_loss, cached) = grads
    assert full_loss == pytest.approx(cached_loss, abs=1e-6) and len(full) == len(cached) > 0
    for a, b in zip(full, cached, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _Killed(Exception):
    pass


def _kill_at(step: int):
    def validate(encoder: object) -> dict[str, float]:
        raise _Killed(f"simulated kill at step {step}")

    return validate


def test_killed_and_resumed_run_equals_an_uninterrupted_run(backbones: dict[str, Path], tmp_path: Path) -> None:
    # Dropout on (tiny BERT defaults), GradCache chunks and sampled hard negatives: all RNG paths are exercised.
    config = tiny_encoder_config(backbones["bert"])
    train_config = _train_config(max_steps=8, checkpoint_every=3, keep_checkpoints=1, grad_cache_chunk=7)
    straight = load_encoder(train(config, train_config, RECORDS, PASSAGES, tmp_path / "straight", device="cpu"))

    killed_dir = tmp_path / "killed"
    with pytest.raises(_Killed):  # checkpoint at step 3, killed at step 4 (its work is lost)
        train(config, train_config.replace(eval_every=4), RECORDS, PASSAGES, killed_dir, validate=_kill_at(4),
              device="cpu")
    assert [s for s, _ in list_checkpoints(killed_dir / "checkpoints")] == [3]
    with pytest.raises(TrainingStateError, match="resume"):
        train(config, train_config, RECORDS, PASSAGES, killed_dir, device="cpu")
    with pytest.raises(TrainingStateError, match="train_config differs"):
        train(config, train_config.replace(lr=1e-3), RECORDS, PASSAGES, killed_dir, resume=True, device="cpu")
    resumed = load_encoder(train(config, train_config, RECORDS, PASSAGES, killed_dir, resume=True, device="cpu"))
    assert [s for s, _ in list_checkpoints(killed_dir / "checkpoints")] == [6]

    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    untrained = build_encoder(config, device="cpu")
    assert any(not torch.allclose(a, b) for a, b in zip(untrained.parameters(), resumed.parameters(), strict=True))


def test_frozen_embeddings_stay_bit_identical_and_have_no_optimizer_state(backbones: dict[str, Path]) -> None:
    encoder = build_encoder(tiny_encoder_config(backbones["bert"]), device="cpu")
    config = _train_config(freeze_embeddings=True)
    optimizer = make_optimizer(encoder, config)
    table = encoder.input_embedding_table()
    assert table is encoder.backbone.embeddings.word_embeddings.weight and not table.requires_grad
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    batches = TrainingBatches(RECORDS, PASSAGES.__getitem__, encoder, config)
    for step in range(3):
        full_batch_loss(encoder, batches[step], bf16=False)
        assert table.grad is None
        apply_update(encoder, optimizer, config)
    assert all(p is not table for group in optimizer.param_groups for p in group["params"])
    assert table not in optimizer.state and optimizer.state and all(p.requires_grad for p in optimizer.state)
    changed = {name for name, p in encoder.named_parameters() if not torch.equal(p, before[name])}
    assert torch.equal(table, before["backbone.embeddings.word_embeddings.weight"])
    assert "backbone.embeddings.word_embeddings.weight" not in changed and len(changed) > 10


def test_frozen_embeddings_of_a_static_encoder_leave_the_token_weights(backbones: dict[str, Path]) -> None:
    config = _train_config(freeze_embeddings=True)
    weighted = build_encoder(tiny_encoder_config(backbones["llama"], kind="static", learned_token_weights=True),
                             device="cpu")
    optimizer = make_optimizer(weighted, config)
    assert [p for g in optimizer.param_groups for p in g["params"]] == [weighted.token_weight]
    plain = build_encoder(tiny_encoder_config(backbones["llama"], kind="static"), device="cpu")
    with pytest.raises(ValueError, match="learned_token_weights"):
        make_optimizer(plain, config)


def test_frozen_embeddings_resume_exactly_and_count_in_the_run_identity(backbones: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    config = tiny_encoder_config(backbones["bert"])
    train_config = _train_config(max_steps=4, checkpoint_every=2, keep_checkpoints=1, grad_cache_chunk=7,
                                 freeze_embeddings=True)
    straight = load_encoder(train(config, train_config, RECORDS, PASSAGES, tmp_path / "straight", device="cpu"))
    killed_dir = tmp_path / "killed"
    with pytest.raises(_Killed):
        train(config, train_config.replace(eval_every=3), RECORDS, PASSAGES, killed_dir, validate=_kill_at(3),
              device="cpu")
    state = torch.load(killed_dir / "checkpoints" / "step-00000002" / STATE_FILE, weights_only=False)
    assert state["train_config"]["freeze_embeddings"] is True
    with pytest.raises(TrainingStateError, match="train_config differs"):
        train(config, train_config.replace(freeze_embeddings=False), RECORDS, PASSAGES, killed_dir, resume=True,
              device="cpu")
    resumed = load_encoder(train(config, train_config, RECORDS, PASSAGES, killed_dir, resume=True, device="cpu"))
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    untrained = build_encoder(config, device="cpu").input_embedding_table()
    assert torch.equal(resumed.input_embedding_table(), untrained)
    # Left at its default the field stays out of the identity, so runs from before it existed still match.
    assert "freeze_embeddings" not in _comparable(train_config.replace(freeze_embeddings=False))


def test_batches_are_deterministic_and_mask_other_copies_of_a_positive(backbones: dict[str, Path]) -> None:
    encoder = build_encoder(tiny_encoder_config(backbones["bert"]), device="cpu")
    twins = [TrainingRecord("a", "query one", ("p0",), ("p1", "p2")), TrainingRecord("b", "query two", ("p0",), ())]
    batches = TrainingBatches(twins, PASSAGES.__getitem__, encoder, _train_config(batch_size=2, hard_negatives=1))
    batch = batches[0]
    expected = torch.zeros(2, 4, dtype=torch.bool)  # layout [pos_0, neg_0, pos_1, neg_1]; both positives are p0
    expected[0, 2] = expected[1, 0] = True
    assert torch.equal(batch["exclude"], expected)
    again = TrainingBatches(twins, PASSAGES.__getitem__, encoder, _train_config(batch_size=2, hard_negatives=1))[0]
    assert torch.equal(again["passages"][0]["input_ids"], batch["passages"][0]["input_ids"])


def test_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    good = json.dumps({"qid": "1", "query": "q", "positives": ["p1"], "negatives": [], "source": "llm"})
    path.write_text(good + "\n\n" + json.dumps({"qid": "2", "query": "q", "positives": []}) + "\n")
    with pytest.raises(RecordFormatError, match=rf"{path}:3: qid 2 has no positives"):
        read_records(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(RecordFormatError, match=rf"{path}:2: invalid JSON"):
        read_records(path)
    path.write_text(json.dumps({"qid": "1", "positives": ["p"]}) + "\n")
    with pytest.raises(RecordFormatError, match=rf"{path}:1: missing key\(s\) \['query'\]"):
        read_records(path)


def test_mix_records_caps_and_weights(tmp_path: Path) -> None:
    a = write_records(RECORDS, tmp_path / "a.jsonl")
    b = write_records([TrainingRecord(f"s{i}", f"synthetic {i}", (f"p{i}",), (), "crop") for i in range(10)],
                      tmp_path / "b.jsonl")
    assert read_records(a) == RECORDS
    mixed = mix_records([RecordSource(a, cap=5), RecordSource.parse(f"{b},weight=1.5")], seed=1)
    assert [r.source for r in mixed].count("toy") == 5 and [r.source for r in mixed].count("crop") == 15
    assert mixed == mix_records([RecordSource(a, cap=5), RecordSource(b, weight=1.5)], seed=1)


def test_mining_excludes_every_known_positive() -> None:
    records = [TrainingRecord("q1", "alpha", ("p1",)), TrainingRecord("q2", "beta", ("p5",), ("old",))]
    rankings = {"alpha": ["p1", "p2", "p3", "p4", "p5", "p6"], "beta": ["p5", "p9", "p8", "p7"]}

    def search(queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        return [[(pid, 10.0 - i) for i, pid in enumerate(rankings[q][:k])] for q in queries]

    mined = mine_hard_negatives(records, search, depth=6, n_negatives=2, known_positives={"q1": {"p2"}})
    assert mined[0].negatives == ("p3", "p4") and mined[1].negatives == ("p9", "p8")
    skipped = mine_hard_negatives(records, search, depth=6, n_negatives=3, skip_top=2, keep_existing=True)
    assert skipped[0].negatives == ("p3", "p4", "p5") and skipped[1].negatives == ("old", "p8", "p7")


def test_msmarco_train_records_keep_queries_with_a_positive_in_the_corpus() -> None:
    queries = {"1": "one", "2": "two", "3": "three"}
    qrels = {"1": {"a": 1, "x": 1}, "2": {"missing": 1}, "3": ["b"], "4": {"a": 1}}
    records = read_msmarco_train_records(queries, qrels, {"a", "b"})
    assert records == [TrainingRecord("1", "one", ("a",), (), "msmarco-train"),
                       TrainingRecord("3", "three", ("b",), (), "msmarco-train")]


def test_cpu_bf16_on_a_cpu_without_native_bf16_warns(backbones: dict[str, Path], monkeypatch, caplog) -> None:
    import dense.precision
    from dense.training import warn_if_cpu_bf16_is_emulated

    config = tiny_encoder_config(backbones["llama"], cpu_bf16=True)
    monkeypatch.setattr(dense.precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        assert warn_if_cpu_bf16_is_emulated(config, "cpu")
    assert "no native bf16" in caplog.text
    assert not warn_if_cpu_bf16_is_emulated(tiny_encoder_config(backbones["llama"]), "cpu")
    monkeypatch.setattr(dense.precision, "cpu_has_native_bf16", lambda: True)
    assert not warn_if_cpu_bf16_is_emulated(config, "cpu")
