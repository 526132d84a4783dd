"""The retriever modes as compositions of searchers, loaded from an artifact directory.

Every searcher here answers ``search(query, k)`` / ``batch_search(queries, k)`` with ``(pid, score)`` best first,
so a mode is a composition built once, as Pyserini builds its hybrid searcher over its Lucene and faiss ones:

    sparse   BM25Searcher
    dense    DenseSearcher
    rrf      FusedSearcher(BM25Searcher, DenseSearcher, RRFStrategy, depth)
    convex   FusedSearcher(BM25Searcher, DenseSearcher, ConvexStrategy, depth)
    hybrid   FusedSearcher(BM25Searcher, DenseSearcher, LearnedStrategy, depth)
    rerank   RerankingSearcher(<hybrid>, QueryLikelihoodScorer or CrossEncoderScorer, depth, time budget)

``depth`` (the fusion stage's, 100 by default) is what each first stage returns to the fusion, whatever ``k`` the
caller asks for; see :mod:`fusion.searcher`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hybrid.artifacts import ArtifactError, from_stored_path, read_stage, require_stage, stage_dir
from hybrid.config import CrossEncoderStageConfig, RerankConfig

Ranking = list[tuple[str, float]]
PassageText = Callable[[list[str]], list[str]]

MODES = ("sparse", "dense", "rrf", "convex", "hybrid", "rerank")
FUSED_MODES = ("rrf", "convex", "hybrid")


class Searcher(Protocol):
    def search(self, query: str, k: int) -> Ranking: ...

    def batch_search(self, queries: list[str], k: int) -> list[Ranking]: ...


@dataclasses.dataclass(frozen=True)
class RerankSettings:
    """What the rerank stage wrote in ``rerank/settings.json``: its config and the scorer's model directory."""

    config: RerankConfig
    model_dir: Path | None
    # the QL prompt's demonstrations (rerank.few_shot): (passage, query) pairs the stage drew
    examples: tuple[tuple[str, str], ...] = ()

    @classmethod
    def read(cls, root: Path) -> RerankSettings:
        """The stage's settings; a missing file or one with only ``enabled = false`` is the disabled default."""
        path = stage_dir(root, "rerank") / "settings.json"
        raw: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if not raw.get("enabled"):
            return cls(RerankConfig(), None)
        known = {f.name for f in dataclasses.fields(RerankConfig)}
        # settings written before a field existed (e.g. time_budget_s, scorer) get the field's default
        values = {k: v for k, v in raw.items() if k in known}
        if isinstance(values.get("cross_encoder"), dict):
            section = {f.name for f in dataclasses.fields(CrossEncoderStageConfig)}
            values["cross_encoder"] = CrossEncoderStageConfig(
                **{k: v for k, v in values["cross_encoder"].items() if k in section}
            )
        config = RerankConfig(**values)
        examples = tuple((e["passage"], e["query"]) for e in raw.get("examples", []))
        if len(examples) != config.few_shot:
            raise ArtifactError(f"{path} asks for {config.few_shot} few-shot examples but holds {len(examples)}; "
                                "rerun the 'rerank' stage (scripts/run_pipeline.py --config ... --stages rerank)")
        return cls(config, from_stored_path(root, raw["model_dir"]), examples)


def sparse_index_stage(root: Path) -> str:
    """The stage whose index the sparse and fused modes search: ``bm25_expanded`` when that stage built one
    (``sparse.expansion``, doc2query), else ``bm25``."""
    record = read_stage(root, "bm25_expanded")
    return "bm25_expanded" if record and record.get("enabled") else "bm25"


def bm25_searcher(root: Path):
    """The BM25 searcher of the sparse and fused modes (:func:`sparse_index_stage`), with the k1 and b it was
    configured with, and the config's ``sparse.threads`` for ``batch_search`` (the A10G recipe's 16 when it mines the
    cross-encoder's negatives and evaluates; 2, the searcher's default, when a stage recorded none)."""
    from sparse.bm25 import MSMARCO_B, MSMARCO_K1, BM25Searcher

    stage = sparse_index_stage(root)
    manifest = require_stage(root, stage)
    config = manifest.get("config") or {}
    threads = int(config.get("sparse", config).get("threads") or 2)  # bm25 records its section, bm25_expanded all
    return BM25Searcher(stage_dir(root, stage), k1=manifest.get("k1", MSMARCO_K1), b=manifest.get("b", MSMARCO_B),
                        threads=threads)


def dense_searcher(root: Path, search_depth: int | None = None):
    """The dense searcher of the ``dense_index`` stage, refused when built from another model than ``dense_train``'s.

    ``search_depth``: neighbours every search asks the index for (see :class:`dense.searcher.DenseSearcher`);
    ``None`` keeps the searcher's default."""
    from dense.encoder import load_encoder
    from dense.searcher import DenseSearcher

    model = require_stage(root, "dense_train")
    require_stage(root, "dense_index", expect={"model_fingerprint": model["model_fingerprint"]})
    encoder = load_encoder(stage_dir(root, "dense_train") / "model")
    extra = {} if search_depth is None else {"search_depth": search_depth}
    return DenseSearcher.from_dir(stage_dir(root, "dense_index") / "faiss", encoder, **extra)


def fused_searcher(root: Path, mode: str, passage_text: PassageText):
    """``FusedSearcher`` of BM25 and dense with ``mode``'s strategy, over the fusion stage's depth."""
    from fusion.searcher import FusedSearcher
    from hybrid.fusion_stage import FusionArtifacts

    record = require_stage(root, "fusion")
    # the fusion model learnt from the rankings of one BM25 index (plain or expanded); it must fuse that one's
    trained_on, now = record.get("sparse_index", "bm25"), sparse_index_stage(root)
    if trained_on != now:
        raise ArtifactError(
            f"the fusion stage in {stage_dir(root, 'fusion')} was trained on rankings of the '{trained_on}' index, "
            f"but the sparse index is now '{now}'; rerun the 'fusion' stage and the stages after it "
            "(python scripts/run_pipeline.py --config <config> --stages fusion rerank evaluate)"
        )
    fusion = FusionArtifacts.load(stage_dir(root, "fusion"))
    strategy = fusion.strategies(passage_text)[mode]
    # the dense searcher is only ever asked for `depth`, so it needs to search no deeper
    return FusedSearcher(bm25_searcher(root), dense_searcher(root, search_depth=fusion.depth), strategy,
                         fusion.depth, names=fusion.settings.retrievers[:2])


def rerank_scorer(settings: RerankSettings):
    """The pair scorer the rerank stage chose: SmolLM2 query likelihood or the trained cross-encoder."""
    c = settings.config
    if c.scorer == "cross_encoder":
        from fusion.cross_encoder import CrossEncoderScorer, read_cross_encoder_config

        trained = read_cross_encoder_config(settings.model_dir)
        return CrossEncoderScorer.from_dir(
            settings.model_dir, dataclasses.replace(trained, batch_size=max(c.batch_size, trained.batch_size))
        )
    from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer

    return QueryLikelihoodScorer.from_dir(
        settings.model_dir,
        QueryLikelihoodConfig(max_passage_tokens=c.max_passage_tokens, system_prompt=c.system_prompt, dtype=c.dtype,
                              examples=settings.examples, attention=c.attention),
    )


# searched and scored once when a reranking searcher is built (RerankingSearcher.warm_up); any query would do
WARM_UP_QUERY = "what is the definition of a passage"


def reranking_searcher(root: Path, settings: RerankSettings, passage_text: PassageText):
    """The learned fusion's ranking with its top reordered by the rerank stage's scorer (query likelihood or a
    cross-encoder), as the stage set it up."""
    from hybrid.rerank import RerankingSearcher

    require_stage(root, "rerank")
    if settings.model_dir is None:
        raise ArtifactError(
            f"mode 'rerank' is not enabled in {root}: set rerank.enabled = true in the config and run the "
            "pipeline's rerank stage (scripts/run_pipeline.py --config ... --stages rerank)"
        )
    c = settings.config
    if not (settings.model_dir / "config.json").is_file():
        raise ArtifactError(
            f"the rerank model {settings.model_dir} (from {stage_dir(root, 'rerank') / 'settings.json'}) is not a "
            "model directory; rerun the 'rerank' stage (scripts/run_pipeline.py --config ... --stages rerank)"
        )
    weight = None if c.combine == "replace" else float(c.weight)
    searcher = RerankingSearcher(fused_searcher(root, "hybrid", passage_text), rerank_scorer(settings), passage_text,
                                 c.depth, weight, time_budget_s=c.time_budget_s, batch_size=c.batch_size)
    searcher.warm_up(WARM_UP_QUERY)  # so the first real query is sized by a measured cost (~0.5 s here, once)
    return searcher


def build_searcher(mode: str, root: Path, passage_text: PassageText, rerank: RerankSettings) -> Searcher:
    """The composition of ``mode`` (see the module docstring), loaded once."""
    builders: dict[str, Callable[[], Searcher]] = {
        "sparse": lambda: bm25_searcher(root),
        "dense": lambda: dense_searcher(root),
        **{m: (lambda m=m: fused_searcher(root, m, passage_text)) for m in FUSED_MODES},
        "rerank": lambda: reranking_searcher(root, rerank, passage_text),
    }
    if mode not in builders:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    return builders[mode]()


__all__ = [
    "FUSED_MODES",
    "MODES",
    "RerankSettings",
    "Searcher",
    "bm25_searcher",
    "build_searcher",
    "dense_searcher",
    "fused_searcher",
    "rerank_scorer",
    "reranking_searcher",
    "sparse_index_stage",
]
