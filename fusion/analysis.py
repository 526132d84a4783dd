"""Text analysis for the fusion features: a small analyzer and a document-frequency (IDF) table.

The fusion model only needs coarse lexical signals (query length, term overlap, IDF-weighted overlap), so the
analyzer is deliberately simple and pure Python: lowercase, split on Unicode word characters, drop a short English
stopword list (Lucene's classic English stop set, the one Pyserini's default analyzer uses), and optionally Porter
stemming when a maintained stemmer (PyStemmer or NLTK) is already installed. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dense.atomic import write_json_atomic

logger = logging.getLogger(__name__)

IDF_FORMAT = "fusion-idf-table"
IDF_FORMAT_VERSION = 1

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (33 words).
ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such "
    "that the their then there these they this to was will with".split()
)

# Unicode letters and digits; `\w` minus the underscore.
_WORD_RE = re.compile(r"[^\W_]+")


class StemmerUnavailableError(ImportError):
    """Stemming was requested but no supported stemmer library is installed."""


@functools.cache
def _porter_stemmer() -> Callable[[str], str]:
    """Return a Porter stem function from PyStemmer or NLTK, whichever is installed (PyStemmer first: it is C)."""
    try:
        import Stemmer  # PyStemmer

        stemmer = Stemmer.Stemmer("porter")
        return stemmer.stemWord
    except ImportError:
        pass
    try:
        from nltk.stem.porter import PorterStemmer

        return PorterStemmer().stem
    except ImportError:
        pass
    raise StemmerUnavailableError(
        "Analyzer(stem=True) needs PyStemmer or NLTK, and neither is installed. "
        "Install one (`pip install PyStemmer`) or use Analyzer(stem=False)."
    )


@dataclass(frozen=True)
class Analyzer:
    """Lowercase, Unicode word split, stopword removal, optional Porter stemming.

    ``Analyzer()`` is the default used everywhere; an :class:`IdfTable` records the analyzer that built it so a
    feature builder can refuse a table made with different settings.
    """

    lowercase: bool = True
    remove_stopwords: bool = True
    stem: bool = False

    def __post_init__(self) -> None:
        if self.stem:
            _porter_stemmer()  # fail at construction, not at the first passage

    def tokenize(self, text: str) -> list[str]:
        """Analyzed tokens of ``text`` in order (duplicates kept)."""
        if self.lowercase:
            text = text.lower()
        tokens = _WORD_RE.findall(text)
        if self.remove_stopwords:
            # Stopwords are lowercase; compare lowercase even when the tokens keep their case (this runs for
            # every candidate passage at search time, so skip the extra lower() when the text is lowercased).
            if self.lowercase:
                tokens = [t for t in tokens if t not in ENGLISH_STOPWORDS]
            else:
                tokens = [t for t in tokens if t.lower() not in ENGLISH_STOPWORDS]
        if self.stem:
            stem = _porter_stemmer()
            tokens = [stem(t) for t in tokens]
        return tokens

    __call__ = tokenize

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Analyzer:
        unknown = set(data) - {"lowercase", "remove_stopwords", "stem"}
        if unknown:
            raise ValueError(f"unknown analyzer settings {sorted(unknown)}; known: lowercase, remove_stopwords, stem")
        return cls(**data)


def bm25_idf(df: np.ndarray | int, n_docs: int) -> np.ndarray | float:
    """BM25 (Lucene) idf: ``log(1 + (N - df + 0.5) / (df + 0.5))``; always positive."""
    return np.log1p((n_docs - np.asarray(df, dtype=np.float64) + 0.5) / (np.asarray(df, dtype=np.float64) + 0.5))


class IdfTable:
    """Document frequencies of analyzed terms over a collection, with BM25-style idf.

    An unseen term gets the idf of ``df = 0``, ``log(1 + (N + 0.5) / 0.5)``, which is above every seen term's idf
    (the rarest possible term): a query word absent from the collection is maximally informative, as in Lucene.
    """

    def __init__(self, df: dict[str, int], n_docs: int, analyzer: Analyzer) -> None:
        if n_docs < 0:
            raise ValueError(f"n_docs must be >= 0, got {n_docs}")
        bad = [(t, c) for t, c in df.items() if not 0 < c <= n_docs]
        if bad:
            raise ValueError(f"document frequencies must lie in 1..n_docs={n_docs}; first bad entries: {bad[:5]}")
        self.df = df
        self.n_docs = n_docs
        self.analyzer = analyzer
        self.unseen_idf = float(bm25_idf(0, n_docs))

    def __len__(self) -> int:
        return len(self.df)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdfTable):
            return NotImplemented
        return (self.n_docs, self.analyzer, self.df) == (other.n_docs, other.analyzer, other.df)

    def __repr__(self) -> str:
        return f"IdfTable(n_docs={self.n_docs}, terms={len(self.df)}, analyzer={self.analyzer})"

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        analyzer: Analyzer | None = None,
        progress: bool = True,
        total: int | None = None,
    ) -> IdfTable:
        """Count document frequencies over ``texts`` (streamed: only the term counter is kept in memory).

        ``total`` sizes the progress bar when ``texts`` has no ``len`` (e.g. a generator over 8.8M passages).
        """
        analyzer = analyzer or Analyzer()
        if total is None and hasattr(texts, "__len__"):
            total = len(texts)  # type: ignore[arg-type]
        counts: Counter[str] = Counter()
        n_docs = 0
        start = time.perf_counter()
        for text in tqdm(texts, total=total, desc="idf table", unit="doc", disable=not progress, mininterval=2.0):
            counts.update(set(analyzer.tokenize(text)))
            n_docs += 1
        elapsed = time.perf_counter() - start
        logger.info(
            "idf table: %d documents, %d terms in %.1f s (%.0f docs/s)",
            n_docs,
            len(counts),
            elapsed,
            n_docs / elapsed if elapsed > 0 else float("inf"),
        )
        return cls(dict(counts), n_docs, analyzer)

    def idf(self, term: str) -> float:
        """BM25 idf of one analyzed term; unseen terms get :attr:`unseen_idf`."""
        df = self.df.get(term)
        return self.unseen_idf if df is None else float(bm25_idf(df, self.n_docs))

    def idfs(self, terms: Sequence[str]) -> np.ndarray:
        """Vector of idfs (float64) for analyzed terms."""
        dfs = np.fromiter((self.df.get(t, 0) for t in terms), dtype=np.float64, count=len(terms))
        return np.asarray(bm25_idf(dfs, self.n_docs), dtype=np.float64)

    def save(self, path: str | Path) -> None:
        """Write the table as JSON, atomically (temp file in the same directory, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": IDF_FORMAT,
            "format_version": IDF_FORMAT_VERSION,
            "n_docs": self.n_docs,
            "analyzer": self.analyzer.to_dict(),
            "df": self.df,
        }
        write_json_atomic(path, payload, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> IdfTable:
        """Read a table written by :meth:`save`; a wrong format or version raises ``ValueError`` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"idf table {path} does not exist; build it with IdfTable.build(...).save(path)")
        with path.open(encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"idf table {path} is not valid JSON ({e}); rebuild it") from e
        if data.get("format") != IDF_FORMAT or data.get("format_version") != IDF_FORMAT_VERSION:
            raise ValueError(
                f"idf table {path} has format {data.get('format')!r} version {data.get('format_version')!r}; "
                f"this code reads {IDF_FORMAT!r} version {IDF_FORMAT_VERSION}. Rebuild the table."
            )
        return cls(
            {str(k): int(v) for k, v in data["df"].items()}, int(data["n_docs"]), Analyzer.from_dict(data["analyzer"])
        )


__all__ = [
    "ENGLISH_STOPWORDS",
    "Analyzer",
    "IdfTable",
    "StemmerUnavailableError",
    "bm25_idf",
]
