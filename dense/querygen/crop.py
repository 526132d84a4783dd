"""Pseudo-queries cut from the passage itself: a cheap baseline that needs no language model.

* ``random_crop``: a random span of ``crop_min_words``..``crop_max_words`` words; the positive is the whole passage
  (as in Contriever's cropping, with the full passage as key).
* ``inverse_cloze``: a sentence is the query and the passage *without* that sentence is the positive (ICT, Lee et al.
  2019); with probability ``ict_keep_sentence_prob`` the sentence is left in, so the model also learns some lexical
  matching. The positive text then differs from the stored passage and travels in the pair's ``positive_text``.

Everything is seeded by ``(seed, pid)``, so a passage gets the same pseudo-queries whatever else is selected.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from dense.querygen.records import QueryPair

CropMethod = Literal["random_crop", "inverse_cloze"]

# A sentence ends at . ! or ? followed by space and an upper-case letter, digit or quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass(frozen=True)
class CropConfig:
    """Length settings of both methods; ``methods`` lists which to produce (one pair each per query slot).

    ``inverse_cloze`` is off by default: its positive text travels in the record's ``positive_texts``, which a
    training reader must honour (otherwise the sentence is trained against the full passage that contains it).
    """

    methods: tuple[CropMethod, ...] = ("random_crop",)
    num_queries_per_passage: int = 1
    crop_min_words: int = 4
    crop_max_words: int = 12
    ict_min_sentence_words: int = 4
    ict_max_sentence_words: int = 40
    ict_keep_sentence_prob: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.methods) - {"random_crop", "inverse_cloze"}
        if not self.methods or unknown:
            raise ValueError(f"CropConfig.methods must be a non-empty subset of ('random_crop', 'inverse_cloze'), "
                             f"got {self.methods}")
        if not 1 <= self.crop_min_words <= self.crop_max_words:
            raise ValueError(f"CropConfig: need 1 <= crop_min_words <= crop_max_words, got "
                             f"{self.crop_min_words}, {self.crop_max_words}")
        if not 1 <= self.ict_min_sentence_words <= self.ict_max_sentence_words:
            raise ValueError(f"CropConfig: need 1 <= ict_min_sentence_words <= ict_max_sentence_words, got "
                             f"{self.ict_min_sentence_words}, {self.ict_max_sentence_words}")
        if not 0 <= self.ict_keep_sentence_prob <= 1:
            raise ValueError(f"CropConfig.ict_keep_sentence_prob must be in [0, 1], got {self.ict_keep_sentence_prob}")
        if self.num_queries_per_passage < 1:
            raise ValueError(f"CropConfig.num_queries_per_passage must be >= 1, got {self.num_queries_per_passage}")


def split_sentences(text: str) -> list[str]:
    """Sentences of a passage (a simple punctuation rule; MS MARCO passages are short web snippets)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def random_crop(text: str, rng: random.Random, config: CropConfig) -> str | None:
    """A random word span, or ``None`` when the passage is shorter than ``crop_min_words``."""
    tokens = text.split()
    if len(tokens) < config.crop_min_words:
        return None
    length = rng.randint(config.crop_min_words, min(config.crop_max_words, len(tokens)))
    start = rng.randint(0, len(tokens) - length)
    return " ".join(tokens[start:start + length])


def inverse_cloze(text: str, rng: random.Random, config: CropConfig) -> tuple[str, str] | None:
    """``(sentence, context)``, or ``None`` when the passage has fewer than two sentences or none of fitting length."""
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return None
    candidates = [i for i, s in enumerate(sentences)
                  if config.ict_min_sentence_words <= len(s.split()) <= config.ict_max_sentence_words]
    if not candidates:
        return None
    i = rng.choice(candidates)
    keep = rng.random() < config.ict_keep_sentence_prob
    context = sentences if keep else sentences[:i] + sentences[i + 1:]
    return sentences[i], " ".join(context)


def crop_pairs(passages: Iterable[tuple[str, str]], config: CropConfig = CropConfig()) -> Iterator[QueryPair]:
    """Pseudo-query pairs for every ``(pid, text)``, qids ``crop-<pid>-<i>`` (``i`` counts per passage)."""
    for pid, text in passages:
        rng = random.Random(f"{config.seed}:{pid}")
        i = 0
        for _ in range(config.num_queries_per_passage):
            for method in config.methods:
                if method == "random_crop":
                    query = random_crop(text, rng, config)
                    pair = None if query is None else QueryPair(f"crop-{pid}-{i}", query, pid, "crop")
                else:
                    cut = inverse_cloze(text, rng, config)
                    pair = None if cut is None else QueryPair(f"crop-{pid}-{i}", cut[0], pid, "crop",
                                                              positive_text=cut[1])
                i += 1  # ids stay stable when one method yields nothing for a passage
                if pair is not None:
                    yield pair
