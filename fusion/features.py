"""Features for learned fusion: one row per (query, candidate), candidates = union of every retriever's top-depth.

Per retriever ``r`` (in the order given to the builder; any number of retrievers):

- ``r.score``   raw score
- ``r.minmax``  min-max normalised score within the query's top-depth list
- ``r.z``       z-scored score within the same list
- ``r.rank``    1-based rank; ``depth + 1`` when missing
- ``r.rrf``     ``1 / (rrf_k + rank)``; ``0`` when missing
- ``r.missing`` 1.0 when the candidate is not in ``r``'s top-depth, else 0.0

A missing candidate's ``score``/``minmax``/``z`` come from :class:`fusion.normalise.FillPolicy` (by default the
list's worst value: raw = list min, minmax = 0, z = list's min z). Then per candidate:

- ``in_all_lists``  1.0 when every retriever returned it
- ``query_len``     number of analyzed query tokens (stopwords removed, repeats counted)
- ``passage_len``   ``log(1 + analyzed passage tokens)``
- ``overlap``       share of distinct query terms that occur in the passage (0 for an empty query)
- ``idf_overlap``   the same share weighted by each term's idf
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fusion.analysis import Analyzer, IdfTable
from fusion.lexicon import PassageLexicon
from fusion.normalise import FillPolicy, Ranking, minmax, split_ranking, zscore

PassageText = Callable[[list[str]], list[str]]
"""``passage_text(pids) -> texts`` in the same order."""

PER_RETRIEVER_FEATURES: tuple[str, ...] = ("score", "minmax", "z", "rank", "rrf", "missing")
CANDIDATE_FEATURES: tuple[str, ...] = ("in_all_lists", "query_len", "passage_len", "overlap", "idf_overlap")
DEFAULT_RRF_K = 60


def feature_names_for(retrievers: Sequence[str]) -> tuple[str, ...]:
    """The stable feature names for these retrievers, in column order."""
    return tuple(f"{r}.{f}" for r in retrievers for f in PER_RETRIEVER_FEATURES) + CANDIDATE_FEATURES


@dataclass(frozen=True, eq=False)
class CandidateSet:
    """One query's candidates and their feature matrix (row ``i`` describes ``pids[i]``)."""

    pids: list[str]
    X: np.ndarray
    feature_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.X.ndim != 2 or self.X.shape != (len(self.pids), len(self.feature_names)):
            raise ValueError(
                f"CandidateSet: X has shape {self.X.shape}, expected ({len(self.pids)}, {len(self.feature_names)}) "
                "= (candidates, features)"
            )

    def __len__(self) -> int:
        return len(self.pids)

    def column(self, name: str) -> np.ndarray:
        """One feature column by name."""
        try:
            return self.X[:, self.feature_names.index(name)]
        except ValueError:
            raise KeyError(f"no feature {name!r}; features are {self.feature_names}") from None


class FeatureBuilder:
    """Turns one query's rankings (and passage texts) into a :class:`CandidateSet`."""

    def __init__(
        self,
        retrievers: Sequence[str],
        depth: int,
        analyzer: Analyzer,
        idf_table: IdfTable,
        missing_fill: FillPolicy = FillPolicy(),
        rrf_k: int = DEFAULT_RRF_K,
        lexicon: PassageLexicon | None = None,
    ) -> None:
        """``lexicon``: precomputed passage terms; when given, text features read it instead of tokenising the
        passages (same values, no per-query tokenisation) and ``passage_text`` is not called."""
        retrievers = tuple(retrievers)
        if not retrievers or any(not isinstance(r, str) or not r for r in retrievers):
            raise ValueError(f"retrievers must be a non-empty sequence of non-empty names, got {retrievers!r}")
        if len(set(retrievers)) != len(retrievers):
            raise ValueError(f"retriever names must be unique, got {retrievers!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if rrf_k < 0:
            raise ValueError(f"rrf_k must be >= 0, got {rrf_k}")
        if idf_table.analyzer != analyzer:
            raise ValueError(
                f"the idf table was built with {idf_table.analyzer} but the feature builder uses {analyzer}; "
                "rebuild the idf table with the same analyzer (or pass the table's analyzer)"
            )
        self.retrievers = retrievers
        self.depth = depth
        self.analyzer = analyzer
        self.idf_table = idf_table
        self.missing_fill = missing_fill
        self.rrf_k = rrf_k
        if lexicon is not None and lexicon.analyzer != analyzer:
            raise ValueError(f"the lexicon was built with {lexicon.analyzer} but the feature builder uses {analyzer}")
        self.lexicon = lexicon
        self._feature_names = feature_names_for(retrievers)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._feature_names

    def build(self, query: str, rankings: Mapping[str, Ranking], passage_text: PassageText) -> CandidateSet:
        """Features for the union of each configured retriever's top-``depth`` (extra rankings are ignored)."""
        absent = [r for r in self.retrievers if r not in rankings]
        if absent:
            raise ValueError(
                f"rankings lack retrievers {absent} (have {sorted(rankings)}); the feature builder was configured "
                f"for {list(self.retrievers)}. Run those retrievers for this query or configure the builder to match."
            )
        lists = [split_ranking(r, rankings[r], self.depth) for r in self.retrievers]

        row: dict[str, int] = {}
        for pids, _ in lists:
            for pid in pids:
                row.setdefault(pid, len(row))
        cand = list(row)
        n, per = len(cand), len(PER_RETRIEVER_FEATURES)
        X = np.empty((n, len(self._feature_names)), dtype=np.float64)

        for j, (pids, scores) in enumerate(lists):
            fill = self.missing_fill.fill(scores)
            cols = slice(j * per, (j + 1) * per)
            X[:, cols] = (fill.raw, fill.minmax, fill.z, self.depth + 1, 0.0, 1.0)
            idx = np.fromiter((row[p] for p in pids), dtype=np.intp, count=len(pids))
            ranks = np.arange(1, len(pids) + 1, dtype=np.float64)
            X[idx, cols] = np.column_stack(
                [scores, minmax(scores), zscore(scores), ranks, 1.0 / (self.rrf_k + ranks), np.zeros(len(pids))]
            )

        base = len(self.retrievers) * per
        missing_cols = [j * per + PER_RETRIEVER_FEATURES.index("missing") for j in range(len(self.retrievers))]
        X[:, base] = (X[:, missing_cols] == 0).all(axis=1)
        X[:, base + 1 :] = self._text_features(query, cand, passage_text)
        return CandidateSet(cand, X.astype(np.float32), self._feature_names)

    def _text_features(self, query: str, pids: list[str], passage_text: PassageText) -> np.ndarray:
        """Columns ``query_len, passage_len, overlap, idf_overlap`` for each candidate."""
        out = np.zeros((len(pids), 4), dtype=np.float64)
        if not pids:
            return out
        if self.lexicon is not None:
            return self._lexicon_text_features(query, pids, out)
        texts = passage_text(pids)
        if len(texts) != len(pids):
            raise ValueError(
                f"passage_text returned {len(texts)} texts for {len(pids)} pids; it must return one per pid"
            )
        q_tokens = self.analyzer.tokenize(query)
        q_terms = list(dict.fromkeys(q_tokens))  # distinct, in query order
        q_idf = dict(zip(q_terms, self.idf_table.idfs(q_terms).tolist()))
        idf_total = sum(q_idf.values())
        out[:, 0] = len(q_tokens)
        for i, text in enumerate(texts):
            tokens = self.analyzer.tokenize(text)
            out[i, 1] = math.log1p(len(tokens))
            if q_terms:
                shared = set(tokens).intersection(q_terms)
                out[i, 2] = len(shared) / len(q_terms)
                out[i, 3] = sum(q_idf[t] for t in shared) / idf_total
        return out

    def _lexicon_text_features(self, query: str, pids: list[str], out: np.ndarray) -> np.ndarray:
        q_tokens = self.analyzer.tokenize(query)
        q_terms = list(dict.fromkeys(q_tokens))
        q_idf = self.idf_table.idfs(q_terms)
        lengths, shared, shared_idf = self.lexicon.overlap(pids, self.lexicon.term_ids(q_terms), q_idf)
        out[:, 0] = len(q_tokens)
        out[:, 1] = np.log1p(lengths)
        if q_terms:
            out[:, 2] = shared / len(q_terms)
            out[:, 3] = shared_idf / q_idf.sum()
        return out


__all__ = [
    "CANDIDATE_FEATURES",
    "DEFAULT_RRF_K",
    "PER_RETRIEVER_FEATURES",
    "CandidateSet",
    "FeatureBuilder",
    "FillPolicy",
    "PassageText",
    "feature_names_for",
]
