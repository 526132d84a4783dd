"""The fusion stage's artifacts: learned model, idf table, RRF and tuned convex settings, in one directory.

Files in ``<artifacts>/fusion/``: ``model.json`` (:class:`fusion.model.FusionModel`), ``lexicon/``
(:class:`fusion.lexicon.PassageLexicon`: the per-passage terms that make the text features cheap at search time,
and the document frequencies of the idf table), ``settings.json`` (retrievers, depth, rrf k, fill policy, analyzer,
convex weight) and ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from dense.atomic import atomic_directory, write_json_atomic
from fusion.analysis import Analyzer, IdfTable
from fusion.baselines import tune_convex_weight
from fusion.features import FeatureBuilder, feature_names_for
from fusion.lexicon import LexiconError, PassageLexicon, build_and_save
from fusion.model import FusionModel
from fusion.normalise import FillPolicy, Ranking
from fusion.searcher import ConvexStrategy, FusionStrategy, LearnedStrategy, RRFStrategy
from fusion.training import train_fusion
from hybrid.artifacts import ArtifactError

logger = logging.getLogger(__name__)

RETRIEVERS = ("bm25", "dense")


@dataclass(frozen=True)
class FusionSettings:
    retrievers: tuple[str, ...]
    depth: int
    rrf_k: int
    std_below: float
    analyzer: dict
    convex_weight: float  # weight of the first retriever (bm25); dense gets 1 - w
    convex_norm: str = "minmax"


class FusionArtifacts:
    """Loaded fusion artifacts: the strategies of the three fused modes of :class:`hybrid.Retriever`."""

    def __init__(
        self, settings: FusionSettings, model: FusionModel, idf: IdfTable, lexicon: PassageLexicon | None = None
    ) -> None:
        self.settings = settings
        self.model = model
        self.depth = settings.depth
        analyzer = Analyzer.from_dict(settings.analyzer)
        self.fill = FillPolicy(std_below=settings.std_below)
        self.builder = FeatureBuilder(settings.retrievers, settings.depth, analyzer, idf, self.fill, settings.rrf_k,
                                      lexicon=lexicon)

    @classmethod
    def load(cls, directory: str | Path) -> FusionArtifacts:
        directory = Path(directory)
        raw = json.loads((directory / "settings.json").read_text())
        raw["retrievers"] = tuple(raw["retrievers"])
        settings = FusionSettings(**raw)
        names = feature_names_for(settings.retrievers)
        model = FusionModel.load(directory / "model.json", expected_features=names)
        try:
            lexicon = PassageLexicon.load(directory / "lexicon")
        except LexiconError as e:
            raise ArtifactError(f"{e} (python scripts/run_pipeline.py --config ... --force fusion)") from e
        return cls(settings, model, lexicon.idf_table(), lexicon)

    def strategies(self, passage_text: Callable) -> dict[str, FusionStrategy]:
        """The fused modes' strategies by mode name: ``rrf``, ``convex`` (the tuned weight) and ``hybrid`` (the
        learned model); ``passage_text`` feeds the text features only when the lexicon is absent."""
        first, second = self.settings.retrievers[:2]
        w = self.settings.convex_weight
        return {
            "rrf": RRFStrategy(self.settings.rrf_k),
            "convex": ConvexStrategy({first: w, second: 1.0 - w}, self.settings.convex_norm, self.fill),
            "hybrid": LearnedStrategy(self.model, self.builder, passage_text),
        }


def train_fusion_artifacts(
    out_dir: Path,
    queries: Mapping[str, str],
    rankings: Mapping[str, Mapping[str, Ranking]],
    qrels: Mapping[str, Mapping[str, int]],
    passage_text: Callable,
    corpus: Iterable[tuple[str, str]],
    corpus_size: int,
    depth: int,
    rrf_k: int = 60,
    C: float = 1.0,
) -> dict:
    """Fit the fusion model and tune the convex baseline on training queries; write everything into ``out_dir``.

    ``corpus``: ``(pid, text)`` pairs of the whole collection, for the passage lexicon and idf table. The directory
    is written whole (a temporary sibling renamed into place), so a failed or killed run leaves the previous one,
    never a new lexicon beside an old model.
    """
    start = time.time()
    analyzer = Analyzer()
    with atomic_directory(out_dir) as tmp:
        lexicon, idf = build_and_save(corpus, tmp / "lexicon", analyzer, total=corpus_size)
        fill = FillPolicy()
        builder = FeatureBuilder(RETRIEVERS, depth, analyzer, idf, fill, rrf_k, lexicon=lexicon)
        model, stats = train_fusion(queries, rankings, qrels, builder, passage_text, C=C)
        weight, table = tune_convex_weight(rankings, qrels, RETRIEVERS, metric="mrr@10", missing_fill=fill,
                                           depth=depth)
        settings = FusionSettings(RETRIEVERS, depth, rrf_k, fill.std_below, analyzer.to_dict(), weight)
        model.save(tmp / "model.json")
        write_json_atomic(tmp / "settings.json", asdict(settings))
    return {
        "training_set": stats.as_dict(),
        "convex_weight": weight,
        "convex_grid": table,
        "coefficients": model.coefficients(),
        "seconds": round(time.time() - start, 1),
    }
