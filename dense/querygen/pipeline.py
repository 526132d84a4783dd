"""The synthetic-query stage end to end: pick passages, make pairs (LLM or crop), filter, write data + manifest.

Kept apart from the CLI so the pipeline (``hybrid/``) can call it, and apart from the generator so the crop baseline
needs no torch.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dense.querygen.crop import CropConfig, crop_pairs
from dense.querygen.data import iter_tsv, read_collection_pids, read_qrels, read_tsv, sample_pids, train_examples
from dense.querygen.filters import BatchSearch, FilterReport, SanityFilterConfig, SanityFilters, consistency_filter
from dense.querygen.output import file_sha256, llm_pairs, write_output
from dense.querygen.prompt import ForbiddenQueries, PromptBuilder, PromptConfig
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
) -> tuple[list[QueryPair], FilterReport]:
    """Sanity filters, then (when ``search`` is given) the top-``k`` consistency filter; logs the report table."""
    kept, report = SanityFilters(sanity, forbidden.texts).apply(pairs, passages)
    if search is not None:
        kept, consistency = consistency_filter(kept, search, k, name=f"{search_name}_consistency")
        report = report.then(consistency)
    logger.info("filters:\n%s", report.table())
    return kept, report


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
) -> FilterReport:
    """Generate queries for ``passages`` with an LM (resuming from ``out_dir/cache``), filter, write the stage."""
    from dense.querygen.cache import QueryCache
    from dense.querygen.generator import QueryGenerator

    if inputs.train_queries is None or inputs.train_qrels is None:
        raise ValueError("run_llm needs train queries and qrels for the few-shot examples")
    start = time.perf_counter()
    forbidden = ForbiddenQueries.from_files(inputs.forbid_queries)
    # Few-shot positives may lie outside the sampled passages: read just those from the collection.
    positives = {pid for pids in read_qrels(inputs.train_qrels).values() for pid in pids}
    pool = read_tsv(inputs.collection, ids=positives)
    builder = PromptBuilder(train_examples(pool, inputs.train_queries, inputs.train_qrels), prompt, forbidden)
    generator = QueryGenerator(model, builder, gguf_file=gguf_file, config=generation)
    cache = QueryCache(Path(out_dir) / CACHE_FILE, generator.fingerprint())
    gen_start = time.perf_counter()
    records = list(generator.generate(list(passages.items()), cache))
    gen_seconds = time.perf_counter() - gen_start
    pairs = list(llm_pairs(records))
    kept, report = filter_pairs(pairs, passages, sanity, forbidden, search, k)
    manifest = {
        "stage": "synthetic", "generator": "llm", "model": str(model), "gguf_file": gguf_file,
        "generation": generator.describe(), "seed": generation.seed,
        "filters": report.to_dict(), "inputs": inputs.describe(), "versions": _versions(),
        "counts": {"passages": len(passages), "generated_queries": len(pairs), "kept_pairs": len(kept),
                   "newly_generated_passages": generator.last_stats.get("new_passages", 0),
                   "cached_passages": len(passages) - generator.last_stats.get("new_passages", 0)},
        "seconds": time.perf_counter() - start, "generation_seconds": gen_seconds,
        "queries_per_s": generator.last_stats.get("queries_per_s", 0.0),
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
) -> FilterReport:
    """Crop / inverse-cloze pseudo-queries for ``passages``, filtered (content, leak, consistency), written."""
    start = time.perf_counter()
    forbidden = ForbiddenQueries.from_files(inputs.forbid_queries)
    pairs = list(crop_pairs(passages.items(), crop))
    # Crops are copied by construction and their length is set by CropConfig: only content/leak checks apply.
    skip = {"copied_from_passage", "chatty", "too_long", "too_short"}
    sanity = replace(sanity, skip=tuple(sorted(set(sanity.skip) | skip)))
    kept, report = filter_pairs(pairs, passages, sanity, forbidden, search, k)
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
