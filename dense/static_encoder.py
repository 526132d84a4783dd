"""A static-embedding encoder: the (weighted) mean of a pretrained LM's input token embeddings.

No attention, so it encodes thousands of passages per second on one CPU core. It starts from the LM's input
embedding table (optionally reduced by PCA to ``embed_dim``) and is trained with the same InfoNCE loss as the
transformer encoder. Batches are flat token ids plus bag offsets (``nn.EmbeddingBag``), so there is no padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from dense.config import EncoderConfig
from dense.encoder_base import Batch, DenseEncoder, read_encoder_config, resolve_device

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "static_encoder.safetensors"


def pca_reduce(table: torch.Tensor, dim: int) -> torch.Tensor:
    """Project the rows of ``table`` (vocab, width) onto its top ``dim`` principal components (deterministic)."""
    width = table.shape[1]
    if dim > width:
        raise ValueError(f"embed_dim={dim} exceeds the embedding width {width}")
    centred = table.to(torch.float64) - table.to(torch.float64).mean(dim=0)
    _, eigvecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    top = eigvecs[:, -dim:].flip(1)
    return (centred @ top).to(torch.float32)


class StaticEmbeddingEncoder(DenseEncoder):
    """Mean of token embeddings (``nn.EmbeddingBag``), with optional learned per-token weights."""

    def __init__(self, embeddings: torch.Tensor, tokenizer: Any, config: EncoderConfig) -> None:
        if config.kind != "static":
            raise ValueError(f"StaticEmbeddingEncoder needs kind='static', got {config.kind!r}")
        super().__init__(config)
        self.tokenizer = tokenizer
        vocab = len(tokenizer)
        if embeddings.shape[0] < vocab:
            raise ValueError(f"embedding table has {embeddings.shape[0]} rows but the tokenizer has {vocab} tokens")
        self.embedding = nn.EmbeddingBag.from_pretrained(embeddings.to(torch.float32), freeze=False, mode="sum")
        self.token_weight = (
            nn.Parameter(torch.ones(embeddings.shape[0])) if config.learned_token_weights else None
        )

    @classmethod
    def from_embedding_table(
        cls,
        table: torch.Tensor,
        tokenizer: Any,
        config: EncoderConfig,
        device: str | torch.device | None = None,
    ) -> StaticEmbeddingEncoder:
        """A new encoder from an embedding table ``(vocab, width)``, PCA-reduced when ``config.embed_dim`` asks."""
        table = table.detach().to(torch.float32)
        if config.embed_dim is not None and config.embed_dim != table.shape[1]:
            table = pca_reduce(table, config.embed_dim)
        return cls(table, tokenizer, config).to(resolve_device(device))

    @classmethod
    def build(cls, config: EncoderConfig, device: str | torch.device | None = None) -> StaticEmbeddingEncoder:
        """A new encoder for training, from the input embedding table of ``config.model_name_or_path``."""
        source = config.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source, dtype=torch.float32)
        table = model.get_input_embeddings().weight.detach().clone()
        del model
        encoder = cls.from_embedding_table(table, tokenizer, config, device=device)
        logger.info("built static encoder from %s: vocab %d, dim %d", source, table.shape[0], encoder.dim)
        return encoder

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> StaticEmbeddingEncoder:
        """An encoder saved by ``save``."""
        path = Path(path)
        config = read_encoder_config(path)
        weights = load_file(str(path / WEIGHTS_FILE))
        encoder = cls(weights["embedding.weight"], AutoTokenizer.from_pretrained(str(path)), config)
        encoder.load_state_dict(weights, strict=True)
        return encoder.to(resolve_device(device))

    @property
    def dim(self) -> int:
        return int(self.embedding.weight.shape[1])

    def input_embedding_table(self) -> nn.Parameter:
        """The bag's token vectors (the learned per-token weights are separate and stay trainable)."""
        return self.embedding.weight

    def tokenize_queries(self, texts: Sequence[str]) -> Batch:
        return self._tokenize(texts, self.config.query_prefix, self.config.query_max_len)

    def tokenize_passages(self, texts: Sequence[str]) -> Batch:
        return self._tokenize(texts, self.config.passage_prefix, self.config.passage_max_len)

    def _tokenize(self, texts: Sequence[str], prefix: str, max_len: int) -> Batch:
        ids = self.tokenizer(
            [prefix + t for t in texts], add_special_tokens=False, truncation=True, max_length=max_len
        )["input_ids"]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        offsets = torch.zeros(len(ids), dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)[:-1]
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
        return {"input_ids": flat, "offsets": offsets, "lengths": lengths}

    def _encode(self, batch: Batch) -> torch.Tensor:
        ids, lengths = batch["input_ids"], batch["lengths"]
        # Per-token weight 1/len(bag) turns the bag sum into a mean (empty texts stay zero vectors).
        weights = (1.0 / lengths.clamp(min=1).to(torch.float32)).repeat_interleave(lengths, output_size=ids.shape[0])
        if self.token_weight is not None:
            weights = weights * self.token_weight[ids]
        bags = self.embedding(ids, batch["offsets"], per_sample_weights=weights)
        return self._finish(bags)

    def encode_query(self, batch: Batch) -> torch.Tensor:
        return self._encode(batch)

    def encode_passage(self, batch: Batch) -> torch.Tensor:
        return self._encode(batch)

    def _save_model(self, directory: Path) -> None:
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE))
        self.tokenizer.save_pretrained(directory)
