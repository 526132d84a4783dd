"""Per-passage analyzed terms, computed once over the corpus, so the text features cost no tokenisation at search.

The learned fusion needs, for each of ~200 candidates per query, the passage's analyzed length and which query
terms it contains. Tokenising those passages in Python at search time cost ~10 ms per query (E6), the largest part
of the fusion's latency. :class:`PassageLexicon` stores, for every passage, its distinct analyzed term ids (sorted)
and its analyzed token count; search then reduces to an integer gather and a comparison against the query's few
term ids (well under 1 ms). The same single pass over the corpus yields the document frequencies, so building the
lexicon also gives the :class:`~fusion.analysis.IdfTable` (:meth:`PassageLexicon.idf_table`; not stored twice).

Files in the lexicon directory (all ``.npy`` memory-mapped on load):

- ``keys.npy``     pids as sorted fixed-width bytes (binary search, like the passage store)
- ``starts.npy``   int64, where each passage's term ids start in ``terms.npy`` (row order = sorted keys)
- ``counts.npy``   int32, number of distinct analyzed terms of each passage
- ``lengths.npy``  int32, analyzed token count (repeats counted) of each passage
- ``terms.npy``    int32, the concatenated sorted term ids, in corpus (file) order
- ``vocab.json``   the analyzer and the term of each id

At 8.8M passages: ~35 distinct terms per passage -> ~1.2 GB of ``terms.npy``, memory-mapped and shared.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dense.atomic import atomic_directory
from fusion.analysis import Analyzer, IdfTable

FORMAT = "fusion-passage-lexicon"
VERSION = 1
_FILES = ("keys.npy", "starts.npy", "counts.npy", "lengths.npy", "terms.npy", "vocab.json")


class LexiconError(RuntimeError):
    """The lexicon directory is missing, incomplete, or of another format."""


class PassageLexicon:
    """Distinct analyzed term ids and analyzed length per passage, looked up by pid."""

    def __init__(
        self,
        analyzer: Analyzer,
        vocab: Sequence[str],
        keys: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        lengths: np.ndarray,
        terms: np.ndarray,
    ) -> None:
        if not (len(keys) == len(starts) == len(counts) == len(lengths)):
            raise ValueError("keys, starts, counts and lengths must have one entry per passage")
        self.analyzer = analyzer
        self.vocab = list(vocab)
        self._term_id = {t: i for i, t in enumerate(self.vocab)}
        self._keys, self._starts, self._counts, self._lengths, self._terms = keys, starts, counts, lengths, terms

    def __len__(self) -> int:
        return int(self._keys.size)

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        passages: Iterable[tuple[str, str]],
        analyzer: Analyzer | None = None,
        total: int | None = None,
        progress: bool = True,
    ) -> tuple[PassageLexicon, IdfTable]:
        """One pass over ``(pid, text)`` pairs: the lexicon and the idf table of the same analyzer.

        A duplicate pid raises ``ValueError`` naming it (lookups by pid would be ambiguous).
        """
        analyzer = analyzer or Analyzer()
        term_id: dict[str, int] = {}
        pids: list[str] = []
        terms, counts, lengths = array("i"), array("i"), array("i")
        for pid, text in tqdm(passages, total=total, desc="passage lexicon", unit="doc", disable=not progress,
                              mininterval=2.0):
            tokens = analyzer.tokenize(text)
            ids = sorted({term_id.setdefault(t, len(term_id)) for t in tokens})
            pids.append(pid)
            terms.extend(ids)
            counts.append(len(ids))
            lengths.append(len(tokens))
        terms_np = np.frombuffer(terms, dtype=np.int32).copy() if terms else np.zeros(0, np.int32)
        counts_np = np.frombuffer(counts, dtype=np.int32).copy() if counts else np.zeros(0, np.int32)
        lengths_np = np.frombuffer(lengths, dtype=np.int32).copy() if lengths else np.zeros(0, np.int32)
        starts_np = np.zeros(len(pids), dtype=np.int64)
        if len(pids) > 1:
            np.cumsum(counts_np[:-1], out=starts_np[1:])
        keys = np.array([p.encode() for p in pids], dtype=f"S{max((len(p.encode()) for p in pids), default=1)}")
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        dup = np.flatnonzero(keys[1:] == keys[:-1])
        if dup.size:
            raise ValueError(f"duplicate passage id {keys[dup[0]].decode()!r}: every pid must be unique")
        vocab = [""] * len(term_id)
        for t, i in term_id.items():
            vocab[i] = t
        lexicon = cls(analyzer, vocab, keys, starts_np[order], counts_np[order], lengths_np[order], terms_np)
        return lexicon, lexicon.idf_table()

    def idf_table(self) -> IdfTable:
        """Document frequencies of every term (each passage lists a term once, so df = count of its id)."""
        df = np.bincount(np.asarray(self._terms), minlength=len(self.vocab))
        return IdfTable({t: int(c) for t, c in zip(self.vocab, df.tolist())}, len(self), self.analyzer)

    def save(self, directory: str | Path) -> None:
        """Write into ``directory`` atomically (a temp sibling renamed into place)."""
        with atomic_directory(directory) as tmp:
            np.save(tmp / "keys.npy", self._keys)
            np.save(tmp / "starts.npy", np.asarray(self._starts))
            np.save(tmp / "counts.npy", np.asarray(self._counts))
            np.save(tmp / "lengths.npy", np.asarray(self._lengths))
            np.save(tmp / "terms.npy", np.asarray(self._terms))
            meta = {"format": FORMAT, "version": VERSION, "analyzer": self.analyzer.to_dict(),
                    "passages": len(self), "vocab": self.vocab}
            (tmp / "vocab.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> PassageLexicon:
        directory = Path(directory)
        missing = [f for f in _FILES if not (directory / f).is_file()]
        if missing:
            raise LexiconError(f"passage lexicon {directory} lacks {missing}; rerun the fusion stage to build it")
        meta = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise LexiconError(
                f"passage lexicon {directory} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                f"this code reads {FORMAT!r} version {VERSION}. Rerun the fusion stage."
            )
        arrays = [np.load(directory / f, mmap_mode="r") for f in _FILES[:-1]]
        return cls(Analyzer.from_dict(meta["analyzer"]), meta["vocab"], *arrays)

    # ---- lookups ---------------------------------------------------------------------------------------------
    def rows(self, pids: Sequence[str]) -> np.ndarray:
        """Row of each pid; ``KeyError`` naming the pids the lexicon does not hold."""
        width = self._keys.dtype.itemsize
        encoded = [p.encode() for p in pids]
        fits = np.array([0 < len(b) <= width for b in encoded], dtype=bool)
        query = np.array([b if ok else b"" for b, ok in zip(encoded, fits)], dtype=self._keys.dtype)
        idx = np.minimum(np.searchsorted(self._keys, query), max(len(self) - 1, 0))
        hit = fits & (self._keys[idx] == query) if len(self) else np.zeros(len(pids), dtype=bool)
        if not hit.all():
            missing = [pids[i] for i in np.flatnonzero(~hit)[:5]]
            raise KeyError(f"{int((~hit).sum())} passage(s) not in the lexicon, e.g. {missing}; "
                           "the lexicon was built from another collection: rerun the fusion stage")
        return idx

    def term_ids(self, terms: Sequence[str]) -> np.ndarray:
        """Id of each analyzed term, ``-1`` for terms no passage contains."""
        return np.fromiter((self._term_id.get(t, -1) for t in terms), dtype=np.int64, count=len(terms))

    def lengths(self, pids: Sequence[str]) -> np.ndarray:
        """Analyzed token count (repeats counted) of each passage."""
        return np.asarray(self._lengths[self.rows(pids)], dtype=np.int64)

    def overlap(self, pids: Sequence[str], query_term_ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(lengths, shared count, shared weight)`` per passage for distinct query term ids and their weights.

        ``shared count`` is how many of the query terms occur in the passage; ``shared weight`` sums their weights.
        """
        rows = self.rows(pids)
        counts = np.asarray(self._counts[rows], dtype=np.int64)
        starts = np.asarray(self._starts[rows], dtype=np.int64)
        total = int(counts.sum())
        # positions of every candidate's term ids in terms.npy, concatenated
        seg_start = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        gathered = np.asarray(self._terms[seg_start + np.arange(total)])
        segment = np.repeat(np.arange(len(rows)), counts)
        shared = np.zeros(total, dtype=np.float64)
        weight = np.zeros(total, dtype=np.float64)
        for tid, w in zip(query_term_ids.tolist(), weights.tolist()):
            if tid >= 0:
                hit = gathered == tid
                shared += hit
                weight += hit * w
        n = len(rows)
        return (
            np.asarray(self._lengths[rows], dtype=np.int64),
            np.bincount(segment, weights=shared, minlength=n),
            np.bincount(segment, weights=weight, minlength=n),
        )


def build_and_save(
    passages: Iterable[tuple[str, str]], directory: str | Path, analyzer: Analyzer | None = None,
    total: int | None = None, progress: bool = True,
) -> tuple[PassageLexicon, IdfTable]:
    """:meth:`PassageLexicon.build`, save, and reopen memory-mapped (what search uses)."""
    lexicon, idf = PassageLexicon.build(passages, analyzer, total, progress)
    lexicon.save(directory)
    return PassageLexicon.load(directory), idf


__all__ = ["LexiconError", "PassageLexicon", "build_and_save"]
