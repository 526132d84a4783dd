"""A cheap validation signal for training: rerank a few validation queries' BM25 candidates with the encoder.

Encoding the whole corpus at every evaluation would cost more than training on a CPU, so validation scores the
encoder as a reranker of fixed candidate lists (e.g. BM25 top-30). Validation queries select checkpoints; they
never train.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dense.encoder_base import DenseEncoder

Validate = Callable[[DenseEncoder], dict[str, float]]


def rerank_validator(
    queries: Mapping[str, str],
    relevant: Mapping[str, set[str]],
    candidates: Mapping[str, Sequence[str]],
    passage_text: Callable[[list[str]], list[str]],
    batch_size: int = 64,
) -> Validate:
    """``validate(encoder) -> {"val_R@1", "val_MRR@10", "val_n"}`` over the queries that have candidates.

    A query whose relevant passages are not among its candidates scores 0 (the candidates bound what is found).
    """
    qids = [q for q in queries if candidates.get(q)]
    if not qids:
        raise ValueError("rerank_validator: no validation query has candidates")
    texts = {q: passage_text(list(candidates[q])) for q in qids}

    def validate(encoder: DenseEncoder) -> dict[str, float]:
        q_vecs = encoder.encode_queries([queries[q] for q in qids], batch_size=batch_size)
        r1, rr = [], []
        for vec, q in zip(q_vecs, qids):
            p_vecs = encoder.encode_passages(texts[q], batch_size=batch_size)
            order = np.argsort(-(p_vecs @ vec), kind="stable")
            ranked = [candidates[q][i] for i in order]
            hits = [i for i, pid in enumerate(ranked[:10]) if pid in relevant.get(q, set())]
            r1.append(1.0 if ranked and ranked[0] in relevant.get(q, set()) else 0.0)
            rr.append(1.0 / (hits[0] + 1) if hits else 0.0)
        return {"val_R@1": float(np.mean(r1)), "val_MRR@10": float(np.mean(rr)), "val_n": float(len(qids))}

    return validate
