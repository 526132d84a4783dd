"""Throughput of query generation under variants (engine, batch size, prompt), on the same passages.

Each variant loads the generator, generates one query per passage for the same passages, and is scored on speed
(passages/s, queries/s, prompt tokens/s) and on what survives the filters (sanity checks, then the optional
retrieval round trip), so a faster variant that makes worse queries shows it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dense.querygen.filters import BatchSearch, SanityFilterConfig
from dense.querygen.output import llm_pairs
from dense.querygen.prompt import FewShotExample, ForbiddenQueries, PromptBuilder, PromptConfig


@dataclass(frozen=True)
class GenerationVariant:
    """One row of the benchmark. ``engine``: ``generate`` (transformers ``generate`` on whole prompts, the old path)
    or ``prefix`` (:class:`~dense.querygen.prefix_generator.PrefixCachedGenerator`)."""

    name: str
    engine: str = "prefix"
    batch_size: int = 16
    num_examples: int = 3
    max_passage_tokens: int = 128
    num_prefixes: int = 8
    max_new_tokens: int = 24
    num_queries: int = 1  # samples per passage; the prefix engine shares the passage's prefill among them

    @classmethod
    def parse(cls, spec: str) -> GenerationVariant:
        """``engine[-b<batch>][-e<examples>][-p<passage tokens>][-x<prefixes>][-t<new tokens>][-n<queries>]``
        (``n``: queries per passage), e.g. ``prefix-b32-e3-p96`` or ``prefix-b32-p96-n3``."""
        engine, *opts = spec.split("-")
        if engine not in ("generate", "prefix"):
            raise ValueError(f"variant {spec!r}: engine must be 'generate' or 'prefix'")
        fields = {"b": "batch_size", "e": "num_examples", "p": "max_passage_tokens", "x": "num_prefixes",
                  "t": "max_new_tokens", "n": "num_queries"}
        kwargs: dict[str, Any] = {}
        for o in opts:
            if not o or o[0] not in fields or not o[1:].isdigit():
                raise ValueError(f"variant {spec!r}: unknown option {o!r} (use b, e, p, x, t, n followed by a number)")
            kwargs[fields[o[0]]] = int(o[1:])
        return cls(name=spec, engine=engine, **kwargs)


def run_variant(
    variant: GenerationVariant,
    passages: Sequence[tuple[str, str]],
    examples: Sequence[FewShotExample],
    forbidden: ForbiddenQueries,
    model: str,
    gguf_file: str | None,
    search: BatchSearch | None = None,
    k: int = 20,
    seed: int = 0,
    temperature: float = 0.7,
) -> dict[str, Any]:
    """Generate for ``passages`` with ``variant``; one table row."""
    from dense.querygen.generator import GenerationConfig, QueryGenerator
    from dense.querygen.pipeline import filter_pairs
    from dense.querygen.prefix_generator import PrefixCachedGenerator

    prompt = PromptConfig(num_examples=variant.num_examples, max_passage_tokens=variant.max_passage_tokens,
                          seed=seed, num_prefixes=variant.num_prefixes if variant.engine == "prefix" else 0)
    generation = GenerationConfig(temperature=temperature, max_new_tokens=variant.max_new_tokens,
                                  batch_size=variant.batch_size, seed=seed, num_queries_per_passage=variant.num_queries)
    cls = PrefixCachedGenerator if variant.engine == "prefix" else QueryGenerator
    generator = cls(model, PromptBuilder(examples, prompt, forbidden), gguf_file=gguf_file, config=generation)
    prompt_tokens = _prompt_tokens(generator, passages)
    start = time.perf_counter()
    records = list(generator.generate(list(passages)))
    seconds = time.perf_counter() - start
    pairs = list(llm_pairs(records))
    texts: Mapping[str, str] = dict(passages)
    sane, _ = filter_pairs(pairs, texts, SanityFilterConfig(), forbidden, None, k)
    row = {
        "variant": variant.name, "passages": len(passages), "seconds": seconds,
        "passages/s": len(passages) / seconds, "queries/s": len(pairs) / seconds,
        "prompt tokens/s": prompt_tokens / seconds,
        "sanity pass": len(sane) / len(pairs) if pairs else 0.0,
    }
    if search is not None:
        kept, _ = filter_pairs(pairs, texts, SanityFilterConfig(), forbidden, search, k)
        row["all filters pass"] = len(kept) / len(pairs) if pairs else 0.0
        row["kept/s"] = len(kept) / seconds
    return row


def _prompt_tokens(generator: Any, passages: Sequence[tuple[str, str]]) -> int:
    """Prompt tokens the model runs: whole prompts for ``generate``; passage parts plus each distinct prefix once
    for the prefix-cached engine."""
    tok = generator.tokenizer
    builder: PromptBuilder = generator.prompt
    if builder.config.num_prefixes:
        parts = [builder.render_parts(pid, text, tok) for pid, text in passages]
        prefixes = {p.prefix for p in parts}
        return (sum(len(tok(p.suffix, add_special_tokens=False)["input_ids"]) for p in parts)
                + sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prefixes))
    return sum(len(tok(builder.render(pid, text, tok)[0], add_special_tokens=False)["input_ids"])
               for pid, text in passages)


