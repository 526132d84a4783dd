"""The synthetic-query stage end to end: pick passages, make pairs (LLM or crop), filter, write data + manifest.

Kept apart from the CLI so the pipeline (``hybrid/``) can call it, and apart from the generator so the crop baseline
needs no torch.
"""

from __future__ import annotations

import logging
import platform
import random
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dense.querygen.crop import CropConfig, crop_pairs
from dense.querygen.data import iter_tsv, read_collection_pids, read_qrels, read_tsv, sample_pids, train_examples
from dense.querygen.filters import BatchSearch, FilterReport, SanityFilterConfig, SanityFilters, consistency_filter
from dense.querygen.output import file_sha256, llm_pairs, write_output
from dense.querygen.prompt import FewShotExample, ForbiddenQueries, PromptBuilder, PromptConfig, normalize_query
from dense.querygen.records import QueryPair

logger = logging.getLogger(__name__)

CACHE_FILE = Path("cache") / "generation.jsonl"


@dataclass(frozen=True)
class StageInputs:
    """Input files of the stage (recorded with checksums in the manifest)."""

    collection: Path
    train_queries: Path | None = None
    train_qrels: Path | None = None
    forbid_queries: tuple[Path, ...] = ()

    def describe(self) -> dict[str, Any]:
        files = {"collection": self.collection, "train_queries": self.train_queries, "train_qrels": self.train_qrels}
        out: dict[str, Any] = {k: {"path": str(p), "sha256": file_sha256(p)} for k, p in files.items() if p}
        out["forbid_queries"] = [{"path": str(p), "sha256": file_sha256(p)} for p in self.forbid_queries]
        return out


def select_passages(collection: Path, max_passages: int | None, sample_seed: int) -> dict[str, str]:
    """``{pid: text}`` of ``max_passages`` passages sampled by ``sample_seed`` (all when ``None``), in file order."""
    chosen = set(sample_pids(read_collection_pids(collection), max_passages, sample_seed))
    return {pid: text for pid, text in iter_tsv(collection) if pid in chosen}


def heldout_query_texts(inputs: StageInputs, heldout_qids: Collection[str]) -> frozenset[str]:
    """Normalized texts of the held-out train queries (read from ``inputs.train_queries``)."""
    if not heldout_qids or inputs.train_queries is None:
        return frozenset()
    return frozenset(normalize_query(t) for t in read_tsv(inputs.train_queries, ids=set(heldout_qids)).values())


def fewshot_examples(
    inputs: StageInputs, exclude_qids: Collection[str] = (), forbidden: ForbiddenQueries | None = None,
) -> list[FewShotExample]:
    """Real train pairs with their positive in the collection, minus ``exclude_qids`` (the held-out queries) and
    minus those ``forbidden`` refuses (a train query whose text equals a dev/DL query: MS MARCO's splits share some
    query strings, so at full scale a few of ~500k train queries do, and :class:`PromptBuilder` would refuse the
    whole pool for one of them)."""
    if inputs.train_queries is None or inputs.train_qrels is None:
        raise ValueError("few-shot examples need train queries and qrels")
    # Few-shot positives may lie outside the sampled passages: read just those from the collection.
    positives = {pid for pids in read_qrels(inputs.train_qrels).values() for pid in pids}
    pool = read_tsv(inputs.collection, ids=positives)
    excluded = set(exclude_qids)
    examples = [e for e in train_examples(pool, inputs.train_queries, inputs.train_qrels) if e.qid not in excluded]
    if forbidden is not None:
        allowed = [e for e in examples if forbidden.why_forbidden(e.qid, e.query) is None]
        if len(allowed) < len(examples):
            logger.info("few-shot pool: %d of %d train examples left out (their query equals a dev/DL query)",
                        len(examples) - len(allowed), len(examples))
        examples = allowed
    if not examples:
        raise ValueError("no few-shot example is left after excluding the held-out train queries")
    return examples


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "gguf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def filter_pairs(
    pairs: Sequence[QueryPair],
    passages: Mapping[str, str],
    sanity: SanityFilterConfig,
    forbidden: ForbiddenQueries,
    search: BatchSearch | None,
    k: int,
    search_name: str = "bm25",
    heldout_texts: frozenset[str] = frozenset(),
) -> tuple[list[QueryPair], FilterReport]:
    """Sanity filters, then (when ``search`` is given) the top-``k`` consistency filter; logs the report table.
    ``heldout_texts`` (normalized): the held-out selection queries' texts, dropped like an evaluation query's, so no
    model trains on a selection query's words (the filter's ``equals_forbidden_query`` row counts both)."""
    kept, report = SanityFilters(sanity, forbidden.texts | heldout_texts).apply(pairs, passages)
    if search is not None:
        kept, consistency = consistency_filter(kept, search, k, name=f"{search_name}_consistency")
        report = report.then(consistency)
    logger.info("filters:\n%s", report.table())
    return kept, report


def make_generator(model: str | Path, gguf_file: str | None, builder: PromptBuilder, generation: Any,
                   device: str | None = None):
    """The generator ``builder``'s prompt config asks for: prefix-cached when it shares prompt prefixes
    (``num_prefixes > 0``), else the plain batched one."""
    from dense.querygen.generator import QueryGenerator

    if builder.config.num_prefixes:
        from dense.querygen.prefix_generator import PrefixCachedGenerator

        return PrefixCachedGenerator(model, builder, gguf_file=gguf_file, config=generation, device=device)
    return QueryGenerator(model, builder, gguf_file=gguf_file, config=generation, device=device)


def run_llm(
    out_dir: Path,
    inputs: StageInputs,
    passages: Mapping[str, str],
    model: str | Path,
    gguf_file: str | None,
    generation: Any,  # GenerationConfig; typed loosely so importing this module does not import torch
    prompt: PromptConfig = PromptConfig(),
    sanity: SanityFilterConfig = SanityFilterConfig(),
    search: BatchSearch | None = None,
    k: int = 20,
    extra_manifest: Mapping[str, Any] | None = None,
    exclude_qids: Collection[str] = (),
    cached_only: bool = False,
) -> FilterReport:
    """Generate queries for ``passages`` with an LM (resuming from ``out_dir/cache``), filter, write the stage.

    Passages are generated in a ``generation.seed``-shuffled order, so what a long run has finished at any moment is
    a random sample of them. ``exclude_qids``: train queries that must not be few-shot examples (the held-out
    selection queries). ``cached_only``: generate nothing; filter and write what the cache holds so far (safe
    beside a generator still writing to it), counting the rest as not yet generated."""
    from dense.querygen.cache import QueryCache

    if inputs.train_queries is None or inputs.train_qrels is None:
        raise ValueError("run_llm needs train queries and qrels for the few-shot examples")
    start = time.perf_counter()
    forbidden = ForbiddenQueries.from_files(inputs.forbid_queries)
    examples = fewshot_examples(inputs, exclude_qids, forbidden)
    builder = PromptBuilder(examples, prompt, forbidden)
    generator = make_generator(model, gguf_file, builder, generation)
    cache = QueryCache(Path(out_dir) / CACHE_FILE, generator.fingerprint(), read_only=cached_only)
    order = sorted(passages.items())
    random.Random(f"{generation.seed}:order").shuffle(order)
    if cached_only:
        records = [r for pid, _ in order if (r := cache.get(pid)) is not None]
    else:
        records = list(generator.generate(order, cache))
    pairs = list(llm_pairs(records))
    kept, report = filter_pairs(pairs, passages, sanity, forbidden, search, k,
                                heldout_texts=heldout_query_texts(inputs, exclude_qids))
    manifest = {
        "stage": "synthetic", "generator": "llm", "model": str(model), "gguf_file": gguf_file,
        "model_sha256": file_sha256(Path(model) / gguf_file) if gguf_file else None,
        "generation": generator.describe(), "seed": generation.seed,
        "fewshot_qids": sorted({e.qid for e in builder.examples}),
        "excluded_fewshot_qids": sorted(set(exclude_qids)),
        "filters": report.to_dict(), "inputs": inputs.describe(), "versions": _versions(),
        "counts": {"passages": len(passages), "generated_passages": len(records),
                   "not_yet_generated_passages": len(passages) - len(records),
                   "generated_queries": len(pairs), "kept_pairs": len(kept),
                   "newly_generated_passages": generator.last_stats.get("new_passages", 0)},
        "seconds": time.perf_counter() - start,
        # model time of every record, summed over the sittings that made them (the cache records it per line)
        "generation_seconds": round(cache.generation_seconds, 1),
        "queries_per_s": len(pairs) / cache.generation_seconds if cache.generation_seconds else None,
        **(extra_manifest or {}),
    }
    write_output(out_dir, kept, manifest)
    return report


def run_crop(
    out_dir: Path,
    inputs: StageInputs,
    passages: Mapping[str, str],
    crop: CropConfig = CropConfig(),
    sanity: SanityFilterConfig = SanityFilterConfig(),
    search: BatchSearch | None = None,
    k: int = 20,
    extra_manifest: Mapping[str, Any] | None = None,
    exclude_qids: Collection[str] = (),
) -> FilterReport:
    """Crop / inverse-cloze pseudo-queries for ``passages``, filtered (content, leak, consistency), written;
    ``exclude_qids``: the held-out train queries, whose texts no crop may equal."""
    start = time.perf_counter()
    forbidden = ForbiddenQueries.from_files(inputs.forbid_queries)
    pairs = list(crop_pairs(passages.items(), crop))
    # Crops are copied by construction and their length is set by CropConfig: only content/leak checks apply.
    skip = {"copied_from_passage", "chatty", "too_long", "too_short", "run_on"}
    sanity = replace(sanity, skip=tuple(sorted(set(sanity.skip) | skip)))
    kept, report = filter_pairs(pairs, passages, sanity, forbidden, search, k,
                                heldout_texts=heldout_query_texts(inputs, exclude_qids))
    seconds = time.perf_counter() - start
    manifest = {
        "stage": "synthetic", "generator": "crop", "crop": asdict(crop), "seed": crop.seed,
        "filters": report.to_dict(), "inputs": inputs.describe(), "versions": _versions(),
        "counts": {"passages": len(passages), "generated_queries": len(pairs), "kept_pairs": len(kept)},
        "seconds": seconds, "queries_per_s": len(pairs) / seconds if seconds > 0 else 0.0,
        **(extra_manifest or {}),
    }
    write_output(out_dir, kept, manifest)
    return report
