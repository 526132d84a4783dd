"""The learned fusion model: standardise features, then logistic regression (scikit-learn).

Training uses a scikit-learn ``Pipeline(StandardScaler, LogisticRegression)``. Scoring uses the fitted parameters
directly (``((X - mean) / scale) @ coef + intercept``, the pipeline's decision function), so a model saved as JSON
and loaded again scores bit-for-bit like the one that was trained, with no pickle involved. The JSON stores the
feature list, scaler, coefficients, hyper-parameters and a format version; a model whose feature list differs from
the caller's is refused, because the columns would silently mean different things.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from dense.atomic import write_json_atomic
from fusion.features import CandidateSet
from fusion.normalise import Ranking

logger = logging.getLogger(__name__)

MODEL_FORMAT = "fusion-logistic-regression"
MODEL_FORMAT_VERSION = 1
RERUN_HINT = "Rerun the fusion training stage (it rewrites fusion/model.json) with the current features."


class FeatureMismatchError(ValueError):
    """A saved fusion model does not fit this code: different feature list, or different file format/version."""


class NotFittedError(RuntimeError):
    """The fusion model was used before ``fit`` or ``load``."""


class FusionModel:
    """Logistic regression over fusion features; ``score`` gives comparable-within-a-query relevance scores."""

    def __init__(
        self,
        feature_names: Sequence[str],
        C: float = 1.0,
        balanced: bool = False,
        max_iter: int = 1000,
    ) -> None:
        feature_names = tuple(feature_names)
        if not feature_names or len(set(feature_names)) != len(feature_names):
            raise ValueError(f"feature_names must be non-empty and unique, got {feature_names!r}")
        if not C > 0:
            raise ValueError(f"C (inverse regularisation strength) must be > 0, got {C}")
        self.feature_names = feature_names
        self.C = float(C)
        self.balanced = balanced
        self.max_iter = max_iter
        self.metadata: dict[str, Any] = {}
        self._mean: np.ndarray | None = None
        self._scale: np.ndarray | None = None
        self._coef: np.ndarray | None = None
        self._intercept = 0.0

    def fit(self, X: ArrayLike, y: ArrayLike) -> FusionModel:
        """Fit scaler + logistic regression on rows ``X`` (n, f) with binary labels ``y`` (1 = relevant)."""
        X = self._check_X(X)
        y = np.asarray(y).ravel()
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
        classes = set(np.unique(y).tolist())
        if not classes <= {0, 1} or len(classes) < 2:
            raise ValueError(
                f"y must hold both labels 0 and 1 (got {sorted(classes)}); the training set needs relevant and "
                "non-relevant candidates"
            )
        pipe = Pipeline(
            [
                ("scale", StandardScaler()),
                (
                    "logreg",
                    LogisticRegression(
                        C=self.C, class_weight="balanced" if self.balanced else None, max_iter=self.max_iter
                    ),
                ),
            ]
        )
        pipe.fit(X, y.astype(np.int64))
        scaler: StandardScaler = pipe.named_steps["scale"]
        logreg: LogisticRegression = pipe.named_steps["logreg"]
        if logreg.n_iter_.max() >= self.max_iter:
            logger.warning("logistic regression hit max_iter=%d without converging; raise max_iter", self.max_iter)
        self._mean = scaler.mean_.astype(np.float64)
        self._scale = scaler.scale_.astype(np.float64)
        self._coef = logreg.coef_[0].astype(np.float64)
        self._intercept = float(logreg.intercept_[0])
        logger.info("fusion model fitted on %d rows (%d positive), %d features", len(y), int(y.sum()), X.shape[1])
        return self

    def score(self, X: ArrayLike) -> np.ndarray:
        """Decision function (log-odds of relevance) per row; higher = more relevant."""
        mean, scale, coef = self._params()
        X = self._check_X(X)
        return ((X - mean) / scale) @ coef + self._intercept

    def fuse(self, candidates: CandidateSet, k: int | None = None) -> Ranking:
        """Rank a query's candidates by model score, best first (ties keep candidate order); top ``k`` if given."""
        if tuple(candidates.feature_names) != self.feature_names:
            raise FeatureMismatchError(
                _mismatch_message("this candidate set", candidates.feature_names, self.feature_names)
            )
        if len(candidates) == 0:
            return []
        scores = self.score(candidates.X)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(candidates.pids[i], float(scores[i])) for i in order]

    def coefficients(self, units: Literal["standardised", "original"] = "standardised") -> dict[str, float]:
        """Weight per feature: per standard deviation (``standardised``) or per raw feature unit (``original``)."""
        _, scale, coef = self._params()
        if units == "standardised":
            values = coef
        elif units == "original":
            values = coef / scale
        else:
            raise ValueError(f"units must be 'standardised' or 'original', got {units!r}")
        return dict(zip(self.feature_names, values.tolist()))

    def intercept(self, units: Literal["standardised", "original"] = "standardised") -> float:
        """Intercept matching :meth:`coefficients` in the same units."""
        mean, scale, coef = self._params()
        if units == "standardised":
            return self._intercept
        if units == "original":
            return float(self._intercept - np.sum(coef * mean / scale))
        raise ValueError(f"units must be 'standardised' or 'original', got {units!r}")

    def save(self, path: str | Path) -> None:
        """Write the model as reviewable JSON, atomically."""
        mean, scale, coef = self._params()
        payload = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "feature_names": list(self.feature_names),
            "params": {"C": self.C, "balanced": self.balanced, "max_iter": self.max_iter},
            "scaler": {"mean": mean.tolist(), "scale": scale.tolist()},
            "coef": coef.tolist(),
            "intercept": self._intercept,
            "coefficients_standardised": self.coefficients("standardised"),
            "metadata": self.metadata,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, payload)
        logger.info("fusion model saved to %s", path)

    @classmethod
    def load(cls, path: str | Path, expected_features: Sequence[str]) -> FusionModel:
        """Read a model written by :meth:`save`; refuse it unless its features equal ``expected_features``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"fusion model {path} does not exist. {RERUN_HINT}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FeatureMismatchError(f"fusion model {path} is not valid JSON ({e}). {RERUN_HINT}") from e
        if data.get("format") != MODEL_FORMAT or data.get("format_version") != MODEL_FORMAT_VERSION:
            raise FeatureMismatchError(
                f"fusion model {path} has format {data.get('format')!r} version {data.get('format_version')!r}; "
                f"this code reads {MODEL_FORMAT!r} version {MODEL_FORMAT_VERSION}. {RERUN_HINT}"
            )
        saved = tuple(data["feature_names"])
        if saved != tuple(expected_features):
            raise FeatureMismatchError(_mismatch_message(f"fusion model {path}", saved, tuple(expected_features)))
        params = data["params"]
        model = cls(saved, C=params["C"], balanced=params["balanced"], max_iter=params["max_iter"])
        f = len(saved)
        mean, scale, coef = (
            np.asarray(v, dtype=np.float64) for v in (data["scaler"]["mean"], data["scaler"]["scale"], data["coef"])
        )
        if not mean.shape == scale.shape == coef.shape == (f,) or not np.all(scale > 0):
            raise FeatureMismatchError(
                f"fusion model {path} is corrupt: parameter lengths differ from its {f} features. {RERUN_HINT}"
            )
        model._mean, model._scale, model._coef = mean, scale, coef
        model._intercept = float(data["intercept"])
        model.metadata = dict(data.get("metadata") or {})
        return model

    def _params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._mean is None or self._scale is None or self._coef is None:
            raise NotFittedError("the fusion model is not fitted; call fit(X, y) or FusionModel.load(path, features)")
        return self._mean, self._scale, self._coef

    def _check_X(self, X: ArrayLike) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise ValueError(
                f"X must have shape (n, {len(self.feature_names)}) for features {self.feature_names}, got {X.shape}"
            )
        bad_cols = np.flatnonzero(~np.isfinite(X).all(axis=0))
        if bad_cols.size:
            raise ValueError(f"X has non-finite values in columns {[self.feature_names[j] for j in bad_cols]}")
        return X


def _mismatch_message(what: str, have: Sequence[str], expected: Sequence[str]) -> str:
    """Name the features that differ (or where the order differs) and say how to fix it."""
    have_set, expected_set = set(have), set(expected)
    only_have = [f for f in have if f not in expected_set]
    only_expected = [f for f in expected if f not in have_set]
    parts = []
    if only_have:
        parts.append(f"features not expected here: {only_have}")
    if only_expected:
        parts.append(f"expected features it lacks: {only_expected}")
    if not parts:
        first = next(i for i, (a, b) in enumerate(zip(have, expected)) if a != b)
        parts.append(f"same features in a different order (position {first}: {have[first]!r} vs {expected[first]!r})")
    return f"{what} was built for different features; {'; '.join(parts)}. {RERUN_HINT}"


__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "FeatureMismatchError", "FusionModel", "NotFittedError"]
