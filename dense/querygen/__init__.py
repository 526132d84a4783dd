"""Synthetic training queries: LLM few-shot generation (InPars / Promptagator style) and a crop baseline.

Importing the package does not import torch or transformers; :mod:`dense.querygen.generator` does, on first use.
"""

from dense.querygen.cache import CacheCorruptError, QueryCache
from dense.querygen.crop import CropConfig, crop_pairs
from dense.querygen.filters import (
    FilterReport,
    FilterStage,
    SanityFilterConfig,
    SanityFilters,
    consistency_filter,
)
from dense.querygen.output import llm_pairs, read_training_records, training_record, write_output
from dense.querygen.prompt import (
    FewShotExample,
    ForbiddenExampleError,
    ForbiddenQueries,
    PromptBuilder,
    PromptConfig,
)
from dense.querygen.records import GeneratedQueries, QueryPair

__all__ = [
    "CacheCorruptError", "CropConfig", "FewShotExample", "FilterReport", "FilterStage", "ForbiddenExampleError",
    "ForbiddenQueries", "GeneratedQueries", "GenerationConfig", "PromptBuilder", "PromptConfig", "QueryCache",
    "QueryGenerator", "QueryPair", "SanityFilterConfig", "SanityFilters", "consistency_filter", "crop_pairs",
    "llm_pairs", "read_training_records", "training_record", "write_output",
]


def __getattr__(name: str):
    # The generator module imports nothing heavy at top level, but keep the door shut for future edits.
    if name in ("QueryGenerator", "GenerationConfig"):
        from dense.querygen import generator

        return getattr(generator, name)
    raise AttributeError(f"module 'dense.querygen' has no attribute {name!r}")
