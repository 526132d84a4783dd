"""What every dense encoder shares: similarity, InfoNCE loss, saving, and batched numpy encoding.

Following Tevatron's ``EncoderModel``, encoding, similarity and loss are separate small methods so that pooling,
scoring and the loss can each change alone; ``build`` (training, from a pretrained LM) and ``load`` (inference,
from our own saved directory) are separate constructors implemented by the subclasses.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dense.atomic import atomic_directory
from dense.config import EncoderConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "encoder_config.json"
MANIFEST_FILE = "manifest.json"
Batch = dict[str, torch.Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, or CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_encoder_config(path: str | Path) -> EncoderConfig:
    """The ``EncoderConfig`` saved in a model directory by ``DenseEncoder.save``."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} is not a saved dense encoder; rerun the dense training stage "
            "(scripts/train_dense.py) or pass the directory that contains model/"
        )
    data = json.loads(file.read_text(encoding="utf-8"))
    return EncoderConfig.from_dict(data, where=str(file))


class DenseEncoder(nn.Module, abc.ABC):
    """A shared-weights bi-encoder: queries and passages go through the same model with their own prefix."""

    config: EncoderConfig

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.temperature = config.temperature

    # --- tokenization and encoding (subclasses) -------------------------------------------------------------
    @abc.abstractmethod
    def tokenize_queries(self, texts: Sequence[str]) -> Batch:
        """Model inputs (CPU tensors) for queries, with the query prefix and length."""

    @abc.abstractmethod
    def tokenize_passages(self, texts: Sequence[str]) -> Batch:
        """Model inputs (CPU tensors) for passages, with the passage prefix and length."""

    @abc.abstractmethod
    def encode_query(self, batch: Batch) -> torch.Tensor:
        """Query embeddings ``(n, dim)`` in float32, from a batch already on ``self.device``."""

    @abc.abstractmethod
    def encode_passage(self, batch: Batch) -> torch.Tensor:
        """Passage embeddings ``(n, dim)`` in float32, from a batch already on ``self.device``."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Embedding width."""

    @abc.abstractmethod
    def _save_model(self, directory: Path) -> None:
        """Write weights and tokenizer into ``directory`` (the config is written by ``save``)."""

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory during training; a no-op for models without layers."""

    @abc.abstractmethod
    def input_embedding_table(self) -> nn.Parameter:
        """The input token-embedding matrix ``(vocab, width)`` (what ``TrainConfig.freeze_embeddings`` freezes)."""

    # --- scoring and loss ------------------------------------------------------------------------------------
    def similarity(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Dot product of every query with every passage: ``(nq, np)`` (cosine when normalised)."""
        return q @ p.T

    def loss(
        self,
        scores: torch.Tensor,
        target: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """InfoNCE over in-batch and hard negatives.

        ``scores`` is ``(nq, np)``; passages are laid out as ``[pos, neg_1..neg_N]`` per query, so by default query
        ``i``'s positive is column ``i * (np // nq)`` and every other column is a negative. ``exclude`` (bool,
        same shape) masks columns that must not count as negatives (e.g. another copy of a known positive).
        """
        nq, n_passages = scores.shape
        if target is None:
            if n_passages % nq:
                raise ValueError(f"{n_passages} passages for {nq} queries: expected a multiple ([pos, negs...])")
            target = torch.arange(nq, device=scores.device) * (n_passages // nq)
        logits = scores.float() / self.temperature
        if exclude is not None:
            logits = logits.masked_fill(exclude, torch.finfo(logits.dtype).min)
        return F.cross_entropy(logits, target)

    def distillation_loss(self, scores: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(teacher || encoder) over each query's own group, summed over the groups (the caller divides).

        ``scores`` ``(n, g)``: the encoder's similarity of each query with its group's ``g`` passages; ``teacher``
        ``(n, g)``: the teacher's log-likelihoods of the same passages, softmaxed as they are (no temperature: the
        posterior of each passage under a uniform prior). The encoder's side uses the InfoNCE temperature, so both
        losses see the same distribution of the encoder.
        """
        log_student = F.log_softmax(scores.float() / self.temperature, dim=-1)
        log_teacher = F.log_softmax(teacher.float(), dim=-1)
        return F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")

    def _finish(self, reps: torch.Tensor) -> torch.Tensor:
        reps = reps.to(torch.float32)
        return F.normalize(reps, dim=-1) if self.config.normalize else reps

    # --- device and precision --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> Batch:
        """Move a tokenized batch to the model's device."""
        device = self.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on CUDA; on a CPU only with ``config.cpu_bf16`` (bf16 matmuls are emulated and slow on most
        CPUs, fast on those with native bf16)."""
        if enabled and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if enabled and self.device.type == "cpu" and self.config.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- inference helpers -----------------------------------------------------------------------------------
    def encode_queries(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embeddings ``(len(texts), dim)`` float32 for queries (no grad, eval mode, length-sorted batches)."""
        return self._encode_texts(texts, self.tokenize_queries, self.encode_query, batch_size, show_progress, "queries")

    def encode_passages(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embeddings ``(len(texts), dim)`` float32 for passages (no grad, eval mode, length-sorted batches)."""
        return self._encode_texts(
            texts, self.tokenize_passages, self.encode_passage, batch_size, show_progress, "passages"
        )

    def _encode_texts(
        self,
        texts: Sequence[str],
        tokenize: Callable[[Sequence[str]], Batch],
        encode: Callable[[Batch], torch.Tensor],
        batch_size: int,
        show_progress: bool,
        what: str,
    ) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; must be >= 1")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Longest first: batches of similar length waste little padding, and an out-of-memory shows at once.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), self.autocast():
                for start in tqdm(
                    range(0, len(order), batch_size), desc=f"encode {what}", unit="batch", disable=not show_progress
                ):
                    idx = order[start : start + batch_size]
                    batch = self.to_device(tokenize([texts[i] for i in idx]))
                    out[idx] = encode(batch).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # --- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: str | Path, manifest: Mapping[str, Any] | None = None) -> Path:
        """Write config, tokenizer and weights (and an optional manifest) into ``directory``, atomically."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self._save_model(tmp)
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
            if manifest is not None:
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        logger.debug("saved %s encoder to %s", self.config.kind, directory)
        return directory

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

