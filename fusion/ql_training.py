"""Fine-tune the query-likelihood reranker on (query, positive, hard negatives) groups: a reranker trained here.

The score stays the mean log P(query | passage) of :class:`~fusion.query_likelihood.QueryLikelihoodScorer`; the
loss is a softmax cross-entropy over one positive and its negatives of ``scale * score`` (listwise, as a
cross-encoder is trained), plus ``nll_weight`` times the positive's negative log-likelihood, which keeps the model a
language model of queries. Only the last ``trainable_layers`` decoder layers and the final norm are updated: the
embedding table (tied to the LM head) and the lower layers stay as pretrained, so the backward pass is short and a
few hundred groups do not overwrite what the model knows. Small-scale by design on a CPU (EXPERIMENTS.md E11).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from fusion.query_likelihood import QueryLikelihoodScorer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainGroup:
    query: str
    positive: str
    negatives: tuple[str, ...]


@dataclass(frozen=True)
class QLTrainConfig:
    trainable_layers: int = 4
    negatives: int = 3  # per group (fewer if a group has fewer)
    epochs: int = 1
    lr: float = 2e-5
    scale: float = 4.0  # mean log-probs differ by ~0.5-2 nats between candidates
    nll_weight: float = 0.1
    seed: int = 0
    # draw ``negatives`` of a group's mined negatives at random each time it is used (False: its first ones, E11)
    sample_negatives: bool = False
    # "bfloat16": forward passes under CPU/GPU autocast (the weights and the optimizer stay float32); 2-3x cheaper
    # steps on a CPU with native bf16 (EXPERIMENTS E35)
    autocast: str = "float32"
    max_seconds: float | None = None  # stop after the step that crosses this much training time (None: all epochs)

    def __post_init__(self) -> None:
        if self.trainable_layers < 1 or self.negatives < 1 or self.epochs < 1:
            raise ValueError(f"trainable_layers, negatives and epochs must be >= 1: {self}")
        if self.lr <= 0 or self.scale <= 0 or self.nll_weight < 0:
            raise ValueError(f"lr and scale must be > 0 and nll_weight >= 0: {self}")
        if self.autocast not in ("float32", "bfloat16"):
            raise ValueError(f"autocast must be 'float32' or 'bfloat16', got {self.autocast!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds}")


def _freeze_all_but_top(scorer: QueryLikelihoodScorer, n: int) -> list:
    decoder = scorer.decoder()
    for p in scorer.model.parameters():
        p.requires_grad_(False)
    trainable = [*decoder.layers[-n:], decoder.norm]
    params = [p for m in trainable for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def train_query_likelihood(
    scorer: QueryLikelihoodScorer, groups: Sequence[TrainGroup], config: QLTrainConfig = QLTrainConfig(),
    progress: bool = True,
) -> dict:
    """Update ``scorer.model`` in place; returns a record (config, groups, steps, mean loss per epoch, mean loss and
    share of groups whose positive scored highest per window of 100 steps, seconds, whether the time budget stopped
    it)."""
    import torch

    if scorer.dtype != "float32":
        raise ValueError("train a float32 scorer (QueryLikelihoodConfig.dtype = 'float32'); "
                         "QLTrainConfig.autocast = 'bfloat16' gives bf16 speed with float32 weights")
    groups = [g for g in groups if g.negatives]
    if not groups:
        raise ValueError("no training group has a negative")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    params = _freeze_all_but_top(scorer, config.trainable_layers)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    model = scorer.model.train()
    autocast = torch.autocast(scorer.device.type, dtype=torch.bfloat16, enabled=config.autocast == "bfloat16")
    start, losses, steps, stopped = time.perf_counter(), [], 0, False
    window, windows, hits, accuracies = [], [], [], []  # per window of 100 steps: mean loss, positive ranked first
    try:
        for epoch in range(config.epochs):
            if stopped:
                break
            order = list(range(len(groups)))
            rng.shuffle(order)
            total, epoch_steps = 0.0, 0
            bar = tqdm(order, desc=f"QL fine-tuning, epoch {epoch + 1}/{config.epochs}", unit="group",
                       disable=not progress)
            for i in bar:
                g = groups[i]
                negatives = (rng.sample(g.negatives, min(config.negatives, len(g.negatives)))
                             if config.sample_negatives else g.negatives[: config.negatives])
                seqs, n_query = scorer.sequences(g.query, [g.positive, *negatives])
                with autocast:
                    logp = scorer.mean_logprob(seqs, n_query, cached_prefix=False).float()
                target = torch.zeros(1, dtype=torch.long, device=logp.device)
                loss = torch.nn.functional.cross_entropy(config.scale * logp.unsqueeze(0), target)
                loss = loss - config.nll_weight * logp[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                window.append(loss.item())
                hits.append(bool(logp.argmax().item() == 0))
                if len(window) == 100:
                    windows.append(round(sum(window) / len(window), 4))
                    accuracies.append(round(sum(hits) / len(hits), 3))
                    window, hits = [], []
                steps += 1
                epoch_steps += 1
                bar.set_postfix(loss=f"{total / epoch_steps:.3f}")
                if config.max_seconds is not None and time.perf_counter() - start >= config.max_seconds:
                    stopped = True
                    logger.info("QL fine-tuning: time budget of %.0f s reached after %d steps", config.max_seconds,
                                steps)
                    break
            losses.append(total / max(epoch_steps, 1))
            logger.info("QL fine-tuning epoch %d: mean loss %.4f", epoch + 1, losses[-1])
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    # the prompt prefix's cached keys/values came from the old weights
    scorer.refresh_prefix_cache()
    if window:
        windows.append(round(sum(window) / len(window), 4))
        accuracies.append(round(sum(hits) / len(hits), 3))
    return {"config": asdict(config), "groups": len(groups), "steps": steps, "epoch_losses": losses,
            "window_losses": windows, "window_accuracy": accuracies,
            "seconds": round(time.perf_counter() - start, 1), "time_budget_hit": stopped}


def save_scorer_model(scorer: QueryLikelihoodScorer, out_dir: str | Path, record: dict) -> Path:
    """Write the model, tokenizer and ``train.json`` to ``out_dir`` atomically (loadable with ``from_dir``)."""
    from dense.atomic import atomic_directory, write_json_atomic

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        scorer.model.save_pretrained(tmp)
        scorer.tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "train.json", record)
    return out_dir


__all__ = ["QLTrainConfig", "TrainGroup", "save_scorer_model", "train_query_likelihood"]
