"""Query generation as a throughput job: the shared prompt prefix runs once, passages are bucketed by length.

A few-shot prompt is mostly the same for every passage: system turn, instruction and example turns (~300-450 tokens
with SmolLM2's chat template) come before the passage (~80 tokens). :class:`PrefixCachedGenerator` uses prompts whose
example sets are fixed (``PromptConfig.num_prefixes``), computes each prefix's keys and values once, and for a batch
of passages runs only their own tokens (left-padded after the cached prefix) and the new tokens. Passages are
grouped by prefix and sorted by length before batching, so padding is small. Prefill of the passage tokens is then
the floor of the cost (~0.27 GFLOP per token for SmolLM2-135M).

Decoding is a plain loop with sampling per row from its own ``torch.Generator`` seeded by ``(seed, pid, i)``: a
passage gets the same query whatever batch it lands in (up to float noise), so a resumed or re-planned run agrees
with an uninterrupted one. A row stops at end-of-turn or at the end of its first non-empty line (a query is one
line), and finished rows leave the batch.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Iterator
from typing import Any


from dense.querygen.generator import QueryGenerator, clean_query, dedupe_queries
from dense.querygen.prompt import PromptParts
from dense.querygen.records import GeneratedQueries

logger = logging.getLogger(__name__)

ENGINE = "prefix-cached-v1"
PLAN_CHUNK_BATCHES = 32  # passages are bucketed by prefix and length within chunks of this many batches


class PrefixCachedGenerator(QueryGenerator):
    """:class:`QueryGenerator` with the prompt prefix computed once per example set and length-bucketed batches.

    Needs ``PromptConfig.num_prefixes > 0`` (a per-passage example draw shares no prefix).
    """

    def _setup(self) -> None:
        if self.prompt.config.num_prefixes < 1:
            raise ValueError("PrefixCachedGenerator needs PromptConfig.num_prefixes >= 1 (fixed example sets)")
        import torch
        from transformers import DynamicCache

        self._torch = torch
        self._dynamic_cache = DynamicCache
        self._decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        self._lm_head = self.model.get_output_embeddings()
        params = inspect.signature(self._decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self._prefix_kv: dict[str, tuple[int, list[tuple[Any, Any]]]] = {}
        self._stop_ids, self._newline_ids, self._blank_ids = _special_token_sets(self.tokenizer)

    def fingerprint(self) -> str:
        payload = {"base": super().fingerprint(), "engine": ENGINE}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "engine": ENGINE, "fingerprint": self.fingerprint()}

    # ---- planning --------------------------------------------------------------------------------------------
    def _ids(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def plan(self, passages: list[tuple[str, str]]) -> list[list[tuple[str, PromptParts, list[int]]]]:
        """Batches of ``(pid, prompt parts, suffix token ids)``: one prefix per batch, similar lengths together."""
        groups: dict[str, list[tuple[str, PromptParts, list[int]]]] = {}
        for pid, text in passages:
            parts = self.prompt.render_parts(pid, text, self.tokenizer)
            groups.setdefault(parts.prefix, []).append((pid, parts, self._ids(parts.suffix)))
        batches = []
        size = self.config.batch_size
        for prefix in sorted(groups, key=lambda p: (groups[p][0][1].prefix_id, p)):
            rows = sorted(groups[prefix], key=lambda r: (len(r[2]), r[0]))
            batches.extend(rows[i:i + size] for i in range(0, len(rows), size))
        return batches

    # ---- model calls -----------------------------------------------------------------------------------------
    def _prefix(self, text: str) -> tuple[int, list[tuple[Any, Any]]]:
        """``(length, per-layer (keys, values))`` of a prompt prefix, computed on first use."""
        if text not in self._prefix_kv:
            ids = self._ids(text, special=self.template == "plain")
            with self._torch.inference_mode():
                out = self._decoder(input_ids=self._torch.tensor([ids], device=self.device), use_cache=True)
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            self._prefix_kv[text] = (len(ids), [(layer.keys, layer.values) for layer in cache.layers])
        return self._prefix_kv[text]

    def _cache_for(self, kv: list[tuple[Any, Any]], batch: int, capacity: int):
        """A cache for ``batch`` rows holding the prefix, with room for ``capacity`` positions in all."""
        cache = self._dynamic_cache(config=self.model.config)
        cache.layers = [_preallocated_layer(capacity) for _ in kv]
        for i, (k, v) in enumerate(kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return cache

    def _forward(self, ids, mask, positions, cache):
        hidden = self._decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                               **{self._cache_kwarg: cache}, use_cache=True).last_hidden_state
        return self._lm_head(hidden[:, -1]).float()

    def _sample(self, logits, generators: list[Any]):
        torch = self._torch
        if not self.config.do_sample:
            return logits.argmax(-1)
        # on the CPU whatever the model's device: each row samples from its own CPU torch.Generator, so a passage's
        # query is the same on every device (one (rows x vocab) copy per step)
        probs = torch.softmax(logits.float().cpu() / self.config.temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # nucleus: keep the smallest head whose mass reaches top_p (the first token always stays)
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) > self.config.top_p] = 0.0
        picks = torch.stack([torch.multinomial(sorted_probs[i], 1, generator=g) for i, g in enumerate(generators)])
        return order.gather(1, picks).squeeze(1)

    def _row_seed(self, pid: str, i: int) -> int:
        return int(hashlib.sha256(f"{self.config.seed}:{pid}:{i}".encode()).hexdigest()[:15], 16)

    def generate_rows(self, batch: list[tuple[str, PromptParts, list[int]]]) -> list[GeneratedQueries]:
        """One planned batch (one prefix) -> a record per passage."""
        torch = self._torch
        prefixes = {parts.prefix for _, parts, _ in batch}
        if len(prefixes) != 1:
            raise ValueError(f"a planned batch must share one prompt prefix, got {len(prefixes)}")
        prefix_len, kv = self._prefix(prefixes.pop())
        n = self.config.num_queries_per_passage
        rows, width = len(batch), max(len(ids) for _, _, ids in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((rows, width), pad, dtype=torch.long)
        suffix_mask = torch.zeros((rows, width), dtype=torch.long)
        for r, (_, _, suffix) in enumerate(batch):  # left padding: every row ends where generation starts
            ids[r, width - len(suffix):] = torch.tensor(suffix)
            suffix_mask[r, width - len(suffix):] = 1
        positions = prefix_len + (suffix_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((rows, prefix_len), dtype=torch.long), suffix_mask], 1)
        next_pos = prefix_len + suffix_mask.sum(1)
        with torch.inference_mode():
            capacity = prefix_len + width + self.config.max_new_tokens
            cache = self._cache_for(kv, rows, capacity)
            logits = self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), cache)
            if n > 1:  # n samples per passage share the passage's prefill
                cache.batch_repeat_interleave(n)
                logits, mask, next_pos = (t.repeat_interleave(n, 0) for t in (logits, mask, next_pos))
            pids = [pid for pid, _, _ in batch for _ in range(n)]
            generators = [torch.Generator().manual_seed(self._row_seed(pid, i % n)) for i, pid in enumerate(pids)]
            tokens = self._decode(logits, mask, next_pos, cache, generators)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        records = []
        for r, (pid, parts, _) in enumerate(batch):
            raw = tuple(texts[r * n:(r + 1) * n])
            records.append(GeneratedQueries(pid=pid, queries=dedupe_queries(clean_query(t) for t in raw), raw=raw,
                                            example_qids=parts.example_qids))
        return records

    def _decode(self, logits, mask, next_pos, cache, generators: list[Any]) -> list[list[int]]:
        """Sample up to ``max_new_tokens`` per row; rows leave the batch when they stop."""
        torch = self._torch
        total = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(total)]
        has_text = [False] * total
        done = [False] * total
        active = list(range(total))  # original row index of each row still in the batch
        for step in range(self.config.max_new_tokens):
            picked = self._sample(logits, [generators[r] for r in active]).tolist()
            for r, tok in zip(active, picked):
                if done[r]:
                    continue
                if tok in self._stop_ids or (has_text[r] and tok in self._newline_ids):
                    done[r] = True
                    continue
                tokens[r].append(tok)
                has_text[r] = has_text[r] or tok not in self._blank_ids
            keep = [j for j, r in enumerate(active) if not done[r]]
            if not keep or step == self.config.max_new_tokens - 1:
                break
            # finished rows leave the batch once they are a quarter of it: each removal copies the cache
            if len(active) - len(keep) >= max(1, len(active) // 4):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos = mask[index.cpu()], next_pos[index.cpu()]
                picked = [picked[j] for j in keep]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], 1)
            step_ids = torch.tensor(picked, dtype=torch.long).unsqueeze(1)
            logits = self._forward(step_ids.to(self.device), mask.to(self.device),
                                   next_pos.unsqueeze(1).to(self.device), cache)
            next_pos = next_pos + 1
        return tokens

    def generate_batch(self, passages: list[tuple[str, str]]) -> list[GeneratedQueries]:
        """Records for ``(pid, text)`` pairs in the given order (planned into one-prefix batches internally)."""
        by_pid = {r.pid: r for batch in self.plan(passages) for r in self.generate_rows(batch)}
        return [by_pid[pid] for pid, _ in passages]

    def batches(self, pending: list[tuple[str, str]]) -> Iterator[list[tuple[str, PromptParts, list[int]]]]:
        """Planned a chunk at a time, in the caller's order: what a long run has finished so far is a sample of its
        passages (pass them shuffled), not the shortest passages of the first prefix."""
        chunk = self.config.batch_size * PLAN_CHUNK_BATCHES
        return (b for i in range(0, len(pending), chunk) for b in self.plan(pending[i:i + chunk]))

    def run_batch(self, batch: list[tuple[str, PromptParts, list[int]]]) -> list[GeneratedQueries]:
        return self.generate_rows(batch)


_LAYER_CLASS: Any = None


def _preallocated_layer(capacity: int) -> Any:
    """A cache layer that writes new keys/values into a buffer allocated once (``DynamicLayer`` concatenates, which
    copies the whole cache at every decoding step: 78% of a step's time here, profiled)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        from transformers.cache_utils import DynamicLayer

        class PreallocatedLayer(DynamicLayer):
            def __init__(self, capacity: int) -> None:
                super().__init__()
                self.capacity, self.length = capacity, 0

            def lazy_initialization(self, key_states, value_states) -> None:
                batch, heads, _, dim = key_states.shape
                self.device = key_states.device
                self._k = key_states.new_empty((batch, heads, self.capacity, dim))
                self._v = value_states.new_empty((batch, value_states.shape[1], self.capacity, value_states.shape[3]))
                self._views()
                self.is_initialized = True

            def _views(self) -> None:
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                n = key_states.shape[-2]
                if self.length + n > self.capacity:
                    raise ValueError(f"cache capacity {self.capacity} exceeded ({self.length} + {n})")
                self._k[:, :, self.length:self.length + n] = key_states
                self._v[:, :, self.length:self.length + n] = value_states
                self.length += n
                self._views()
                return self.keys, self.values

            def get_seq_length(self) -> int:
                return self.length

            def batch_repeat_interleave(self, repeats: int) -> None:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._views()

            def batch_select_indices(self, indices) -> None:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        _LAYER_CLASS = PreallocatedLayer
    return _LAYER_CLASS(capacity)


def _special_token_sets(tokenizer: Any) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """Token ids that end a row (EOS / end of turn), that contain a line break, and that are whitespace only."""
    stop = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            stop.add(tid)
    newline, blank = set(), set()
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if "\n" in text:
            newline.add(tid)
        if not text.strip():
            blank.add(tid)
    stop.discard(None)
    return frozenset(stop), frozenset(newline), frozenset(blank)


__all__ = ["ENGINE", "PrefixCachedGenerator"]
