"""The transformer bi-encoder over any Hugging Face model, and ``load_encoder`` for every saved encoder kind.

Encoder models (BERT, MiniLM) use mean or CLS pooling; decoder LLMs (SmolLM2, Qwen) use last-token pooling over an
appended EOS, or mean pooling. Batches are padded on the right: with causal attention the real tokens then never
see padding and keep positions 0..n-1, so a text's embedding does not depend on what it was batched with (left
padding would shift the rotary positions of shorter texts). ``attention = "bidirectional"`` lifts the causal mask
of a decoder LLM; the padding mask still hides the padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from dense.config import EncoderConfig
from dense.encoder_base import Batch, DenseEncoder, read_encoder_config, resolve_device
from dense.pooling import pool
from dense.static_encoder import StaticEmbeddingEncoder

logger = logging.getLogger(__name__)


def truncate_layers(hf_config: PretrainedConfig, num_layers: int, source: str) -> PretrainedConfig:
    """Set ``hf_config`` to keep only the first ``num_layers`` layers (weights of later layers are then not loaded)."""
    total = getattr(hf_config, "num_hidden_layers", None)
    if total is None:
        raise ValueError(f"{source}: its config has no num_hidden_layers, so num_layers cannot be applied")
    if num_layers > total:
        raise ValueError(f"num_layers={num_layers} but {source} has only {total} layers")
    hf_config.num_hidden_layers = num_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if isinstance(layer_types, list):  # per-layer attention kinds (Qwen, Gemma): keep the list's length in step
        hf_config.layer_types = layer_types[:num_layers]
    return hf_config


def load_backbone(source: str, hf_config: PretrainedConfig, num_layers: int | None) -> PreTrainedModel:
    """``AutoModel`` weights for ``hf_config``; with truncated layers the dropped layers' weights are skipped.

    Transformers reports every skipped weight as UNEXPECTED in a long table; we silence it and report instead what
    matters: weights the truncated model needed but did not find.
    """
    if num_layers is None:
        return AutoModel.from_pretrained(source, config=hf_config, dtype=torch.float32)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backbone, info = AutoModel.from_pretrained(
            source, config=hf_config, dtype=torch.float32, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(previous)
    if info.get("missing_keys"):
        logger.warning("%s: weights not found, randomly initialised: %s", source, sorted(info["missing_keys"]))
    logger.info("%s: kept the first %d layers (%d dropped weights)", source, num_layers, len(info["unexpected_keys"]))
    return backbone


def make_bidirectional(backbone: PreTrainedModel, source: str) -> None:
    """Lift a decoder LLM's causal mask. ``config.is_causal = False`` is what transformers 5 reads: it builds a
    padding-only mask and passes ``is_causal=False`` to the attention kernel. Each attention module's own
    ``is_causal`` flag, which the SDPA integration falls back to when no such argument arrives, is cleared as well.
    Set on every build and load, since modules are created causal."""
    flagged = [m for m in backbone.modules() if hasattr(m, "is_causal")]
    if not flagged:
        raise ValueError(f"attention='bidirectional', but {source} has no attention module with an is_causal flag")
    backbone.config.is_causal = False
    for module in flagged:
        module.is_causal = False


def prepare_tokenizer(tokenizer: Any, config: EncoderConfig, source: str) -> Any:
    """Right padding, a pad token for decoder tokenizers that lack one, and an EOS where last pooling needs it."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"the tokenizer of {source} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
        logger.info("tokenizer of %s has no pad token; padding with %r (masked out)", source, fallback)
    if config.pooling == "last" and config.append_eos and tokenizer.eos_token_id is None:
        raise ValueError(
            f"pooling='last' with append_eos=True but the tokenizer of {source} has no EOS token; "
            "set append_eos = false or use another model"
        )
    return tokenizer


class BiEncoder(DenseEncoder):
    """Shared-weights transformer bi-encoder (``AutoModel`` backbone + pooling + optional L2 normalisation)."""

    def __init__(self, backbone: PreTrainedModel, tokenizer: Any, config: EncoderConfig) -> None:
        if config.kind != "transformer":
            raise ValueError(f"BiEncoder needs kind='transformer', got {config.kind!r}")
        super().__init__(config)
        self.backbone = backbone
        self.tokenizer = tokenizer
        if hasattr(backbone.config, "use_cache"):
            backbone.config.use_cache = False  # no generation: a KV cache only costs memory
        if config.attention == "bidirectional":
            make_bidirectional(backbone, config.model_name_or_path)

    @classmethod
    def build(cls, config: EncoderConfig, device: str | torch.device | None = None) -> BiEncoder:
        """A new encoder for training, from the pretrained LM ``config.model_name_or_path``."""
        source = config.model_name_or_path
        hf_config = AutoConfig.from_pretrained(source)
        if config.num_layers is not None:
            hf_config = truncate_layers(hf_config, config.num_layers, source)
        backbone = load_backbone(source, hf_config, config.num_layers)
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source), config, source)
        encoder = cls(backbone, tokenizer, config).to(resolve_device(device))
        logger.info(
            "built %s encoder from %s: %d layers, dim %d, %.1fM parameters, pooling=%s",
            config.kind, source, getattr(hf_config, "num_hidden_layers", -1), encoder.dim,
            encoder.num_parameters() / 1e6, config.pooling,
        )
        return encoder

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> BiEncoder:
        """An encoder saved by ``save`` (layers already truncated, weights trained)."""
        config = read_encoder_config(path)
        backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(path)), config, str(path))
        return cls(backbone, tokenizer, config).to(resolve_device(device))

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    def enable_gradient_checkpointing(self) -> None:
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def input_embedding_table(self) -> torch.nn.Parameter:
        return self.backbone.get_input_embeddings().weight

    def tokenize_queries(self, texts: Sequence[str]) -> Batch:
        return self._tokenize(texts, self.config.query_prefix, self.config.query_max_len)

    def tokenize_passages(self, texts: Sequence[str]) -> Batch:
        return self._tokenize(texts, self.config.passage_prefix, self.config.passage_max_len)

    def _tokenize(self, texts: Sequence[str], prefix: str, max_len: int) -> Batch:
        texts = [prefix + t for t in texts]
        tok = self.tokenizer
        if self.config.pooling == "last" and self.config.append_eos:
            eos = tok.eos_token_id
            ids = tok(texts, truncation=True, max_length=max_len - 1)["input_ids"]
            ids = [x if x and x[-1] == eos else [*x, eos] for x in ids]
            encoded = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        else:
            encoded = tok(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _encode(self, batch: Batch) -> torch.Tensor:
        hidden = self.backbone(**batch, return_dict=True).last_hidden_state
        return self._finish(pool(self.config.pooling, hidden, batch["attention_mask"]))

    def encode_query(self, batch: Batch) -> torch.Tensor:
        return self._encode(batch)

    def encode_passage(self, batch: Batch) -> torch.Tensor:
        return self._encode(batch)

    def _save_model(self, directory: Path) -> None:
        self.backbone.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def load_encoder(path: str | Path, device: str | torch.device | None = None) -> BiEncoder | StaticEmbeddingEncoder:
    """Load any saved dense encoder, picking the class from its saved config's ``kind``."""
    kind = read_encoder_config(path).kind
    if kind == "static":
        return StaticEmbeddingEncoder.load(path, device=device)
    return BiEncoder.load(path, device=device)


def build_encoder(
    config: EncoderConfig, device: str | torch.device | None = None
) -> BiEncoder | StaticEmbeddingEncoder:
    """A new encoder for training, of the class named by ``config.kind``."""
    if config.kind == "static":
        return StaticEmbeddingEncoder.build(config, device=device)
    return BiEncoder.build(config, device=device)
