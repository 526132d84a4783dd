"""Document expansion for BM25 (doc2query; Nogueira et al., 2019): index each passage with queries generated for it.

A generated query adds the words a searcher would use but the passage does not (and re-weights the ones it shares),
so BM25 over the expanded text finds more answers at the top; the expansion costs nothing at search time. The
queries come from the project's own LLM (the generation cache ``make synthetic`` writes: one JSON object per
passage, ``{"pid": ..., "queries": [...], "example_qids": [...]}``); the passage text shown to readers and to the
reranker stays the original (only the index sees the expansion).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path


class ExpansionFormatError(ValueError):
    """An expansion file line is not ``{"pid": str, "queries": [str, ...]}``."""


@dataclass(frozen=True)
class Expansions:
    """Generated queries per passage id, and the few-shot example query ids their prompts showed."""

    queries: Mapping[str, tuple[str, ...]]
    example_qids: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def num_queries(self) -> int:
        return sum(map(len, self.queries.values()))

    def without(self, drop: Callable[[str], bool]) -> tuple[Expansions, int]:
        """The expansions without the queries ``drop`` says to leave out (e.g. one equal to an evaluation query),
        and how many were left out; a passage left with none is dropped."""
        kept: dict[str, tuple[str, ...]] = {}
        dropped = 0
        for pid, queries in self.queries.items():
            keep = tuple(q for q in queries if not drop(q))
            dropped += len(queries) - len(keep)
            if keep:
                kept[pid] = keep
        return Expansions(kept, self.example_qids), dropped


def read_expansions(path: str | Path) -> Expansions:
    """Read a JSONL (or ``.gz``) file of generated queries per passage; blank queries are skipped, a pid seen twice
    keeps all its queries. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expansion file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    queries: dict[str, list[str]] = {}
    examples: set[str] = set()
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExpansionFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("pid"), str) or not isinstance(
                    obj.get("queries"), list) or not all(isinstance(q, str) for q in obj["queries"]):
                raise ExpansionFormatError(f'{where}: expected {{"pid": str, "queries": [str, ...]}}')
            queries.setdefault(obj["pid"], []).extend(" ".join(q.split()) for q in obj["queries"] if q.strip())
            examples.update(str(q) for q in obj.get("example_qids", ()))
    return Expansions({pid: tuple(qs) for pid, qs in queries.items() if qs}, frozenset(examples))


def merge_expansions(parts: Iterable[Expansions]) -> Expansions:
    """One :class:`Expansions` from several (e.g. two generation runs with different seeds): a passage keeps the
    queries of every part, in order, duplicates included (a query sampled twice weighs twice, as in doc2query)."""
    queries: dict[str, list[str]] = {}
    examples: set[str] = set()
    for part in parts:
        for pid, qs in part.queries.items():
            queries.setdefault(pid, []).extend(qs)
        examples |= part.example_qids
    return Expansions({pid: tuple(qs) for pid, qs in queries.items()}, frozenset(examples))


def expanded_passages(passages: Iterable[tuple[str, str]], expansions: Expansions) -> Iterator[tuple[str, str]]:
    """``(pid, text)`` with the passage's generated queries appended (on a new line) where it has any."""
    for pid, text in passages:
        extra = expansions.queries.get(pid)
        yield pid, f"{text}\n{' '.join(extra)}" if extra else text


__all__ = ["ExpansionFormatError", "Expansions", "expanded_passages", "merge_expansions", "read_expansions"]
