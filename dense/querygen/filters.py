"""Filters for synthetic (query, passage) pairs.

Sanity filters are cheap text checks (length, copied from the passage, no content, chatty/refusal output, equal to a
dev/DL query). The consistency filter (Promptagator's round-trip check) keeps a pair only when a retriever ranks the
source passage in its top ``k`` for the query; it takes any batch-search callable, BM25 first and the trained dense
model later. Every filter counts what it drops; the counts end up in a :class:`FilterReport`.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from dense.querygen.prompt import normalize_query
from dense.querygen.records import QueryPair

logger = logging.getLogger(__name__)

BatchSearch = Callable[[list[str], int], list[list[tuple[str, float]]]]

_WORD = re.compile(r"\w+", re.UNICODE)

DEFAULT_CHATTY_PATTERNS: tuple[str, ...] = (
    r"^(sure|certainly|of course|okay|ok|absolutely|great)\b",
    r"^here (is|are|'s)\b",
    r"^(i|i'm|i am) (can ?not|can't|cannot|am unable|'m unable|sorry|apologi[sz]e|would|will)\b",
    r"^(sorry|unfortunately|as an ai)\b",
    r"^(can|could|would|will) you\b",
    r"\bplease\b",
    r"\b(this|the|given|above) (passage|text|article|paragraph)\b",
    r"\bsearch query\b",
)


SANITY_CHECKS = ("no_content", "chatty", "too_short", "too_long", "run_on", "copied_from_passage",
                 "equals_forbidden_query")

# sentence punctuation followed by more text: the model answered or went on copying the passage after its query
# ("what is a standard road pedal? standard pedals. On the other hand, ..."); 0.5% of the 50k real train queries
# match (e.g. "U.S. Constitution"), a quarter of the LLM queries that passed the other checks did (E12)
_RUN_ON = re.compile(r"[.?!;]\s+\S")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (``\\w+``)."""
    return _WORD.findall(text.lower())


def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


@dataclass(frozen=True)
class SanityFilterConfig:
    """Thresholds of the cheap filters.

    A query counts as *copied* when its longest run of words that also appears contiguously in the passage covers at
    least ``max_copied_fraction`` of the query and is at least ``copy_min_words`` long (short runs such as a name are
    what real queries share with their passages too).
    """

    min_words: int = 2
    max_words: int = 20  # 99.9% of the 50k real train queries have <= 22 words, 99.8% <= 20
    max_copied_fraction: float = 0.8
    copy_min_words: int = 4
    chatty_patterns: tuple[str, ...] = DEFAULT_CHATTY_PATTERNS
    skip: tuple[str, ...] = ()  # names of checks not to run (crop queries are copied by construction)

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"SanityFilterConfig: need 1 <= min_words <= max_words, got {self.min_words}, "
                             f"{self.max_words}")
        if not 0 < self.max_copied_fraction <= 1:
            raise ValueError(f"SanityFilterConfig.max_copied_fraction must be in (0, 1], got "
                             f"{self.max_copied_fraction}")
        for p in self.chatty_patterns:
            re.compile(p)
        unknown = set(self.skip) - set(SANITY_CHECKS)
        if unknown:
            raise ValueError(f"SanityFilterConfig.skip: unknown check(s) {sorted(unknown)}; known: {SANITY_CHECKS}")


@dataclass(frozen=True)
class FilterStage:
    """One filter's effect: how many pairs it dropped and how many were left after it."""

    name: str
    dropped: int
    remaining: int


@dataclass(frozen=True)
class FilterReport:
    """Pairs in, and per filter (in the order applied) pairs dropped; a pair is charged to the first filter it fails."""

    input_pairs: int
    stages: tuple[FilterStage, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def kept(self) -> int:
        return self.stages[-1].remaining if self.stages else self.input_pairs

    def dropped(self, name: str) -> int:
        """Pairs dropped by the filter ``name`` (0 when it did not run)."""
        return next((s.dropped for s in self.stages if s.name == name), 0)

    def then(self, other: FilterReport) -> FilterReport:
        """This report followed by ``other`` (whose input is this report's output)."""
        if other.input_pairs != self.kept:
            raise ValueError(f"cannot chain filter reports: {self.kept} pairs out but {other.input_pairs} in")
        return FilterReport(self.input_pairs, self.stages + other.stages, {**self.settings, **other.settings})

    def table(self) -> str:
        """Plain-text table: one row per filter."""
        rows = [("filter", "dropped", "remaining", "% of input"), ("(input)", "", str(self.input_pairs), "")]
        for s in self.stages:
            pct = 100.0 * s.dropped / self.input_pairs if self.input_pairs else 0.0
            rows.append((s.name, str(s.dropped), str(s.remaining), f"{pct:.1f}"))
        rows.append(("(kept)", "", str(self.kept),
                     f"{100.0 * self.kept / self.input_pairs:.1f}" if self.input_pairs else "0.0"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"input_pairs": self.input_pairs, "kept": self.kept,
                "dropped": {s.name: s.dropped for s in self.stages},
                "stages": [asdict(s) for s in self.stages], "settings": self.settings}


class SanityFilters:
    """The cheap checks, each a named predicate returning True when the pair must be dropped."""

    def __init__(self, config: SanityFilterConfig = SanityFilterConfig(), forbidden_texts: Iterable[str] = ()):
        self.config = config
        self.forbidden_texts = frozenset(normalize_query(t) for t in forbidden_texts)
        self._chatty = [re.compile(p, re.IGNORECASE) for p in config.chatty_patterns]
        self._stop = _stopwords()

    def checks(self) -> list[tuple[str, Callable[[str, str], bool]]]:
        """``(name, drop(query, passage))`` in the order applied."""
        checks = [
            ("no_content", self.no_content),
            ("chatty", self.chatty),
            ("too_short", lambda q, p: len(words(q)) < self.config.min_words),
            ("too_long", lambda q, p: len(words(q)) > self.config.max_words),
            ("run_on", lambda q, p: bool(_RUN_ON.search(q))),
            ("copied_from_passage", self.copied),
            ("equals_forbidden_query", lambda q, p: normalize_query(q) in self.forbidden_texts),
        ]
        assert tuple(name for name, _ in checks) == SANITY_CHECKS
        return [(name, drop) for name, drop in checks if name not in self.config.skip]

    def no_content(self, query: str, passage: str = "") -> bool:
        """Empty, only punctuation, or only stopwords."""
        return not any(w not in self._stop for w in words(query))

    def chatty(self, query: str, passage: str = "") -> bool:
        """Looks like an assistant's reply or talks about "the passage" instead of being a query."""
        q = query.strip()
        return any(p.search(q) for p in self._chatty)

    def copied_fraction(self, query: str, passage: str) -> tuple[float, int]:
        """``(fraction of query words, length)`` of the longest word run shared contiguously with the passage."""
        qw, pw = words(query), words(passage)
        if not qw or not pw:
            return 0.0, 0
        m = difflib.SequenceMatcher(None, qw, pw, autojunk=False).find_longest_match(0, len(qw), 0, len(pw))
        return m.size / len(qw), m.size

    def copied(self, query: str, passage: str) -> bool:
        """The query is (almost) a verbatim span of the passage."""
        frac, size = self.copied_fraction(query, passage)
        return size >= self.config.copy_min_words and frac >= self.config.max_copied_fraction

    def apply(self, pairs: Sequence[QueryPair], passages: Mapping[str, str]) -> tuple[list[QueryPair], FilterReport]:
        """Pairs passing every check, and the counts. ``passages`` maps pid -> text (for the copy check)."""
        checks = self.checks()
        dropped = dict.fromkeys((name for name, _ in checks), 0)
        kept = []
        for pair in pairs:
            passage = pair.positive_text if pair.positive_text is not None else passages.get(pair.pid)
            if passage is None:
                raise KeyError(f"filter: passage {pair.pid} of query {pair.qid} is not in the passages given")
            failed = next((name for name, drop in checks if drop(pair.query, passage)), None)
            if failed is None:
                kept.append(pair)
            else:
                dropped[failed] += 1
        stages, remaining = [], len(pairs)
        for name, n in dropped.items():
            remaining -= n
            stages.append(FilterStage(name, n, remaining))
        settings = {"sanity": asdict(self.config), "num_forbidden_texts": len(self.forbidden_texts)}
        return kept, FilterReport(len(pairs), tuple(stages), settings)


def consistency_filter(
    pairs: Sequence[QueryPair], search: BatchSearch, k: int, batch_size: int = 256, name: str = "consistency"
) -> tuple[list[QueryPair], FilterReport]:
    """Keep pairs whose own passage is in ``search``'s top ``k`` for their query (round-trip consistency)."""
    if k < 1:
        raise ValueError(f"consistency_filter: k must be >= 1, got {k}")
    kept: list[QueryPair] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc=f"{name} filter (top {k})", unit="batch"):
        batch = pairs[start:start + batch_size]
        rankings = search([p.query for p in batch], k)
        if len(rankings) != len(batch):
            raise ValueError(f"consistency_filter: search returned {len(rankings)} rankings for {len(batch)} queries")
        kept.extend(p for p, ranking in zip(batch, rankings) if p.pid in {pid for pid, _ in ranking[:k]})
    stage_name = f"{name}@{k}"
    report = FilterReport(len(pairs), (FilterStage(stage_name, len(pairs) - len(kept), len(kept)),),
                          {stage_name: {"k": k}})
    logger.info("%s: kept %d of %d pairs", stage_name, len(kept), len(pairs))
    return kept, report
