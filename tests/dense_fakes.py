"""Test doubles shared by the dense tests: a cheap deterministic encoder and a faiss thread fixture."""

from __future__ import annotations

import zlib

import faiss
import numpy as np
import pytest

DIM = 32


class SimulatedKill(RuntimeError):
    """Stands in for the process being killed mid-encoding."""


class HashingEncoder:
    """Signed hashed bag-of-words, L2-normalized: deterministic, cheap, different texts give different vectors.

    Records the texts of every ``encode_passages`` call; raises :class:`SimulatedKill` on call ``fail_on_call``.
    """

    def __init__(self, dim: int = DIM, fail_on_call: int | None = None, scale: float = 1.0) -> None:
        self._dim = dim
        self.fail_on_call = fail_on_call
        self.scale = scale
        self.calls: list[list[str]] = []

    @property
    def dim(self) -> int:
        return self._dim

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in text.lower().split():
                h = zlib.crc32(token.encode())
                out[row, h % self._dim] += 1.0 if (h >> 20) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return self.scale * out / np.maximum(norms, 1e-12)

    def encode_queries(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self._encode(texts)

    def encode_passages(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.calls.append(list(texts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise SimulatedKill(f"killed during call {len(self.calls)}")
        return self._encode(texts)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """OpenMP threads spin-wait on a busy 2-core box; one thread keeps these tiny builds fast and deterministic."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)
