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

    def __post_init__(self) -> None:
        if self.trainable_layers < 1 or self.negatives < 1 or self.epochs < 1:
            raise ValueError(f"trainable_layers, negatives and epochs must be >= 1: {self}")
        if self.lr <= 0 or self.scale <= 0 or self.nll_weight < 0:
            raise ValueError(f"lr and scale must be > 0 and nll_weight >= 0: {self}")


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
    """Update ``scorer.model`` in place; returns a record (config, groups, steps, mean loss per epoch, seconds)."""
    import torch

    groups = [g for g in groups if g.negatives]
    if not groups:
        raise ValueError("no training group has a negative")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    params = _freeze_all_but_top(scorer, config.trainable_layers)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    model = scorer.model.train()
    start, losses, steps = time.perf_counter(), [], 0
    try:
        for epoch in range(config.epochs):
            order = list(range(len(groups)))
            rng.shuffle(order)
            total = 0.0
            bar = tqdm(order, desc=f"QL fine-tuning, epoch {epoch + 1}/{config.epochs}", unit="group",
                       disable=not progress)
            for i in bar:
                g = groups[i]
                seqs, n_query = scorer.sequences(g.query, [g.positive, *g.negatives[: config.negatives]])
                logp = scorer.mean_logprob(seqs, n_query, cached_prefix=False)
                target = torch.zeros(1, dtype=torch.long, device=logp.device)
                loss = torch.nn.functional.cross_entropy(config.scale * logp.unsqueeze(0), target)
                loss = loss - config.nll_weight * logp[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
                bar.set_postfix(loss=f"{total / (bar.n + 1):.3f}")
            losses.append(total / len(order))
            logger.info("QL fine-tuning epoch %d: mean loss %.4f", epoch + 1, losses[-1])
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    # the prompt prefix's cached keys/values came from the old weights
    scorer.refresh_prefix_cache()
    return {"config": asdict(config), "groups": len(groups), "steps": steps, "epoch_losses": losses,
            "seconds": round(time.perf_counter() - start, 1)}


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
