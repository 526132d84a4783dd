"""The step-cost benchmark (dense/step_cost.py): variants parse into config overrides, and a tiny model gives one row
of positive phase times per variant, with fewer trainable parameters when the input embeddings are frozen."""

from __future__ import annotations

from pathlib import Path

import pytest

from dense.config import TrainConfig
from dense.step_cost import (
    COLUMNS,
    StepVariant,
    benchmark_records,
    measure_step_costs,
    records_needed,
    tokenise_summary,
    variant_overrides,
)
from dense.training_data import write_records
from dense_fixtures import make_tiny_bert_dir, tiny_encoder_config, toy_records_and_passages


def test_variants_become_overrides_of_the_dense_tables() -> None:
    assert variant_overrides("base") == []
    assert variant_overrides("freeze_embeddings=true, passage_max_len=64") == [
        "dense.train.freeze_embeddings=true", "dense.encoder.passage_max_len=64"]
    assert variant_overrides("dense.train.lr=1e-3") == ["dense.train.lr=1e-3"]
    for bad in ("no_such_field=1", "freeze_embeddings", "dense.encoder.lr=1", "fusion.C=2", ","):
        with pytest.raises(ValueError):
            variant_overrides(bad)


def test_one_row_per_variant_with_positive_phase_times(tmp_path: Path) -> None:
    records, passages = toy_records_and_passages()
    encoder = tiny_encoder_config(make_tiny_bert_dir(tmp_path))
    train = TrainConfig.from_dict({"batch_size": 4, "hard_negatives": 1, "seed": 3})
    variants = [StepVariant("base", encoder, train),
                StepVariant("freeze_embeddings=true", encoder, train.replace(freeze_embeddings=True)),
                StepVariant("grad_cache_chunk=3", encoder, train.replace(grad_cache_chunk=3))]
    costs = measure_step_costs(variants, records, passages, steps=2, warmup=1, device="cpu")
    assert [c.variant for c in costs] == [v.name for v in variants]
    base, frozen, cached = costs
    for cost in costs:
        assert cost.steps == 2 and cost.tokenise_s > 0 and cost.backward_s > 0 and cost.optimizer_s > 0
        assert 0 < cost.tokenise_share < 1 and cost.total_s > 0 and set(cost.row()) == set(COLUMNS)
    assert base.forward_s > 0 and cached.forward_s is None and cached.row()["forward ms"] is None
    assert frozen.trainable_parameters < base.trainable_parameters == base.parameters == frozen.parameters
    assert "freeze_embeddings=true: tokenisation" in tokenise_summary(costs)
    assert records_needed(variants, steps=2, warmup=1) == 12


def test_records_come_from_a_records_file_or_from_crops(tiny_msmarco_dir: Path, tmp_path: Path) -> None:
    collection = tiny_msmarco_dir / "collection.tsv"
    crops, passages = benchmark_records(collection, 10, seed=1)
    assert len(crops) == 10 and all(r.positives[0] in passages and r.source == "crop" for r in crops)
    assert all(set(r.query.split()) <= set(passages[r.positives[0]].split()) for r in crops)
    records, _ = toy_records_and_passages()
    with pytest.raises(KeyError, match="not in the collection"):  # toy pids p0.. are not the tiny pool's
        benchmark_records(collection, 5, seed=1, queries=write_records(records, tmp_path / "toy.jsonl"))
    own = write_records(crops, tmp_path / "crops.jsonl")
    sampled, texts = benchmark_records(collection, 4, seed=1, queries=own)
    assert len(sampled) == 4 and set(texts) == {r.positives[0] for r in sampled}
