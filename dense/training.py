"""Train a dense bi-encoder with InfoNCE over in-batch and hard negatives, resumable after a kill.

Every batch is a pure function of ``(seed, step)``: the epoch's query order and each query's positive and
hard negatives are drawn from generators seeded by ``(seed, epoch[, record])``. Resuming therefore needs only
the step number besides model, optimizer, scheduler and RNG states, and a resumed run equals an uninterrupted one.

Large batches use GradCache (Gao et al., 2021): embeddings are first computed in chunks without a graph, the loss
and its gradient with respect to the embeddings are computed over the whole batch, then every chunk is encoded
again with a graph and back-propagated with its slice of those gradients. Loss and gradients equal those of one
full-batch forward (dropout masks are replayed by restoring the RNG state per chunk), at the memory of one chunk.

With ``distill_batch_size`` > 0 each step also takes that many teacher groups (``dense.teacher_data``: a query, passages
and a teacher's scores of them) from their own seeded stream and adds a KL term between the teacher's distribution
over each group and the encoder's (:meth:`DenseEncoder.distillation_loss`, EXPERIMENTS.md E30).

Under ``torchrun`` (``dense.distributed``) the global batch of ``batch_size`` queries is split evenly over the ranks;
query and passage embeddings are all-gathered, so every rank computes the loss of the whole global batch (every
passage of every rank is a negative for every query) but back-propagates only through its own slice, and the
gradients are summed over the ranks. Loss and update are those of one process with the same global batch (up to
float rounding and dropout masks, which each rank draws from its own RNG). Rank 0 writes checkpoints and the model;
each checkpoint keeps every rank's RNG state, so a resumed run with the same number of ranks is the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from dense.atomic import atomic_directory, sha256_file
from dense.config import LATER_TRAIN_FIELDS, OPERATIONAL_TRAIN_FIELDS, EncoderConfig, TrainConfig
from dense.distributed import (
    SINGLE,
    DistContext,
    DistributedSetupError,
    all_reduce_gradients,
    broadcast_parameters,
    gather_with_grad,
    init_distributed,
    run_on_main,
)
from dense.encoder import build_encoder, load_encoder
from dense.encoder_base import MANIFEST_FILE, DenseEncoder
from dense.teacher_data import TeacherGroup, check_group_passages
from dense.training_data import TrainingRecord, source_counts

logger = logging.getLogger(__name__)

PassageText = Callable[[str], str] | Mapping[str, str]
Validate = Callable[[DenseEncoder], Mapping[str, float]]
STATE_FILE = "trainer_state.pt"
VALIDATION_LOG = "validation.jsonl"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainingStateError(RuntimeError):
    """A checkpoint or finished model does not match the run asked for."""


# --- data ----------------------------------------------------------------------------------------------------
def _passage_lookup(passage_text: PassageText) -> Callable[[str], str]:
    if isinstance(passage_text, Mapping):
        texts = passage_text

        def lookup(pid: str) -> str:
            try:
                return texts[pid]
            except KeyError:
                raise KeyError(f"passage {pid!r} named by a training record is not in the collection") from None

        return lookup
    return passage_text


def records_fingerprint(records: Sequence[TrainingRecord] | Sequence[TeacherGroup]) -> str:
    """sha256 over the records' (or teacher groups') content and order: a resumed run must see the same data."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps(r.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def check_passages_exist(records: Sequence[TrainingRecord], passages: Mapping[str, str]) -> None:
    """Fail before training when records name passages the collection lacks."""
    missing = [(r.qid, pid) for r in records for pid in (*r.positives, *r.negatives) if pid not in passages]
    if missing:
        raise KeyError(
            f"{len(missing)} passage references are not in the collection, e.g. (qid, pid) {missing[:5]}; "
            "the records were made for another collection, or the collection file is incomplete"
        )


class TrainingBatches(Dataset):
    """Step number -> tokenized batch, deterministic in ``(seed, step)``.

    Passages are laid out ``[pos, neg_1..neg_H]`` per query. ``exclude[i, j]`` is True where passage ``j`` is a
    known positive of query ``i`` other than its own target, so it is never pushed away as a negative.

    With ``world_size`` > 1 the texts are those of rank ``rank``'s share of the global batch (queries
    ``[rank * b, (rank + 1) * b)`` with ``b = batch_size / world_size``, and their passages); ``exclude`` is always
    the global ``(batch_size, passages)`` mask, because every rank scores the gathered global batch.
    """

    def __init__(
        self,
        records: Sequence[TrainingRecord],
        passage_text: Callable[[str], str],
        encoder: DenseEncoder,
        config: TrainConfig,
        rank: int = 0,
        world_size: int = 1,
        teacher_groups: Sequence[TeacherGroup] = (),
    ) -> None:
        if config.batch_size % world_size:
            raise ValueError(
                f"batch_size {config.batch_size} cannot be split evenly over {world_size} processes; make it a "
                "multiple of the number of processes (it is the global batch: each process takes an equal share)"
            )
        self.records = records
        self.passage_text = passage_text
        self.tokenize_queries = encoder.tokenize_queries
        self.tokenize_passages = encoder.tokenize_passages
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(records) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(records)} training records are fewer than one batch of {config.batch_size}")
        # Fallback negatives for records without their own: any passage named by some record.
        self.random_pool = sorted({pid for r in records for pid in (*r.positives, *r.negatives)})
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self.teacher_groups = teacher_groups
        self.distill_steps_per_epoch = 0
        if config.distill_batch_size:
            check_distill_groups(teacher_groups, config, world_size)
            self.distill_steps_per_epoch = len(teacher_groups) // config.distill_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.records))
            self._order_epoch = epoch
        return self._order

    def _sample(self, record: TrainingRecord, rng: np.random.Generator) -> list[str]:
        positive = record.positives[rng.integers(len(record.positives))]
        n = self.config.hard_negatives
        if n == 0:
            return [positive]
        pool = list(record.negatives)
        if not pool:
            positives = set(record.positives)
            pool = [p for p in (self.random_pool[i] for i in rng.integers(len(self.random_pool), size=4 * n))
                    if p not in positives] or [positive]
        if len(pool) >= n:
            negatives = [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
        else:
            negatives = [pool[i] for i in rng.integers(len(pool), size=n)]
        return [positive, *negatives]

    def __len__(self) -> int:
        return sys.maxsize  # indexed by global step; the sampler bounds it

    def __getitem__(self, step: int) -> dict[str, Any]:
        epoch, index = divmod(step, self.steps_per_epoch)
        size = self.config.batch_size
        chosen = self.epoch_order(epoch)[index * size : (index + 1) * size]
        queries, pids = [], []
        for r in chosen:
            record = self.records[int(r)]
            queries.append(record.query)
            pids.extend(self._sample(record, np.random.default_rng([self.config.seed, epoch, int(r)])))
        per_query = len(pids) // len(queries)
        columns: dict[str, list[int]] = {}
        for j, pid in enumerate(pids):
            columns.setdefault(pid, []).append(j)
        exclude = torch.zeros(len(queries), len(pids), dtype=torch.bool)
        for i, r in enumerate(chosen):
            for pid in self.records[int(r)].positives:
                for j in columns.get(pid, ()):
                    exclude[i, j] = j != i * per_query
        share = len(queries) // self.world_size
        queries = queries[self.rank * share : (self.rank + 1) * share]
        pids = pids[self.rank * share * per_query : (self.rank + 1) * share * per_query]
        chunk = self.config.grad_cache_chunk or max(len(queries), len(pids))
        texts = [self.passage_text(pid) for pid in pids]
        batch = {
            "queries": self._chunks(self.tokenize_queries, queries, chunk),
            "passages": self._chunks(self.tokenize_passages, texts, chunk),
            "exclude": exclude,
        }
        if self.config.distill_batch_size:
            batch.update(self._distill_part(step))
        return batch

    @staticmethod
    def _chunks(tokenize: Callable[[list[str]], Any], texts: list[str], chunk: int) -> list[Any]:
        return [tokenize(texts[s : s + chunk]) for s in range(0, len(texts), chunk)]

    def _distill_part(self, step: int) -> dict[str, Any]:
        """The step's teacher groups: this rank's share of their queries and of the ``distill_passages`` passages
        sampled from each group, and the teacher's log-likelihoods of those passages for the whole global step
        ``(groups, passages)`` (global like ``exclude``: every rank scores the gathered groups). The groups have
        their own epochs (a seeded permutation each), so the two data sources can differ in size."""
        size, g = self.config.distill_batch_size, self.config.distill_passages
        epoch, index = divmod(step, self.distill_steps_per_epoch)
        order = np.random.default_rng([self.config.seed, _DISTILL_STREAM, epoch]).permutation(len(self.teacher_groups))
        chosen = order[index * size : (index + 1) * size]
        share = size // self.world_size
        mine = range(self.rank * share, (self.rank + 1) * share)
        queries, texts, teacher = [], [], []
        for i, gi in enumerate(chosen):
            group = self.teacher_groups[int(gi)]
            rng = np.random.default_rng([self.config.seed, _DISTILL_STREAM, epoch, int(gi)])
            picked = np.sort(rng.choice(len(group.pids), size=g, replace=False))
            lls = group.log_likelihoods()
            teacher.append([lls[j] for j in picked])
            if i in mine:
                queries.append(group.query)
                texts.extend(self.passage_text(group.pids[j]) for j in picked)
        chunk = self.config.grad_cache_chunk or max(len(queries), len(texts))
        return {
            "distill_queries": self._chunks(self.tokenize_queries, queries, chunk),
            "distill_passages": self._chunks(self.tokenize_passages, texts, chunk),
            "teacher": torch.tensor(teacher, dtype=torch.float32),
        }


# a constant mixed into the seeds of the teacher-group stream, so it never repeats the contrastive stream's draws
_DISTILL_STREAM = 7_919


def check_distill_groups(groups: Sequence[TeacherGroup], config: TrainConfig, world_size: int = 1) -> None:
    """Fail before training when distillation is asked for and the teacher groups cannot serve it."""
    if config.distill_batch_size % world_size:
        raise ValueError(f"distill_batch_size {config.distill_batch_size} cannot be split evenly over {world_size} "
                         "processes; make it a multiple of the number of processes")
    if len(groups) < config.distill_batch_size:
        raise ValueError(f"distill_batch_size = {config.distill_batch_size} needs at least that many teacher groups, "
                         f"got {len(groups)} (set dense.teacher_scores to a teacher file, or distill_batch_size = 0)")
    small = [g.qid for g in groups if len(g.pids) < config.distill_passages]
    if small:
        raise ValueError(f"{len(small)} teacher groups have fewer than distill_passages = {config.distill_passages} "
                         f"passages (e.g. qid {small[0]}); lower distill_passages or score deeper")


def _identity(item: Any) -> Any:
    return item


# --- one optimisation step -----------------------------------------------------------------------------------
class _RngSnapshot:
    """The CPU (and current CUDA device) RNG state, to replay dropout masks in GradCache's second forward."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


def warn_if_cpu_bf16_is_emulated(encoder_config: EncoderConfig, device: torch.device | str) -> bool:
    """Log a warning (and return True) when ``cpu_bf16`` asks for bf16 autocast on a CPU that only emulates bf16,
    where training and encoding run several times slower than in float32 (EXPERIMENTS E10, E29)."""
    from dense.precision import cpu_has_native_bf16

    if encoder_config.cpu_bf16 and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        logger.warning("dense.encoder.cpu_bf16 = true, but this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is "
                       "emulated and slower than float32 here; set it to false (e.g. --set "
                       "dense.encoder.cpu_bf16=false), which trains a different model than the shipped config")
        return True
    return False


def encode_batch(encoder: DenseEncoder, batch: Mapping[str, Any], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and passage embeddings of a (local) tokenized batch, with the graph for backward."""
    with encoder.autocast(bf16):
        q = torch.cat([encoder.encode_query(encoder.to_device(c)) for c in batch["queries"]])
        p = torch.cat([encoder.encode_passage(encoder.to_device(c)) for c in batch["passages"]])
    return q, p


def encode_distill(encoder: DenseEncoder, batch: Mapping[str, Any], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the batch's teacher-group queries and passages (with the graph)."""
    with encoder.autocast(bf16):
        q = torch.cat([encoder.encode_query(encoder.to_device(c)) for c in batch["distill_queries"]])
        p = torch.cat([encoder.encode_passage(encoder.to_device(c)) for c in batch["distill_passages"]])
    return q, p


def group_scores(encoder: DenseEncoder, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``(n, g)``: each of ``n`` queries against its own ``g`` passages (passages laid out group after group)."""
    n = q.shape[0]
    g = p.shape[0] // n
    full = encoder.similarity(q, p).view(n, n, g)
    idx = torch.arange(n, device=q.device)
    return full[idx, idx]


def step_loss(
    encoder: DenseEncoder,
    q: torch.Tensor,
    p: torch.Tensor,
    exclude: torch.Tensor,
    context: DistContext = SINGLE,
    distill: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: TrainConfig | None = None,
) -> torch.Tensor:
    """InfoNCE over the gathered global batch, plus (with ``distill = (queries, passages, teacher)``: this rank's
    teacher-group embeddings and the global teacher matrix) ``distill_weight`` x the mean KL over the step's groups,
    also gathered: like the InfoNCE term, every rank computes the global loss and back-propagates through its own
    slice, and :func:`train` sums the gradients over the ranks.
    """
    qg, pg = gather_with_grad(q, context), gather_with_grad(p, context)
    loss = encoder.loss(encoder.similarity(qg, pg), exclude=exclude.to(q.device))
    if distill is not None:
        if config is None:
            raise ValueError("step_loss with distill needs the TrainConfig")
        dq, dp, teacher = distill
        dq, dp = gather_with_grad(dq, context), gather_with_grad(dp, context)
        kl = encoder.distillation_loss(group_scores(encoder, dq, dp), teacher.to(dq.device))
        loss = loss + config.distill_weight * kl / teacher.shape[0]
    return loss


def contrastive_backward(
    encoder: DenseEncoder, q: torch.Tensor, p: torch.Tensor, exclude: torch.Tensor, context: DistContext = SINGLE,
    distill: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, config: TrainConfig | None = None,
) -> float:
    """The step's loss (:func:`step_loss`) and its backward pass; returns the loss."""
    loss = step_loss(encoder, q, p, exclude, context, distill, config)
    loss.backward()
    return float(loss.detach())


def full_batch_loss(
    encoder: DenseEncoder, batch: Mapping[str, Any], bf16: bool, context: DistContext = SINGLE,
    config: TrainConfig | None = None,
) -> float:
    """One forward over the (local) batch, the loss over the gathered global batch, backward; returns the loss.

    Under ``context`` the gradients are this rank's part of the global batch's; :func:`train` sums them over ranks.
    """
    q, p = encode_batch(encoder, batch, bf16)
    distill = (*encode_distill(encoder, batch, bf16), batch["teacher"]) if "teacher" in batch else None
    return contrastive_backward(encoder, q, p, batch["exclude"], context, distill, config)


def grad_cache_loss(
    encoder: DenseEncoder, batch: Mapping[str, Any], bf16: bool, context: DistContext = SINGLE,
    config: TrainConfig | None = None,
) -> float:
    """GradCache: the full-batch loss and gradients, computed one chunk of texts at a time.

    Under ``context`` the cached embeddings of all ranks are gathered for the loss; each rank then replays only its
    own chunks with the gradient of the global loss with respect to its own embeddings.
    """
    device = encoder.device
    encoders = [(encoder.encode_query, batch["queries"]), (encoder.encode_passage, batch["passages"])]
    if "teacher" in batch:
        encoders += [(encoder.encode_query, batch["distill_queries"]),
                     (encoder.encode_passage, batch["distill_passages"])]
    reps: list[torch.Tensor] = []
    snapshots: list[list[_RngSnapshot]] = []
    with torch.no_grad():
        for encode, chunks in encoders:
            snaps, parts = [], []
            for chunk in chunks:
                snaps.append(_RngSnapshot(device))
                with encoder.autocast(bf16):
                    parts.append(encode(encoder.to_device(chunk)))
            snapshots.append(snaps)
            reps.append(torch.cat(parts).detach().requires_grad_())
    distill = (reps[2], reps[3], batch["teacher"]) if "teacher" in batch else None
    loss = step_loss(encoder, reps[0], reps[1], batch["exclude"], context, distill, config)
    loss.backward()
    for (encode, chunks), snaps, rep in zip(encoders, snapshots, reps, strict=True):
        offset = 0
        for chunk, snap in zip(chunks, snaps, strict=True):
            with snap.replay(), encoder.autocast(bf16):
                out = encode(encoder.to_device(chunk))
            out.backward(rep.grad[offset : offset + out.shape[0]])
            offset += out.shape[0]
    return float(loss.detach())


# --- checkpoints ---------------------------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, dir)`` under ``root``, oldest first (partial ones never get a final name)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
    return sorted(found)


def resumable_checkpoint(root: Path, resume: bool, error: type[Exception] | None = None) -> tuple[int, Path] | None:
    """The latest complete checkpoint under ``root`` after removing half-written ones (a killed run's); a directory
    that holds checkpoints is refused unless ``resume``, so two runs never mix (``error``: the class raised,
    :class:`TrainingStateError` by default)."""
    for stale in root.glob("step-*.tmp-*") if root.is_dir() else ():
        shutil.rmtree(stale)
    checkpoints = list_checkpoints(root)
    if checkpoints and not resume:
        raise (error or TrainingStateError)(
            f"{root} already holds checkpoints (latest step {checkpoints[-1][0]}); pass resume=True (--resume) to "
            "continue that run, or use a fresh output directory"
        )
    return checkpoints[-1] if checkpoints else None


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, for exact resumption."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    encoder: DenseEncoder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: Mapping[str, Any],
    keep: int,
) -> Path:
    """Write ``root/step-N`` atomically (model + optimizer + scheduler + RNG + step) and keep the last ``keep``."""
    target = root / f"step-{step:08d}"
    with atomic_directory(target) as tmp:
        encoder.save(tmp / "model")
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            **extra,
        }
        torch.save(state, tmp / STATE_FILE)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    logger.info("checkpoint: step %d -> %s", step, target)
    return target


def _comparable(train_config: TrainConfig) -> dict[str, Any]:
    """The fields a resumed or finished run must share (later-added fields only when set, see LATER_TRAIN_FIELDS)."""
    defaults = TrainConfig().to_dict()
    return {k: v for k, v in train_config.to_dict().items()
            if k not in OPERATIONAL_TRAIN_FIELDS and not (k in LATER_TRAIN_FIELDS and v == defaults[k])}


def _check_same_run(saved: Mapping[str, Any], expected: Mapping[str, Any], where: Path) -> None:
    for key in ("encoder_config", "train_config", "records_sha256", "teacher_sha256"):
        if saved.get(key) != expected.get(key):
            raise TrainingStateError(
                f"{where} was written by a different run ({key} differs: saved {saved.get(key)!r}, "
                f"now {expected.get(key)!r}); use a fresh output directory, or delete {where.parent} to start over"
            )


# --- training ------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(encoder: DenseEncoder, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases, norms and per-token weights (1-d parameters) get no weight decay.

    With ``config.freeze_embeddings`` the input embedding table is frozen here first (``requires_grad=False``): it
    then gets no gradient in backward, no AdamW moments, no update, and no share of the gradient all-reduce under
    torchrun (:func:`dense.distributed.all_reduce_gradients` skips parameters without a gradient, on every rank
    alike). Called again on an encoder loaded from a checkpoint it freezes the same table, so the optimizer's
    parameter groups match the saved optimizer state.
    """
    if config.freeze_embeddings:
        encoder.input_embedding_table().requires_grad_(False)
    decay = [p for p in encoder.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in encoder.parameters() if p.requires_grad and p.ndim < 2]
    if not decay and not no_decay:
        raise ValueError(
            f"nothing to train: every parameter of the {encoder.config.kind} encoder is frozen (freeze_embeddings "
            "on a static encoder leaves only learned_token_weights); set learned_token_weights = true or "
            "freeze_embeddings = false"
        )
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def apply_update(
    encoder: DenseEncoder, optimizer: torch.optim.Optimizer, config: TrainConfig, context: DistContext = SINGLE
) -> None:
    """Everything of a step after the backward pass: sum gradients over ranks, clip, step, clear the gradients."""
    all_reduce_gradients(encoder.parameters(), context)
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainable_parameters(encoder: DenseEncoder) -> int:
    """Number of parameter values that receive gradients (after :func:`make_optimizer` froze what it freezes)."""
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def total_steps(n_records: int, config: TrainConfig) -> int:
    steps_per_epoch = n_records // config.batch_size
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _read_validation_log(path: Path, last_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            if entry["step"] <= last_step:
                by_step[entry["step"]] = entry
    return [by_step[s] for s in sorted(by_step)]


def _run_validation(validate: Validate, encoder: DenseEncoder, step: int, log_path: Path) -> dict[str, float]:
    # fork_rng: validation must not shift the RNG stream of training (exact resumption).
    with torch.random.fork_rng(devices=[encoder.device] if encoder.device.type == "cuda" else []):
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in validate(encoder).items()}
    encoder.train()
    seconds = time.perf_counter() - start
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "seconds": round(seconds, 2), **metrics}) + "\n")
    logger.info("validation at step %d (%.1f s): %s", step, seconds,
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


def _restore_rng(state: Mapping[str, Any], context: DistContext) -> None:
    """This rank's RNG state from a checkpoint (rank 0's for checkpoints of a single-process run)."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) != context.world_size:
        logger.warning(
            "the checkpoint was written by a run with %d process(es), this one has %d: the model, optimizer and "
            "batches continue exactly, dropout masks do not", len(per_rank), context.world_size,
        )
    set_rng_state(per_rank[context.rank] if context.rank < len(per_rank) else per_rank[0])


def _latest_checkpoint(ckpt_root: Path, resume: bool, context: DistContext) -> tuple[int, Path] | None:
    """The checkpoint to resume from (rank 0 removes half-written ones first); every rank must see the same."""

    def clean_and_list() -> tuple[int, Path] | None:
        return resumable_checkpoint(ckpt_root, resume)

    latest = run_on_main(context, clean_and_list)
    mine = list_checkpoints(ckpt_root)
    seen = context.all_gather_object(mine[-1][0] if mine else None)
    if context.enabled and len(set(seen)) > 1:
        raise DistributedSetupError(
            f"the ranks see different checkpoints in {ckpt_root} (latest step per rank: {seen}); on several "
            "machines the output directory must be on a filesystem they share"
        )
    return latest


def train(
    encoder_config: EncoderConfig,
    train_config: TrainConfig,
    records: Sequence[TrainingRecord],
    passage_text: PassageText,
    out_dir: str | Path,
    validate: Validate | None = None,
    resume: bool = False,
    data_files: Sequence[str | Path] = (),
    device: str | torch.device | None = None,
    teacher_groups: Sequence[TeacherGroup] = (),
) -> Path:
    """Train and save the encoder to ``out_dir/model`` (with a manifest); return that directory.

    ``passage_text`` maps pid to text (a dict or a function). ``validate(encoder) -> {metric: value}`` only
    monitors: it runs every ``eval_every`` steps and at the end (on rank 0), and its numbers go to
    ``validation.jsonl`` and the manifest; the model saved is always the last step's (no checkpoint is selected on
    it). Give it held-out train queries, never an evaluation split. Checkpoints go to
    ``out_dir/checkpoints/step-N``; with ``resume`` the latest one is continued exactly, without it an existing
    checkpoint is an error. ``data_files`` are recorded (path, sha256) in the manifest. ``teacher_groups``
    (``dense.teacher_data``) are the distillation data that ``train_config.distill_batch_size`` > 0 draws from.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), every process calls this with the same arguments and trains its
    share of each global batch (see the module docstring); ``device`` ``None`` or ``"cuda"`` is the rank's own GPU.
    On several machines ``out_dir`` must be on a filesystem they share (checkpoints are written by rank 0 and read
    by all on resume).
    """
    context = init_distributed()
    out_dir = Path(out_dir)
    model_dir, ckpt_root = out_dir / "model", out_dir / "checkpoints"
    total = total_steps(len(records), train_config)
    identity = {
        "encoder_config": encoder_config.to_dict(),
        "train_config": _comparable(train_config),
        "records_sha256": records_fingerprint(records),
    }
    if train_config.distill_batch_size:
        check_distill_groups(teacher_groups, train_config, context.world_size)
        identity["teacher_sha256"] = records_fingerprint(teacher_groups)
    manifest_path = model_dir / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        _check_same_run(manifest, identity, manifest_path)
        logger.info("dense training: %s is up to date (%d steps); nothing to do", model_dir, manifest["steps"])
        return model_dir

    latest = _latest_checkpoint(ckpt_root, resume, context)
    if isinstance(passage_text, Mapping):
        check_passages_exist(records, passage_text)
        if train_config.distill_batch_size:
            check_group_passages(teacher_groups, passage_text)
    lookup = _passage_lookup(passage_text)
    device = context.resolve_device(device)
    warn_if_cpu_bf16_is_emulated(encoder_config, device)

    seed_everything(train_config.seed)
    start_step, elapsed, state = 0, 0.0, None
    if latest is not None:
        start_step, ckpt = latest
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        _check_same_run(state, identity, ckpt / STATE_FILE)
        encoder = load_encoder(ckpt / "model", device=device)
        elapsed = state["seconds"]
        logger.info("resuming from %s (step %d of %d)", ckpt, start_step, total)
    else:
        encoder = build_encoder(encoder_config, device=device)
    broadcast_parameters(encoder, context)
    if train_config.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
    encoder.train()

    optimizer = make_optimizer(encoder, train_config)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(train_config.warmup_ratio * total), total)
    loss_curve: list[dict[str, float]] = []
    window_loss, window_steps = 0.0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state, context)
        loss_curve = list(state.get("loss_curve", []))
        window_loss, window_steps = state.get("loss_window", (0.0, 0))

    dataset = TrainingBatches(records, lookup, encoder, train_config, context.rank, context.world_size,
                              teacher_groups if train_config.distill_batch_size else ())
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start_step, total),
        num_workers=train_config.num_workers,
        collate_fn=_identity,
        # Own generator: creating the iterator must not draw from the global RNG, or resumption would drift.
        generator=torch.Generator().manual_seed(train_config.seed),
    )
    step_fn = grad_cache_loss if train_config.grad_cache_chunk else full_batch_loss
    logger.info(
        "dense training: %d records (%s), %d steps (%d per epoch), batch %d x (1 + %d negatives)%s, %s, device %s, "
        "%.1fM of %.1fM parameters trained%s",
        len(records), source_counts(records), total, dataset.steps_per_epoch, train_config.batch_size,
        train_config.hard_negatives,
        f" over {context.world_size} processes (rank {context.rank})" if context.enabled else "",
        f"GradCache chunks of {train_config.grad_cache_chunk}" if train_config.grad_cache_chunk else "full batch",
        device, trainable_parameters(encoder) / 1e6, encoder.num_parameters() / 1e6,
        " (input embeddings frozen)" if train_config.freeze_embeddings else "",
    )
    if train_config.distill_batch_size:
        logger.info("distillation: %d teacher groups, %d per step x %d passages, weight %g", len(teacher_groups),
                    train_config.distill_batch_size, train_config.distill_passages, train_config.distill_weight)

    validation_log = out_dir / VALIDATION_LOG
    out_dir.mkdir(parents=True, exist_ok=True)
    window_start = time.perf_counter()
    run_start, last_loss, step = time.perf_counter(), float("nan"), start_step
    progress = tqdm(total=total, initial=start_step, desc="train dense", unit="step", disable=not context.is_main)
    for step, batch in zip(range(start_step + 1, total + 1), loader, strict=True):
        last_loss = step_fn(encoder, batch, train_config.bf16, context, train_config)
        apply_update(encoder, optimizer, train_config, context)
        scheduler.step()

        window_loss, window_steps = window_loss + last_loss, window_steps + 1
        lr = scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        if step % train_config.log_every == 0 or step == total:
            seconds = time.perf_counter() - window_start
            loss_curve.append({"step": step, "loss": window_loss / window_steps})
            if context.is_main:
                logger.info("step %d/%d loss %.4f lr %.3e %.1f queries/s", step, total, window_loss / window_steps,
                            lr, window_steps * train_config.batch_size / max(seconds, 1e-9))
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        if step % train_config.checkpoint_every == 0 and step < total:
            rngs = context.all_gather_object(rng_state())
            if context.is_main:
                extra = {**identity, "seconds": elapsed + time.perf_counter() - run_start, "rng_per_rank": rngs,
                         "loss_curve": loss_curve, "loss_window": (window_loss, window_steps)}
                save_checkpoint(ckpt_root, step, encoder, optimizer, scheduler, extra, train_config.keep_checkpoints)
            context.barrier()
        if validate is not None and train_config.eval_every and step % train_config.eval_every == 0 and step < total:
            if context.is_main:
                _run_validation(validate, encoder, step, validation_log)
            context.barrier()
    progress.close()

    seconds = elapsed + time.perf_counter() - run_start
    trained_now = total - start_step
    logger.info("dense training done: %d steps in %.1f s (this run: %d steps, %.1f queries/s)", total, seconds,
                trained_now, trained_now * train_config.batch_size / max(time.perf_counter() - run_start, 1e-9))
    if context.is_main:
        if validate is not None:
            _run_validation(validate, encoder, total, validation_log)
        manifest = {
            "stage": "dense_model",
            **identity,
            "train_config_full": train_config.to_dict(),
            "data": {
                "records": len(records),
                "sources": source_counts(records),
                "files": [{"path": str(f), "sha256": sha256_file(Path(f))} for f in data_files],
                "teacher_groups": len(teacher_groups) if train_config.distill_batch_size else 0,
            },
            "steps": total,
            "steps_per_epoch": dataset.steps_per_epoch,
            "trainable_parameters": trainable_parameters(encoder),
            "seconds": round(seconds, 1),
            "final_loss": last_loss,
            "loss_curve": loss_curve,
            "world_size": context.world_size,
            "validation": _read_validation_log(validation_log, total),
            "device": str(device),
            "versions": _versions(),
        }
        encoder.save(model_dir, manifest=manifest)
        logger.info("dense training: final model in %s", model_dir)
    context.barrier()
    return model_dir
