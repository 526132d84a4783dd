"""Plain record types passed between the query-generation modules (no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GeneratedQueries:
    """The cleaned, de-duplicated queries one generation call produced for one passage.

    ``raw`` keeps the model's untouched outputs (one per sampled sequence) so that filters and post-processing can
    be judged afterwards; ``example_qids`` are the few-shot train queries that were in the prompt.
    """

    pid: str
    queries: tuple[str, ...]
    raw: tuple[str, ...] = ()
    example_qids: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryPair:
    """One synthetic (query, positive passage) training pair.

    ``positive_text`` is set only when the positive is not the stored passage text (inverse cloze: the passage with
    the query sentence removed); ``None`` means "look the text up by ``pid``".
    """

    qid: str
    query: str
    pid: str
    source: str
    positive_text: str | None = field(default=None, compare=False)
