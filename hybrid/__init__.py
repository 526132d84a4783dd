"""Hybrid MS MARCO passage retriever: BM25 (Pyserini/Anserini) + a self-trained dense bi-encoder, merged by a
learned logistic-regression fusion model.

    from hybrid import Retriever, Result
    results = Retriever().search("what is the capital of france", k=10)
"""

from hybrid.retriever import MODES, Result, Retriever

__all__ = ["MODES", "Result", "Retriever"]
