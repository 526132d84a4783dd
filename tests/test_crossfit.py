"""Cross-fitted fused runs: no query is ranked by a model fitted (or a weight tuned) on it."""

from __future__ import annotations

import pytest

from hybrid.crossfit import folds_of


def test_folds_are_disjoint_cover_all_and_follow_the_seed() -> None:
    qids = [str(i) for i in range(11)]
    folds = folds_of(qids, 3, seed=5)
    assert sorted(q for f in folds for q in f) == sorted(qids) and len({len(f) for f in folds}) <= 2
    assert folds == folds_of(list(reversed(qids)), 3, seed=5) and folds != folds_of(qids, 3, seed=6)
    with pytest.raises(ValueError):
        folds_of(qids, 1, seed=0)


def test_crossfit_ranks_each_query_with_a_model_fitted_without_it(tiny_artifacts, monkeypatch) -> None:
    import fusion.baselines
    import hybrid.crossfit as crossfit
    from hybrid.msmarco import MsMarcoDir

    data = MsMarcoDir(tiny_artifacts.data)
    queries = dict(list(data.queries("train").items())[:20])
    qrels = {q: g for q, g in data.qrels("train").items() if q in queries}
    fitted_on: list[set[str]] = []
    tuned_on: list[set[str]] = []
    real_train, real_tune = crossfit.train_fusion, fusion.baselines.tune_convex_weight

    def recording_train(qs, *args, **kwargs):
        fitted_on.append(set(qs))
        return real_train(qs, *args, **kwargs)

    def recording_tune(rankings, *args, **kwargs):
        tuned_on.append(set(rankings))
        return real_tune(rankings, *args, **kwargs)

    monkeypatch.setattr(crossfit, "train_fusion", recording_train)
    monkeypatch.setattr(crossfit, "tune_convex_weight", recording_tune)
    runs = crossfit.crossfit_holdout_runs(tiny_artifacts.root, queries, qrels, n_folds=2, seed=1)
    assert set(runs) == {"hybrid", "convex"} and set(runs["hybrid"]) == set(queries) == set(runs["convex"])
    folds = folds_of(list(queries), 2, seed=1)
    assert len(fitted_on) == len(tuned_on) == 2
    for fold, fit, tune in zip(folds, fitted_on, tuned_on):
        assert not fit & set(fold) and not tune & set(fold)
        assert fit | set(fold) == set(queries)
    for run in runs.values():
        for ranking in run.values():
            scores = [s for _, s in ranking]
            assert ranking and scores == sorted(scores, reverse=True)
