"""A cross-encoder reranker: the query and a passage read together by a pretrained LM with a one-logit score head.

``score(query, passages) -> np.ndarray`` (higher = more relevant), the shape of
:class:`~fusion.query_likelihood.QueryLikelihoodScorer`, so :class:`hybrid.rerank.RerankingSearcher` takes either.
The model is ``AutoModelForSequenceClassification`` with ``num_labels = 1``: for a BERT-style encoder the head
reads the ``[CLS]`` vector of ``[CLS] query [SEP] passage [SEP]``; for a decoder LM (SmolLM2, Llama) it reads the
last token of ``query + passage`` (so the tokenizer pads on the right with a known pad id). It is trained from a
general pretrained LM by :mod:`fusion.cross_encoder_training`; :meth:`CrossEncoderScorer.build` puts a fresh head on
one, :meth:`CrossEncoderScorer.from_dir` loads a trained one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CONFIG_FILE = "cross_encoder.json"


@dataclass(frozen=True)
class CrossEncoderConfig:
    """How pairs are read: their length in tokens, the batch size, and bf16 on a GPU."""

    max_length: int = 192  # query + passage + special tokens; the longer of the two is cut first (the passage)
    batch_size: int = 32
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)

    def __post_init__(self) -> None:
        if self.max_length < 8 or self.batch_size < 1:
            raise ValueError(f"max_length must be >= 8 and batch_size >= 1: {self}")


class CrossEncoderScorer:
    """``score(query, passages) -> np.ndarray`` of relevance logits (float64, one per passage)."""

    def __init__(self, model: Any, tokenizer: Any, config: CrossEncoderConfig = CrossEncoderConfig(),
                 device: Any = None) -> None:
        import torch

        self._torch = torch
        if device is None:  # the GPU when there is one, else where the model is
            device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = _prepare_tokenizer(tokenizer, model)
        self.config = config
        # a decoder's score head reads the text's last token; a separator keeps query and passage apart
        self._joiner = "" if self.tokenizer.sep_token else "\n"

    @classmethod
    def build(cls, base_model: str | Path, config: CrossEncoderConfig = CrossEncoderConfig(),
              device: Any = None, seed: int = 0) -> CrossEncoderScorer:
        """A new scorer for training: the pretrained LM ``base_model`` with a freshly initialised score head."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)  # the new head's initial weights
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights were newly initialized": the score head, as intended
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(base_model), num_labels=1, dtype=torch.float32
            )
        finally:
            hf_logging.set_verbosity(previous)
        logger.info("cross-encoder from %s: %.1fM parameters, a new score head", base_model,
                    sum(p.numel() for p in model.parameters()) / 1e6)
        return cls(model, tokenizer, config, device=device)

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: CrossEncoderConfig | None = None,
                 device: Any = None) -> CrossEncoderScorer:
        """Load a trained scorer saved by :meth:`save`; ``config`` defaults to the one it was trained with."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = Path(model_dir)
        saved = read_cross_encoder_config(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        return cls(model, tokenizer, config or saved, device=device)

    # ---- scoring -------------------------------------------------------------------------------------------
    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, Any]:
        """Model inputs for the pairs ``(queries[i], passages[i])`` on the scorer's device."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        if any(not q.strip() for q in queries):
            raise ValueError("a query is empty or whitespace only")
        first = [q.strip() + self._joiner for q in queries]
        encoded = self.tokenizer(first, list(passages), truncation="longest_first", max_length=self.config.max_length,
                                 padding=True, return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v.to(self.device) for k, v in encoded.items() if k in keep}

    def logits(self, batch: Mapping[str, Any]) -> Any:
        """``(n,)`` float32 relevance logits of a tokenized batch (with a graph when gradients are on)."""
        with self.autocast():
            return self.model(**batch).logits.squeeze(-1).float()

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Relevance logit of ``query`` with each passage; float64, one per passage, higher = more relevant."""
        out = np.empty(len(passages), dtype=np.float64)
        size = self.config.batch_size
        with self._torch.inference_mode():
            for start in range(0, len(passages), size):
                chunk = list(passages[start : start + size])
                out[start : start + len(chunk)] = self.logits(self.tokenize([query] * len(chunk), chunk)).cpu().numpy()
        return out

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.config.bf16 and self.device.type == "cuda":
            with self._torch.autocast("cuda", dtype=self._torch.bfloat16):
                yield
        else:
            yield

    # ---- persistence ---------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, record: Mapping[str, Any] | None = None) -> Path:
        """Write model, tokenizer, the config and ``record`` (e.g. how it was trained) atomically into ``out_dir``."""
        from dense.atomic import atomic_directory

        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            text = json.dumps({"config": asdict(self.config), **(record or {})}, indent=2, default=str)
            (tmp / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
        return out_dir


def read_cross_encoder_config(model_dir: str | Path) -> CrossEncoderConfig:
    """The config a cross-encoder directory was saved with; a clear error when it is not one."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a trained cross-encoder (no {CONFIG_FILE}); train one with "
            "scripts/train_cross_encoder.py or the pipeline's rerank stage with rerank.scorer = \"cross_encoder\""
        )
    return CrossEncoderConfig(**json.loads(path.read_text(encoding="utf-8"))["config"])


def _prepare_tokenizer(tokenizer: Any, model: Any) -> Any:
    """Right padding with a pad token the model knows (decoder LMs often have none: their EOS then pads)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


__all__ = ["CONFIG_FILE", "CrossEncoderConfig", "CrossEncoderScorer", "read_cross_encoder_config"]
