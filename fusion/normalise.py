"""Per-query score normalisation and the fill rule for candidates missing from a retriever's list.

Scores from different retrievers live on different scales (BM25 ~ 0..40, dot products ~ 0..1), so fusion compares
them after normalising *within one query's list*. Degenerate lists are defined, not NaN: a constant list is all 1.0
under min-max (every entry is as good as the best) and all 0.0 under z-score (every entry is at the mean).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

Ranking = list[tuple[str, float]]
"""``[(pid, score), ...]`` best first; higher score is better."""

Norm = Literal["minmax", "z"]
NORMS: tuple[str, ...] = ("minmax", "z")


def minmax(scores: ArrayLike) -> np.ndarray:
    """``(s - min) / (max - min)`` in float64; a constant list gives all 1.0, an empty list an empty array."""
    s = _as_scores(scores)
    if s.size == 0:
        return s
    lo, hi = s.min(), s.max()
    if hi == lo:
        return np.ones_like(s)
    return (s - lo) / (hi - lo)


def zscore(scores: ArrayLike) -> np.ndarray:
    """``(s - mean) / std`` (population std) in float64; a constant list gives all 0.0."""
    s = _as_scores(scores)
    if s.size == 0:
        return s
    std = s.std()
    if std == 0.0:
        return np.zeros_like(s)
    return (s - s.mean()) / std


def normalise(scores: ArrayLike, method: Norm) -> np.ndarray:
    """Dispatch to :func:`minmax` or :func:`zscore` by name."""
    if method == "minmax":
        return minmax(scores)
    if method == "z":
        return zscore(scores)
    raise ValueError(f"unknown normalisation {method!r}; expected one of {NORMS}")


@dataclass(frozen=True)
class ScoreFill:
    """Values given to a candidate that is missing from one retriever's list, per feature."""

    raw: float
    minmax: float
    z: float

    def normalised(self, method: Norm) -> float:
        if method not in NORMS:
            raise ValueError(f"unknown normalisation {method!r}; expected one of {NORMS}")
        return self.minmax if method == "minmax" else self.z


@dataclass(frozen=True)
class FillPolicy:
    """How to score a candidate that a retriever did not return (within the depth looked at).

    The rule: a missing candidate sits ``std_below`` standard deviations of the list *below the list's worst
    entry*, expressed in each feature's own units, with ``min`` and ``std`` taken over the list's (truncated) scores:

    - raw score: ``min - std_below * std``
    - min-max:   ``0 - std_below * std / (max - min)``  (``0`` when the list is constant)
    - z-score:   ``min_z - std_below``                  (one std is exactly 1 in z units; ``min_z`` is 0 if constant)

    The default ``std_below = 0`` gives the list minimum (Pyserini's hybrid rule): raw = list min, min-max = 0,
    z = the list's min z. The learned model also sees an explicit ``missing`` flag, so it can learn any extra penalty.
    A retriever that returned nothing for the query has no list statistics: every fill is ``empty_list``.
    """

    std_below: float = 0.0
    empty_list: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.std_below) and self.std_below >= 0):
            raise ValueError(f"FillPolicy.std_below must be a finite number >= 0, got {self.std_below}")
        if not np.isfinite(self.empty_list):
            raise ValueError(f"FillPolicy.empty_list must be finite, got {self.empty_list}")

    def fill(self, scores: ArrayLike) -> ScoreFill:
        """Fill values for candidates missing from the list with these (already truncated) ``scores``."""
        s = _as_scores(scores)
        if s.size == 0:
            return ScoreFill(self.empty_list, self.empty_list, self.empty_list)
        lo, hi, std = float(s.min()), float(s.max()), float(s.std())
        span = hi - lo
        return ScoreFill(
            raw=lo - self.std_below * std,
            minmax=-self.std_below * std / span if span > 0 else 0.0,
            z=float(zscore(s).min()) - self.std_below,
        )


def split_ranking(
    name: str, ranking: Sequence[tuple[str, float]], depth: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Check one ranking and return its top-``depth`` ``(pids, scores)``.

    Refuses (``ValueError`` naming the retriever) duplicate pids, non-finite scores and scores that are not
    best first, since every feature and baseline relies on "higher is better, position = rank".
    """
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be >= 1 or None, got {depth}")
    top = ranking[:depth] if depth is not None else ranking
    pids = [str(pid) for pid, _ in top]
    scores = np.fromiter((score for _, score in top), dtype=np.float64, count=len(top))
    if len(set(pids)) != len(pids):
        dups = sorted(pid for pid, n in Counter(pids).items() if n > 1)
        raise ValueError(f"ranking {name!r} lists pids more than once: {dups[:5]}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            f"ranking {name!r} has non-finite scores at ranks {(np.flatnonzero(~np.isfinite(scores)) + 1)[:5].tolist()}"
        )
    if scores.size > 1 and np.any(np.diff(scores) > 0):
        bad = int(np.flatnonzero(np.diff(scores) > 0)[0]) + 1
        raise ValueError(
            f"ranking {name!r} is not sorted best first: rank {bad} has score {scores[bad - 1]} but rank {bad + 1} "
            f"has {scores[bad]}. Rankings must be [(pid, score), ...] with non-increasing scores (higher = better)."
        )
    return pids, scores


def _as_scores(scores: ArrayLike) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"expected a 1-d list of scores, got shape {s.shape}")
    return s


__all__ = [
    "NORMS",
    "FillPolicy",
    "Norm",
    "Ranking",
    "ScoreFill",
    "minmax",
    "normalise",
    "split_ranking",
    "zscore",
]
