"""Teacher groups for distillation: a query, candidate passages, and a teacher's score for each.

A group is one line of JSONL:
``{"qid": "...", "query": "...", "pids": ["pid", ...], "scores": [float, ...], "query_tokens": n}``.
The scores are the reranker's (mean log P(query | passage) of SmolLM2, ``hybrid.teacher_scores``); ``query_tokens``
turns them back into the log-likelihood of the whole query (``score * query_tokens``), which is what
:meth:`TeacherGroup.log_likelihoods` returns and the distillation loss softmaxes over the group: the posterior of each
candidate under a uniform prior, with no temperature to choose. Groups name passages by pid; the text comes from the
collection at training time, as for :class:`dense.training_data.TrainingRecord`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dense.training_data import iter_jsonl


class TeacherFormatError(ValueError):
    """A teacher-score file has a malformed line; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class TeacherGroup:
    """One query, its candidate passages and the teacher's (per-token mean) score for each."""

    qid: str
    query: str
    pids: tuple[str, ...]
    scores: tuple[float, ...]
    query_tokens: int

    def __post_init__(self) -> None:
        if len(self.pids) != len(self.scores):
            raise TeacherFormatError(f"qid {self.qid}: {len(self.pids)} pids but {len(self.scores)} scores")
        if len(self.pids) < 2:
            raise TeacherFormatError(f"qid {self.qid}: a group needs at least 2 passages, got {len(self.pids)}")
        if len(set(self.pids)) != len(self.pids):
            raise TeacherFormatError(f"qid {self.qid}: a passage appears twice in the group")
        if not all(math.isfinite(s) for s in self.scores):
            raise TeacherFormatError(f"qid {self.qid}: scores must be finite numbers")
        if self.query_tokens < 1:
            raise TeacherFormatError(f"qid {self.qid}: query_tokens must be >= 1, got {self.query_tokens}")

    def log_likelihoods(self) -> list[float]:
        """Teacher log P(query | passage) of the whole query, one per passage."""
        return [s * self.query_tokens for s in self.scores]

    @classmethod
    def from_json(cls, obj: Any, where: str = "") -> TeacherGroup:
        prefix = f"{where}: " if where else ""
        if not isinstance(obj, dict):
            raise TeacherFormatError(f"{prefix}expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("qid", "query", "pids", "scores", "query_tokens") if k not in obj]
        if missing:
            raise TeacherFormatError(f"{prefix}missing key(s) {missing}")
        query, pids, scores, n = obj["query"], obj["pids"], obj["scores"], obj["query_tokens"]
        if not isinstance(query, str) or not query.strip():
            raise TeacherFormatError(f"{prefix}query must be a non-empty string, got {query!r}")
        if not isinstance(pids, list) or not all(isinstance(p, (str, int)) for p in pids):
            raise TeacherFormatError(f"{prefix}pids must be a list of pids, got {pids!r}")
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                   for s in scores):
            raise TeacherFormatError(f"{prefix}scores must be a list of numbers, got {scores!r}")
        if not isinstance(n, int) or isinstance(n, bool):
            raise TeacherFormatError(f"{prefix}query_tokens must be an integer, got {n!r}")
        try:
            return cls(str(obj["qid"]), query, tuple(str(p) for p in pids), tuple(float(s) for s in scores), n)
        except TeacherFormatError as e:
            raise TeacherFormatError(f"{prefix}{e}") from None

    def to_json(self) -> dict[str, Any]:
        return {"qid": self.qid, "query": self.query, "pids": list(self.pids), "scores": list(self.scores),
                "query_tokens": self.query_tokens}


def read_teacher_groups(path: str | Path, limit: int | None = None) -> list[TeacherGroup]:
    """The groups of a teacher-score file, in file order (the first ``limit`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher-score file {path} not found; make it with scripts/score_teacher.py")
    groups: list[TeacherGroup] = []
    for where, obj in iter_jsonl(path, TeacherFormatError):
        if limit is not None and len(groups) >= limit:
            break
        groups.append(TeacherGroup.from_json(obj, where))
    if not groups:
        raise TeacherFormatError(f"{path} holds no teacher groups")
    return groups


def check_group_passages(groups: Sequence[TeacherGroup], passages: Any) -> None:
    """Fail before training when groups name passages the collection lacks."""
    missing = [(g.qid, p) for g in groups for p in g.pids if p not in passages]
    if missing:
        raise KeyError(f"{len(missing)} passages named by teacher groups are not in the collection, e.g. (qid, pid) "
                       f"{missing[:5]}; the scores were made for another collection")
