"""The split of the real train queries into dense-training queries and the held-out selection queries.

The held-out queries (fusion training, every model/mix/weight choice) must stay unseen by everything upstream of
those choices: the dense model's training set, and the few-shot examples of synthetic-query prompts. Both sides
compute the split here, from the same sorted ids and seed, so they agree.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping


def usable_qids(queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
                has_passage: Callable[[str], bool]) -> list[str]:
    """Sorted ids of the queries with text and a judged-relevant passage that ``has_passage`` (the collection)."""
    return sorted(q for q, judged in qrels.items()
                  if q in queries and any(g > 0 and has_passage(pid) for pid, g in judged.items()))


def holdout_split(usable_qids: Iterable[str], holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """``(training qids, held-out qids)``, each sorted: ``holdout`` of the ids drawn by ``seed``."""
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")
    usable = sorted(set(usable_qids))
    random.Random(seed).shuffle(usable)
    n = min(holdout, len(usable))
    return sorted(usable[n:]), sorted(usable[:n])
