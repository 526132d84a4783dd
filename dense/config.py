"""Configuration of the dense encoder and of its training, as frozen dataclasses.

Both are loaded from plain dicts (a TOML section, a JSON object) through ``from_dict``, which rejects unknown keys
so that a typo in a config file fails loudly instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T", bound="_DictConfig")

POOLINGS = ("mean", "cls", "last")
KINDS = ("transformer", "static")
ATTENTIONS = ("causal", "bidirectional")


class ConfigError(ValueError):
    """A config dict has an unknown key, a missing key or a value of the wrong type or range."""


def _check_type(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a (simple) annotation: builtins, ``X | None`` and ``Literal``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return value in get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, arg) for arg in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


@dataclasses.dataclass(frozen=True)
class _DictConfig:
    @classmethod
    def from_dict(cls: type[T], d: Mapping[str, Any], where: str = "") -> T:
        """Build from a dict, rejecting unknown keys and values of the wrong type.

        ``where`` names the source (e.g. ``"configs/dense.toml [encoder]"``) for error messages.
        """
        where = f" in {where}" if where else ""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {unknown}{where}; allowed keys are {sorted(names)}"
            )
        values = dict(d)
        for name, value in values.items():
            if isinstance(value, int) and not isinstance(value, bool) and hints[name] is float:
                values[name] = float(value)
            elif not _check_type(value, hints[name]):
                raise ConfigError(
                    f"{cls.__name__}.{name}{where}: {value!r} is not a valid {hints[name]}"
                )
        try:
            return cls(**values)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{cls.__name__}{where}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (JSON/TOML-serialisable)."""
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed, validated like ``from_dict``."""
        return type(self).from_dict({**self.to_dict(), **changes})


@dataclasses.dataclass(frozen=True)
class EncoderConfig(_DictConfig):
    """What the bi-encoder is: backbone, pooling, prefixes, lengths and the InfoNCE temperature."""

    model_name_or_path: str
    """HF model name or local directory (a general LM: BERT, MiniLM, SmolLM2, ...; never a retrieval model)."""
    kind: Literal["transformer", "static"] = "transformer"
    """``transformer``: full model forward; ``static``: bag of the LM's input token embeddings."""
    pooling: Literal["mean", "cls", "last"] = "mean"
    """``mean`` over real tokens; ``cls`` first real token (BERT); ``last`` last real token (decoder LLMs)."""
    append_eos: bool = True
    """With ``last`` pooling: append the tokenizer's EOS so the pooled token has seen the whole text."""
    normalize: bool = True
    """L2-normalise embeddings (cosine similarity) instead of a raw dot product."""
    query_prefix: str = ""
    passage_prefix: str = ""
    query_max_len: int = 32
    passage_max_len: int = 128
    num_layers: int | None = None
    """Keep only the first N transformer layers of the backbone (None: all)."""
    temperature: float = 0.05
    """InfoNCE softmax temperature: scores are divided by it before the cross-entropy."""
    embed_dim: int | None = None
    """Static encoder only: reduce the embedding table to this many PCA dimensions (None: keep the LM's width)."""
    learned_token_weights: bool = False
    """Static encoder only: learn one scalar weight per vocabulary token (a learned IDF)."""
    attention: Literal["causal", "bidirectional"] = "causal"
    """Transformer only: ``bidirectional`` lifts a decoder LLM's causal mask, so every token attends to the whole text
    (padding stays masked), as LLM2Vec and NV-Embed do; ``causal`` keeps the model as pretrained. Encoder models (BERT)
    are bidirectional either way."""
    cpu_bf16: bool = False
    """bf16 autocast on a CPU too (training, corpus and query encoding; weights and optimizer state stay float32).
    Only worth it on a CPU with native bf16 (AVX512-BF16 or AMX): elsewhere bf16 is emulated and slower (E10, E29).
    Off by default; CUDA uses bf16 autocast whenever ``TrainConfig.bf16`` is on, whatever this says."""

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ConfigError("EncoderConfig.model_name_or_path is empty; name an HF model or a local directory")
        if self.kind not in KINDS:
            raise ConfigError(f"EncoderConfig.kind={self.kind!r}; expected one of {KINDS}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"EncoderConfig.pooling={self.pooling!r}; expected one of {POOLINGS}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"EncoderConfig.attention={self.attention!r}; expected one of {ATTENTIONS}")
        if self.kind == "static" and self.attention != "causal":
            raise ConfigError("EncoderConfig.attention applies to kind='transformer' only; the static encoder has none")
        for name in ("query_max_len", "passage_max_len"):
            if getattr(self, name) < 2:
                raise ConfigError(f"EncoderConfig.{name}={getattr(self, name)}; must be at least 2 tokens")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"EncoderConfig.num_layers={self.num_layers}; must be >= 1 or None")
        if self.temperature <= 0:
            raise ConfigError(f"EncoderConfig.temperature={self.temperature}; must be > 0")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError(f"EncoderConfig.embed_dim={self.embed_dim}; must be >= 1 or None")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_DictConfig):
    """How the bi-encoder is trained (InfoNCE with in-batch and hard negatives)."""

    lr: float = 2e-5
    warmup_ratio: float = 0.1
    """Fraction of the total optimizer steps spent in linear warm-up (then linear decay to 0)."""
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    batch_size: int = 32
    """Queries per optimizer step; every query sees all passages of the batch as negatives."""
    grad_cache_chunk: int | None = None
    """GradCache: encode the batch in chunks of this many texts so a large batch fits in memory; the loss and the
    gradients are the same as with the full batch (None: one forward over the whole batch)."""
    hard_negatives: int = 7
    """Hard negatives per query per step, sampled from the record's negatives (passages = 1 + this per query)."""
    epochs: float = 1.0
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``epochs``)."""
    seed: int = 13
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int | None = None
    """Call the ``validate`` callback every N steps (and at the end); None: only at the end."""
    log_every: int = 50
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    gradient_checkpointing: bool = False
    freeze_embeddings: bool = False
    """Keep the backbone's input embedding table (the static encoder's: its token vectors) fixed and train only the
    rest. That table is most of the parameters of a small or truncated LM (SmolLM2-135M cut to 2 layers: 49152 x 576
    = 28M of ~35M), and every step pays for its gradient, its two AdamW moments and its update in time and memory;
    frozen, it gets none of them. It changes the trained model, so it is compared on resume like ``lr``."""
    num_workers: int = 0
    """DataLoader workers that tokenize batches in the background."""
    distill_batch_size: int = 0
    """Teacher groups per step (``dense.teacher_data``), besides the ``batch_size`` contrastive queries: each adds a
    KL term between the teacher's distribution over its passages and the encoder's (0: no distillation)."""
    distill_passages: int = 8
    """Passages per teacher group per step, sampled from the group (every group must have at least this many)."""
    distill_weight: float = 1.0
    """Weight of the distillation term against the contrastive loss."""

    def __post_init__(self) -> None:
        positive = ("lr", "batch_size", "epochs", "checkpoint_every", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)}; must be > 0")
        for name in ("grad_cache_chunk", "max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"TrainConfig.{name}={value}; must be > 0 or None")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"TrainConfig.warmup_ratio={self.warmup_ratio}; must be in [0, 1)")
        if self.hard_negatives < 0 or self.num_workers < 0 or self.weight_decay < 0:
            raise ConfigError("TrainConfig.hard_negatives, num_workers and weight_decay must be >= 0")
        if self.distill_batch_size < 0 or self.distill_weight < 0:
            raise ConfigError("TrainConfig.distill_batch_size and distill_weight must be >= 0")
        if self.distill_passages < 2:
            raise ConfigError(f"TrainConfig.distill_passages={self.distill_passages}; must be >= 2 (a group compares "
                              "passages)")


# Fields that may change between a checkpoint and its resumption without changing what is computed
# (``max_steps``/``epochs`` are not among them: they set the learning-rate schedule).
OPERATIONAL_TRAIN_FIELDS = frozenset({"checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "num_workers"})
# Fields added after models and checkpoints were first written: compared only when not at their default, so that a
# run from before a field existed (which trained as its default does) still matches and resumes.
LATER_TRAIN_FIELDS = frozenset({"freeze_embeddings", "distill_batch_size", "distill_passages", "distill_weight"})
