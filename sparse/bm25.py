"""BM25 search over a Lucene index built by :mod:`sparse.index`, through Anserini's SimpleSearcher.

Queries are bag-of-words text, never Lucene query syntax: Anserini's default query generator analyses the
string, so ``AND``, quotes, ``:`` or ``*`` are plain characters. The JVM and the searcher are created once in
``__init__``; a call is one JNI round trip.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from sparse.index import read_manifest
from sparse.jvm import autoclass

logger = logging.getLogger(__name__)

Ranking = list[tuple[str, float]]

MSMARCO_K1 = 0.82
MSMARCO_B = 0.68
# MS MARCO queries are < 200 characters; a longer query is cut to this many characters before analysis (a 100 KB
# query is still answered, from its start).
MAX_QUERY_CHARS = 2000
# Lucene refuses a Boolean query with more clauses than its (JVM-wide) limit, 1024 by default, and Anserini makes one
# clause per distinct analysed term: a CJK character is a term of its own, so a 1,100-character Chinese query raised
# TooManyClauses. A cut query has at most MAX_QUERY_CHARS terms; the limit is raised to that when a searcher opens.
MAX_CLAUSES = MAX_QUERY_CHARS


class BM25Searcher:
    """BM25 (k1=0.82, b=0.68 for MS MARCO passage by default) over an index directory from :func:`build_index`."""

    def __init__(self, index_dir: str | Path, k1: float = MSMARCO_K1, b: float = MSMARCO_B, threads: int = 2):
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(self.index_dir)
        self.threads = threads
        self.k1, self.b = k1, b
        index_searcher = autoclass("org.apache.lucene.search.IndexSearcher")
        if index_searcher.getMaxClauseCount() < MAX_CLAUSES:
            index_searcher.setMaxClauseCount(MAX_CLAUSES)
        searcher_cls = autoclass("io.anserini.search.SimpleSearcher")
        self._searcher = searcher_cls(str(self.index_dir / "lucene"))
        self._searcher.set_bm25(float(k1), float(b))
        self._jstring_list = autoclass("java.util.ArrayList")
        self.num_docs = int(self._searcher.get_total_num_docs())
        # pyjnius objects are not documented as thread-safe; a call takes ~ms, so one lock costs little.
        self._lock = threading.Lock()

    @staticmethod
    def _clean(query: str) -> str:
        return query[:MAX_QUERY_CHARS]

    def search(self, query: str, k: int) -> Ranking:
        """Top-``k`` ``(pid, score)`` for one query, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with self._lock:
            hits = self._searcher.search(self._clean(query), int(min(k, self.num_docs)))
            return [(h.docid, float(h.score)) for h in hits]

    def batch_search(self, queries: list[str], k: int, threads: int | None = None) -> list[Ranking]:
        """Top-``k`` for many queries, searched by ``threads`` Java threads; results in input order."""
        if isinstance(queries, (str, bytes)):  # a str is iterable: it would be searched character by character
            raise TypeError("batch_search takes a list of queries, not one string; use search() for a single query")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        qs, ids = self._jstring_list(), self._jstring_list()
        for i, q in enumerate(queries):
            qs.add(self._clean(q))
            ids.add(str(i))
        with self._lock:
            result = self._searcher.batch_search(qs, ids, int(min(k, self.num_docs)), int(threads or self.threads))
            by_id = {e.getKey(): e.getValue() for e in result.entrySet().toArray()}
            return [[(h.docid, float(h.score)) for h in by_id.get(str(i), [])] for i in range(len(queries))]

    def doc_text(self, pid: str) -> str | None:
        """Stored raw text of a passage (the JSON ``contents``), or None if the pid is not indexed."""
        with self._lock:
            doc = self._searcher.doc(str(pid))
            if doc is None:
                return None
            raw = doc.get("raw")
        return json.loads(raw)["contents"] if raw else None

    def close(self) -> None:
        self._searcher.close()
