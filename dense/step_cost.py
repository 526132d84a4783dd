"""What one dense training step costs, phase by phase, so a step can be made cheaper before more are bought.

Each variant (an :class:`EncoderConfig` + :class:`TrainConfig` pair: the recipe, the recipe with
``freeze_embeddings``, with a shorter ``passage_max_len``, ...) builds its encoder afresh and runs the steps
:func:`dense.training.train` runs, with the same parts (:class:`TrainingBatches`, :func:`make_optimizer`,
:func:`encode_batch`, :func:`contrastive_backward`, :func:`apply_update`), timing each phase by the wall clock:

- ``tokenise``: building the batch (sampling, passage lookup, tokenisation: the part pre-tokenised data would save);
- ``forward``: encoding the queries and passages with a graph (and the teacher groups' when the variant distils);
- ``loss+backward``: the InfoNCE loss (plus the distillation term) and the backward pass (with GradCache, forward
  and backward together: its no-grad pass, the loss and the replayed chunks do not separate into the two phases);
- ``optimizer``: gradient clipping, the AdamW step (most of it on the embedding table unless frozen), zeroing.

On a CPU autograd runs synchronously, so the clock measures each phase's own work; on CUDA the device is
synchronised at every phase boundary. The learning-rate schedule is left out (it costs nothing).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dense.config import EncoderConfig, TrainConfig
from dense.encoder import build_encoder
from dense.training import (
    TrainingBatches,
    apply_update,
    check_passages_exist,
    contrastive_backward,
    encode_batch,
    encode_distill,
    grad_cache_loss,
    make_optimizer,
    seed_everything,
    trainable_parameters,
)
from dense.training_data import RecordSource, TrainingRecord, mix_records, read_passages, record_pids

PHASES = ("tokenise", "forward", "loss+backward", "optimizer")
COLUMNS = ["variant", *(f"{phase} ms" for phase in PHASES), "s/step", "steps/s", "tokenise share",
           "trainable params", "params"]
BASE = "base"
_SECTIONS = {"encoder": EncoderConfig, "train": TrainConfig}


@dataclasses.dataclass(frozen=True)
class StepVariant:
    """One row of the benchmark: a name and the configs its encoder is built and trained with."""

    name: str
    encoder: EncoderConfig
    train: TrainConfig


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Mean seconds per step of each phase over the timed steps (``forward`` is ``None`` with GradCache)."""

    variant: str
    steps: int
    tokenise_s: float
    forward_s: float | None
    backward_s: float
    optimizer_s: float
    trainable_parameters: int
    parameters: int

    @property
    def total_s(self) -> float:
        return self.tokenise_s + (self.forward_s or 0.0) + self.backward_s + self.optimizer_s

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.total_s if self.total_s > 0 else float("inf")

    @property
    def tokenise_share(self) -> float:
        """The part of a step that pre-tokenised data could remove at most."""
        return self.tokenise_s / self.total_s if self.total_s > 0 else 0.0

    def row(self) -> dict[str, Any]:
        """The table row (:data:`COLUMNS`)."""
        seconds = (self.tokenise_s, self.forward_s, self.backward_s, self.optimizer_s)
        return {
            "variant": self.variant,
            **{f"{phase} ms": None if s is None else 1000 * s for phase, s in zip(PHASES, seconds, strict=True)},
            "s/step": self.total_s,
            "steps/s": self.steps_per_s,
            "tokenise share": self.tokenise_share,
            "trainable params": self.trainable_parameters,
            "params": self.parameters,
        }


def config_section(key: str) -> str:
    """``"encoder"`` or ``"train"``: which of the two configs has a field named ``key``."""
    owners = [name for name, cls in _SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) != 1:
        known = sorted(f.name for cls in _SECTIONS.values() for f in dataclasses.fields(cls))
        raise ValueError(f"variant key {key!r} is not a field of EncoderConfig or TrainConfig; known: {known}")
    return owners[0]


def variant_overrides(spec: str, prefix: str = "dense") -> list[str]:
    """``--variant`` text as ``section.key=value`` overrides of a pipeline config's ``[dense.encoder]`` and
    ``[dense.train]`` tables: ``base`` gives none; ``key=value[,key=value...]`` takes a bare field name of either
    config (``freeze_embeddings=true``, ``passage_max_len=64``) or a full ``dense.train.key``/``dense.encoder.key``.
    Values stay text: the config loader parses them as TOML, as it does ``--set``."""
    if spec.strip() == BASE:
        return []
    overrides = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"variant {spec!r}: {item!r} is not key=value (or use {BASE!r})")
        section, _, field = key.rpartition(".")
        if section and section not in (f"{prefix}.{name}" for name in _SECTIONS):
            raise ValueError(f"variant {spec!r}: {key!r} is outside [{prefix}.encoder] and [{prefix}.train]")
        if section and config_section(field) != section.rpartition(".")[2]:
            raise ValueError(f"variant {spec!r}: {field!r} is not a field of [{section}]")
        overrides.append(f"{section or f'{prefix}.{config_section(field)}'}.{field}={value.strip()}")
    if not overrides:
        raise ValueError(f"variant {spec!r} is empty; use {BASE!r} or key=value")
    return overrides


def crop_records(passages: Mapping[str, str], seed: int) -> list[TrainingRecord]:
    """One random-crop pseudo-query per passage (the synthetic stage's crops), as records without negatives."""
    from dense.querygen.crop import CropConfig, crop_pairs
    from dense.querygen.output import training_record

    return [TrainingRecord.from_json(training_record(pair))
            for pair in crop_pairs(passages.items(), CropConfig(seed=seed))]


def benchmark_records(
    collection: str | Path, n_records: int, seed: int, queries: str | Path | None = None
) -> tuple[list[TrainingRecord], dict[str, str]]:
    """Up to ``n_records`` training records and the texts of the passages they name.

    From ``queries`` (a records JSONL, e.g. the synthetic stage's ``train.jsonl``) a seeded sample, checked against
    ``collection``; without it, crops of as many passages sampled from ``collection``. Records without negatives
    get random passages of the pool as negatives (:class:`TrainingBatches`): not BM25's, but the same lengths and so
    the same cost.
    """
    if n_records < 1:
        raise ValueError(f"n_records={n_records}; must be >= 1")
    if queries is not None:
        records = mix_records([RecordSource(Path(queries), cap=n_records)], seed=seed)
        passages = read_passages(collection, record_pids(records))
        check_passages_exist(records, passages)
        return records, passages
    from dense.querygen.pipeline import select_passages

    passages = select_passages(Path(collection), n_records, seed)
    return crop_records(passages, seed), passages


class _PhaseClock:
    """Seconds since the previous lap; on CUDA after the queued work is done."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def _timed_step(encoder: Any, optimizer: torch.optim.Optimizer, dataset: TrainingBatches, step: int,
                config: TrainConfig) -> tuple[float, float | None, float, float]:
    clock = _PhaseClock(encoder.device)
    batch = dataset[step]
    tokenise = clock.lap()
    if config.grad_cache_chunk:
        grad_cache_loss(encoder, batch, config.bf16, config=config)
        forward, backward = None, clock.lap()
    else:
        q, p = encode_batch(encoder, batch, config.bf16)
        distill = (*encode_distill(encoder, batch, config.bf16), batch["teacher"]) if "teacher" in batch else None
        forward = clock.lap()
        contrastive_backward(encoder, q, p, batch["exclude"], distill=distill, config=config)
        backward = clock.lap()
    apply_update(encoder, optimizer, config)
    return tokenise, forward, backward, clock.lap()


def measure_step_cost(
    variant: StepVariant,
    records: Sequence[TrainingRecord],
    passages: Mapping[str, str],
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    teacher_groups: Sequence[Any] = (),
) -> StepCost:
    """Build ``variant``'s encoder and optimizer, run ``warmup`` untimed then ``steps`` timed training steps (batches
    ``warmup..warmup+steps-1`` of the seeded order, so every variant sees the same queries); mean phase times.
    ``teacher_groups`` serve a variant that distils (their passages must be in ``passages``)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps}, warmup={warmup}: need steps >= 1 and warmup >= 0")
    seed_everything(variant.train.seed)
    encoder = build_encoder(variant.encoder, device=device)
    if variant.train.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
    encoder.train()
    optimizer = make_optimizer(encoder, variant.train)
    dataset = TrainingBatches(records, passages.__getitem__, encoder, variant.train,
                              teacher_groups=teacher_groups if variant.train.distill_batch_size else ())
    timed = [_timed_step(encoder, optimizer, dataset, step, variant.train) for step in range(warmup + steps)][warmup:]
    tokenise, forward, backward, update = zip(*timed, strict=True)
    cost = StepCost(
        variant=variant.name,
        steps=steps,
        tokenise_s=sum(tokenise) / steps,
        forward_s=None if variant.train.grad_cache_chunk else sum(forward) / steps,
        backward_s=sum(backward) / steps,
        optimizer_s=sum(update) / steps,
        trainable_parameters=trainable_parameters(encoder),
        parameters=encoder.num_parameters(),
    )
    del encoder, optimizer, dataset  # the next variant builds its own: free this one's weights and AdamW state
    gc.collect()
    return cost


def measure_step_costs(
    variants: Sequence[StepVariant],
    records: Sequence[TrainingRecord],
    passages: Mapping[str, str],
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    teacher_groups: Sequence[Any] = (),
) -> list[StepCost]:
    """:func:`measure_step_cost` for every variant, in order (one row each); the passages are checked once."""
    check_passages_exist(records, passages)
    return [measure_step_cost(v, records, passages, steps, warmup, device, teacher_groups)
            for v in tqdm(variants, desc="step cost", unit="variant")]


def records_needed(variants: Sequence[StepVariant], steps: int, warmup: int) -> int:
    """Records for ``warmup + steps`` batches of the largest variant without repeating a query."""
    return (steps + warmup) * max(v.train.batch_size for v in variants)


def tokenise_summary(costs: Sequence[StepCost]) -> str:
    """One line per variant: tokenisation's share of a step, i.e. what pre-tokenised data would save at most."""
    return "\n".join(
        f"{c.variant}: tokenisation {1000 * c.tokenise_s:.0f} ms of {c.total_s:.3f} s per step "
        f"({100 * c.tokenise_share:.1f}%): pre-tokenising saves at most that"
        for c in costs
    )


__all__ = [
    "COLUMNS",
    "PHASES",
    "StepCost",
    "StepVariant",
    "benchmark_records",
    "config_section",
    "crop_records",
    "measure_step_cost",
    "measure_step_costs",
    "records_needed",
    "tokenise_summary",
    "variant_overrides",
]
