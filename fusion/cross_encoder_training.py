"""Train a cross-encoder reranker with the localized contrastive loss (LCE; Gao, Dai and Callan, 2021, "Rethink
Training of BERT Rerankers in Multi-Stage Retrieval Pipeline").

Each query contributes a group of ``group_size`` passages: one positive and ``group_size - 1`` hard negatives drawn
from the record's negatives, which should come from the first stage the reranker will sit behind (its mistakes are
what the reranker has to fix). The loss is the softmax cross-entropy of the group's logits with the positive as the
target, averaged over the groups of a step.

As in dense training, every step is a pure function of ``(seed, step)`` (the epoch's query order and each query's
positive and negatives come from generators seeded by ``(seed, epoch[, record])``), so a run killed after a
checkpoint and resumed equals an uninterrupted one. Checkpoints (model, optimizer, scheduler, RNG, loss curve) go to
``out_dir/checkpoints/step-N``; the final model to ``out_dir/model``, loadable by
:meth:`fusion.cross_encoder.CrossEncoderScorer.from_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dense.atomic import atomic_directory
from dense.training_data import TrainingRecord, source_counts
from fusion.cross_encoder import CONFIG_FILE, CrossEncoderConfig, CrossEncoderScorer

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


class CrossEncoderTrainingError(RuntimeError):
    """A checkpoint or finished model belongs to another run, or the records cannot form a group."""


@dataclass(frozen=True)
class CrossEncoderTrainConfig:
    """How the cross-encoder is trained (LCE over groups of 1 positive + ``group_size - 1`` hard negatives)."""

    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    groups_per_step: int = 8  # queries per optimizer step
    group_size: int = 8  # passages per query: the positive and group_size - 1 negatives
    groups_per_forward: int = 0  # gradient accumulation: groups per forward/backward (0 = the whole step at once)
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    seed: int = 13
    checkpoint_every: int = 500
    keep_checkpoints: int = 1
    log_every: int = 50
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "groups_per_step", "epochs", "checkpoint_every", "keep_checkpoints", "log_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CrossEncoderTrainConfig.{name} = {getattr(self, name)}; must be > 0")
        if self.group_size < 2:
            raise ValueError(f"CrossEncoderTrainConfig.group_size = {self.group_size}; needs a positive and a negative")
        if self.groups_per_forward < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError(f"groups_per_forward must be >= 0 and max_steps >= 1 or None: {self}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"CrossEncoderTrainConfig.warmup_ratio = {self.warmup_ratio}; must be in [0, 1)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> CrossEncoderTrainConfig:
        """Build from a config table, naming unknown keys instead of ignoring them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CrossEncoderTrainConfig: unknown key(s) {unknown}{f' in {where}' if where else ''}; "
                             f"known: {sorted(known)}")
        return cls(**data)


# Fields that may change between a checkpoint and its resumption without changing what is computed.
OPERATIONAL_FIELDS = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "groups_per_forward"})


class TrainingGroups:
    """Step -> ``(queries, passages)``: ``groups_per_step`` queries, each with ``group_size`` passages, the
    positive first; deterministic in ``(seed, step)``."""

    def __init__(self, records: Sequence[TrainingRecord], passage_text: Callable[[str], str],
                 config: CrossEncoderTrainConfig) -> None:
        self.records = [r for r in records if r.negatives]
        if len(self.records) < len(records):
            logger.warning("cross-encoder training: %d of %d records have no negative and are left out",
                           len(records) - len(self.records), len(records))
        self.steps_per_epoch = len(self.records) // config.groups_per_step
        if self.steps_per_epoch == 0:
            raise CrossEncoderTrainingError(
                f"{len(self.records)} records with negatives are fewer than one step of {config.groups_per_step} "
                "groups; mine hard negatives first (dense.training_data.mine_hard_negatives) or lower groups_per_step"
            )
        self.passage_text = passage_text
        self.config = config

    def total_steps(self) -> int:
        c = self.config
        return c.max_steps or max(1, math.ceil(c.epochs * self.steps_per_epoch))

    def __getitem__(self, step: int) -> tuple[list[str], list[list[str]]]:
        c = self.config
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([c.seed, epoch]).permutation(len(self.records))
        queries, groups = [], []
        for r in order[index * c.groups_per_step : (index + 1) * c.groups_per_step]:
            record = self.records[int(r)]
            rng = np.random.default_rng([c.seed, epoch, int(r)])
            positive = record.positives[rng.integers(len(record.positives))]
            n, pool = c.group_size - 1, record.negatives
            picks = rng.choice(len(pool), size=n, replace=len(pool) < n)
            queries.append(record.query)
            groups.append([self.passage_text(pid) for pid in (positive, *(pool[i] for i in picks))])
        return queries, groups


def lce_loss(scorer: CrossEncoderScorer, queries: Sequence[str], groups: Sequence[Sequence[str]]) -> Any:
    """Localized contrastive loss: cross-entropy of each group's logits against its first (positive) passage."""
    import torch

    size = len(groups[0])
    pairs_q = [q for q, group in zip(queries, groups, strict=True) for _ in group]
    pairs_p = [p for group in groups for p in group]
    logits = scorer.logits(scorer.tokenize(pairs_q, pairs_p)).view(len(groups), size)
    target = torch.zeros(len(groups), dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits, target)


def records_sha256(records: Sequence[TrainingRecord]) -> str:
    """sha256 over the records' content and order (a resumed run must see the same data)."""
    from dense.training import records_fingerprint

    return records_fingerprint(records)


def train_cross_encoder(
    base_model: str | Path,
    scorer_config: CrossEncoderConfig,
    train_config: CrossEncoderTrainConfig,
    records: Sequence[TrainingRecord],
    passage_text: Callable[[str], str],
    out_dir: str | Path,
    resume: bool = False,
    device: Any = None,
    progress: bool = True,
) -> Path:
    """Train from the pretrained LM ``base_model`` and save to ``out_dir/model``; returns that directory.

    ``records`` carry the hard negatives (mined from the first stage); ``passage_text`` maps pid to text. A finished
    model of the same run is returned as is; checkpoints of the same run are continued with ``resume`` (without
    it, they are an error); checkpoints or a model of another run are an error.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from dense.training import resumable_checkpoint, rng_state, set_rng_state

    out_dir = Path(out_dir)
    model_dir, ckpt_root = out_dir / "model", out_dir / "checkpoints"
    identity = {
        "base_model": str(base_model),
        "scorer_config": asdict(scorer_config),
        "train_config": {k: v for k, v in asdict(train_config).items() if k not in OPERATIONAL_FIELDS},
        "records_sha256": records_sha256(records),
    }
    if (model_dir / CONFIG_FILE).is_file():
        _check_same_run(json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8")), identity, model_dir)
        logger.info("cross-encoder training: %s is up to date; nothing to do", model_dir)
        return model_dir
    latest = resumable_checkpoint(ckpt_root, resume, CrossEncoderTrainingError)

    groups = TrainingGroups(records, passage_text, train_config)
    total = groups.total_steps()
    torch.manual_seed(train_config.seed)
    start_step, state = 0, None
    if latest is not None:
        start_step, ckpt = latest
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        _check_same_run(state, identity, ckpt / STATE_FILE)
        scorer = CrossEncoderScorer.from_dir(ckpt / "model", scorer_config, device=device)
        logger.info("resuming cross-encoder training from %s (step %d of %d)", ckpt, start_step, total)
    else:
        scorer = CrossEncoderScorer.build(base_model, scorer_config, device=device, seed=train_config.seed)
    model = scorer.model
    if train_config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train_config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=train_config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(train_config.warmup_ratio * total), total)
    loss_curve: list[dict[str, float]] = []
    window: tuple[float, int] = (0.0, 0)
    seconds_before = 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loss_curve, window, seconds_before = state["loss_curve"], tuple(state["loss_window"]), state["seconds"]

    per_forward = train_config.groups_per_forward or train_config.groups_per_step
    logger.info("cross-encoder training: %d groups (%s), %d steps of %d groups x %d passages, device %s",
                len(groups.records), source_counts(groups.records), total, train_config.groups_per_step,
                train_config.group_size, scorer.device)
    started, last_loss = time.perf_counter(), float("nan")
    bar = tqdm(total=total, initial=start_step, desc="train cross-encoder", unit="step", disable=not progress)
    for step in range(start_step + 1, total + 1):
        queries, passages = groups[step - 1]
        step_loss = 0.0
        for begin in range(0, len(queries), per_forward):
            loss = lce_loss(scorer, queries[begin : begin + per_forward], passages[begin : begin + per_forward])
            share = len(queries[begin : begin + per_forward]) / len(queries)
            (loss * share).backward()
            step_loss += float(loss.detach()) * share
        if train_config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = step_loss
        window = (window[0] + step_loss, window[1] + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if step % train_config.log_every == 0 or step == total:
            loss_curve.append({"step": step, "loss": window[0] / window[1]})
            logger.info("cross-encoder step %d/%d loss %.4f lr %.2e", step, total, window[0] / window[1],
                        scheduler.get_last_lr()[0])
            window = (0.0, 0)
        if step % train_config.checkpoint_every == 0 and step < total:
            extra = {**identity, "step": step, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state(), "loss_curve": loss_curve,
                     "loss_window": window, "seconds": seconds_before + time.perf_counter() - started}
            _save_checkpoint(ckpt_root, step, scorer, extra, train_config.keep_checkpoints)
    bar.close()
    model.eval()
    seconds = seconds_before + time.perf_counter() - started
    trained_now = total - start_step
    logger.info("cross-encoder training done: %d steps in %.1f s (this run: %d steps, %.2f groups/s)", total, seconds,
                trained_now, trained_now * train_config.groups_per_step / max(time.perf_counter() - started, 1e-9))
    record = {**identity, "train_config_full": asdict(train_config), "records": len(groups.records),
              "sources": source_counts(groups.records), "steps": total, "final_loss": last_loss,
              "loss_curve": loss_curve, "seconds": round(seconds, 1), "device": str(scorer.device)}
    scorer.save(model_dir, record)
    logger.info("cross-encoder: final model in %s", model_dir)
    return model_dir


def _save_checkpoint(root: Path, step: int, scorer: CrossEncoderScorer, state: Mapping[str, Any], keep: int) -> None:
    import torch

    from dense.training import list_checkpoints

    with atomic_directory(root / f"step-{step:08d}") as tmp:
        scorer.save(tmp / "model")
        torch.save(dict(state), tmp / STATE_FILE)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    logger.info("cross-encoder checkpoint: step %d -> %s", step, root)


def _check_same_run(saved: Mapping[str, Any], expected: Mapping[str, Any], where: Path) -> None:
    for key, value in expected.items():
        if saved.get(key) != value:
            raise CrossEncoderTrainingError(
                f"{where} was written by a different run ({key} differs: saved {saved.get(key)!r}, now {value!r}); "
                f"use a fresh output directory, or delete {where.parent} to start over"
            )


__all__ = [
    "CrossEncoderTrainConfig",
    "CrossEncoderTrainingError",
    "TrainingGroups",
    "lce_loss",
    "train_cross_encoder",
]
