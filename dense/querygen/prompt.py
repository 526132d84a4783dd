"""Few-shot prompts for query generation (InPars / Promptagator style).

The examples are real MS MARCO *train* queries with their positive passages. Dev and DL queries must never reach a
prompt (they are what we evaluate on), so :class:`PromptBuilder` takes the forbidden query ids and texts and refuses
any example among them. Which examples a passage sees rotates deterministically with ``(seed, pid)``, so a rerun or a
resumed run builds the same prompt for the same passage whatever the order or subset of passages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

Template = Literal["auto", "chat", "plain"]

DEFAULT_INSTRUCTION = (
    "Write the short web search query a person would type to find the given passage. "
    "Answer with the query only."
)


class ForbiddenExampleError(ValueError):
    """A few-shot example is a dev or DL query (or has the same text as one)."""


class PromptTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the builder uses."""

    chat_template: Any

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class FewShotExample:
    """A real train query with one of its positive passages."""

    qid: str
    query: str
    pid: str
    passage: str


_WORDS = re.compile(r"\w+", re.UNICODE)


def normalize_query(text: str) -> str:
    """Lower-case words without punctuation, single-spaced: the form queries are compared in (forbidden texts,
    de-duplication), so ``"What is X?"`` and ``"what is x"`` count as the same query."""
    return " ".join(_WORDS.findall(text.lower()))


@dataclass(frozen=True)
class ForbiddenQueries:
    """Query ids and normalized texts that must not appear in prompts; ``sources`` maps qid -> file it came from."""

    qids: frozenset[str] = frozenset()
    texts: frozenset[str] = frozenset()
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> ForbiddenQueries:
        """Read ``qid \\t query`` files (the dev and DL query files)."""
        from dense.querygen.data import iter_tsv  # data imports this module

        sources: dict[str, str] = {}
        texts: set[str] = set()
        for path in paths:
            n = 0
            for qid, text in iter_tsv(path):
                sources[qid] = str(path)
                texts.add(normalize_query(text))
                n += 1
            if n == 0:
                raise ValueError(f"forbidden-query file {path} has no queries; pass the dev/DL queries.<split>.tsv")
        return cls(qids=frozenset(sources), texts=frozenset(texts), sources=sources)

    @classmethod
    def from_data_dir(cls, data_dir: str | Path, train_split: str = "train") -> ForbiddenQueries:
        """Every query file of a canonical data directory except the train split's: ``queries.dev.tsv``,
        ``queries.dl19.tsv``, ``queries.dl20.tsv`` and any other evaluation split it holds."""
        paths = evaluation_query_files(data_dir, train_split)
        if not paths:
            raise FileNotFoundError(
                f"{data_dir} has no evaluation query file (queries.<split>.tsv other than queries.{train_split}.tsv); "
                "the leak guard needs the dev/DL queries"
            )
        return cls.from_files(paths)

    def why_forbidden(self, qid: str, query: str) -> str | None:
        """A reason when ``(qid, query)`` is forbidden, else ``None``."""
        if qid in self.qids:
            return f"its qid {qid} is in {self.sources.get(qid, 'the forbidden set')}"
        if normalize_query(query) in self.texts:
            return f"its text {query!r} equals a forbidden (dev/DL) query"
        return None

    def __len__(self) -> int:
        return len(self.qids)


def draw_examples(
    examples: Sequence[FewShotExample], n: int, seed: int, forbidden: ForbiddenQueries,
    exclude_texts: Iterable[str] = (),
) -> list[FewShotExample]:
    """``n`` of ``examples`` drawn by ``seed`` (one per query), none forbidden (a dev/DL id or text) and none whose
    normalized text is in ``exclude_texts`` (e.g. the held-out selection queries); the draw depends only on the set of
    examples, not their order. Raises when fewer than ``n`` are allowed."""
    excluded = {normalize_query(t) for t in exclude_texts}
    allowed: dict[str, FewShotExample] = {}
    for ex in sorted(examples, key=lambda e: (e.qid, e.pid)):
        if ex.qid not in allowed and not forbidden.why_forbidden(ex.qid, ex.query) \
                and normalize_query(ex.query) not in excluded:
            allowed[ex.qid] = ex
    if len(allowed) < n:
        raise ValueError(f"{n} few-shot examples asked for, but only {len(allowed)} train queries are allowed")
    return random.Random(seed).sample(list(allowed.values()), n)


def evaluation_query_files(data_dir: str | Path, train_split: str = "train") -> list[Path]:
    """``queries.<split>.tsv`` files of ``data_dir`` for every split but ``train_split``, sorted."""
    return sorted(p for p in Path(data_dir).glob("queries.*.tsv") if p.name != f"queries.{train_split}.tsv")


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are built. ``template="auto"`` picks ``chat`` when the tokenizer has a chat template."""

    template: Template = "auto"
    num_examples: int = 3
    max_passage_tokens: int = 128
    max_query_tokens: int = 32
    seed: int = 0
    instruction: str = DEFAULT_INSTRUCTION
    # 0: every passage gets its own (seed, pid)-seeded example draw. N > 0: N fixed example sets, each passage shown
    # one of them (chosen by (seed, pid)), so the prompt text before the passage is shared by many passages and its
    # keys/values can be computed once (PrefixCachedGenerator).
    num_prefixes: int = 0

    def __post_init__(self) -> None:
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError(f"PromptConfig.template must be 'auto', 'chat' or 'plain', got {self.template!r}")
        for name in ("max_passage_tokens", "max_query_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"PromptConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_examples < 0:
            raise ValueError(f"PromptConfig.num_examples must be >= 0, got {self.num_examples}")
        if self.num_prefixes < 0:
            raise ValueError(f"PromptConfig.num_prefixes must be >= 0, got {self.num_prefixes}")


@dataclass(frozen=True)
class PromptParts:
    """One passage's prompt split where the passage starts: ``prefix + suffix`` is the whole prompt.

    ``prefix`` (system turn, instruction, few-shot turns, up to ``Passage:``) is the same for every passage with the
    same ``prefix_id``; ``suffix`` is the passage and the turn that asks for the query.
    """

    prefix: str
    suffix: str
    example_qids: tuple[str, ...]
    prefix_id: int


class PromptBuilder:
    """Builds one generation prompt per passage from rotating real train examples.

    The builder holds no tokenizer: :meth:`render` takes the generator's, which truncates passages to the token
    budget and (for ``chat``) applies the model's chat template.
    """

    def __init__(
        self,
        examples: Sequence[FewShotExample],
        config: PromptConfig = PromptConfig(),
        forbidden: ForbiddenQueries | None = None,
    ):
        forbidden = forbidden or ForbiddenQueries()
        for ex in examples:
            reason = forbidden.why_forbidden(ex.qid, ex.query)
            if reason:
                raise ForbiddenExampleError(
                    f"few-shot example qid={ex.qid} ({ex.query!r}) is not allowed in a prompt: {reason}. "
                    "Few-shot examples must be MS MARCO train queries; check --train-queries/--train-qrels"
                )
        if config.num_examples > 0 and len(examples) < config.num_examples:
            raise ValueError(
                f"PromptConfig.num_examples={config.num_examples} but only {len(examples)} examples were given"
            )
        if not forbidden:
            logger.warning("PromptBuilder got no forbidden (dev/DL) queries; pass them so leaks are caught")
        # Sorted so that example choice depends on the set of examples, not on the order they were read in.
        self.examples: tuple[FewShotExample, ...] = tuple(sorted(examples, key=lambda e: (e.qid, e.pid)))
        self.config = config
        self.num_forbidden = len(forbidden)

    def examples_for(self, pid: str) -> list[FewShotExample]:
        """The few-shot examples shown for passage ``pid``: a ``(seed, pid)``-seeded sample (or, with
        ``num_prefixes``, one of the fixed example sets), never ``pid`` itself."""
        prefix_id = self.prefix_id(pid)
        if prefix_id >= 0:
            return list(self._prefix_sets[prefix_id])
        pool = [e for e in self.examples if e.pid != pid]
        n = min(self.config.num_examples, len(pool))
        return random.Random(f"{self.config.seed}:{pid}").sample(pool, n)

    @functools.cached_property
    def _prefix_sets(self) -> tuple[tuple[FewShotExample, ...], ...]:
        n = min(self.config.num_examples, len(self.examples))
        return tuple(
            tuple(random.Random(f"{self.config.seed}:prefix:{i}").sample(self.examples, n))
            for i in range(self.config.num_prefixes)
        )

    def prefix_id(self, pid: str) -> int:
        """Which fixed example set passage ``pid`` is shown: a ``(seed, pid)`` hash, moved on to the next set when the
        drawn one holds ``pid`` itself as an example; -1 (a draw of its own) when every set does, or when
        ``num_prefixes`` is 0."""
        if not self.config.num_prefixes:
            return -1
        digest = hashlib.sha256(f"{self.config.seed}:{pid}".encode()).digest()
        first = int.from_bytes(digest[:8], "big") % self.config.num_prefixes
        for step in range(self.config.num_prefixes):
            i = (first + step) % self.config.num_prefixes
            if all(e.pid != pid for e in self._prefix_sets[i]):
                return i
        return -1

    def resolve_template(self, tokenizer: PromptTokenizer) -> Literal["chat", "plain"]:
        """``chat`` or ``plain``: what ``auto`` means for this tokenizer."""
        if self.config.template != "auto":
            if self.config.template == "chat" and not getattr(tokenizer, "chat_template", None):
                raise ValueError("PromptConfig.template='chat' but the tokenizer has no chat_template; use 'plain'")
            return self.config.template
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"

    def render(self, pid: str, passage: str, tokenizer: PromptTokenizer) -> tuple[str, tuple[str, ...]]:
        """``(prompt text, example qids)`` for one passage."""
        examples = self.examples_for(pid)
        shots = [
            (_truncate(e.passage, self.config.max_passage_tokens, tokenizer),
             _truncate(e.query, self.config.max_query_tokens, tokenizer))
            for e in examples
        ]
        target = _truncate(passage, self.config.max_passage_tokens, tokenizer)
        if self.resolve_template(tokenizer) == "chat":
            text = _render_chat(self.config.instruction, shots, target, tokenizer)
        else:
            text = _render_plain(self.config.instruction, shots, target)
        return text, tuple(e.qid for e in examples)

    def render_parts(self, pid: str, passage: str, tokenizer: PromptTokenizer) -> PromptParts:
        """:meth:`render`, split where the passage starts (the prefix ends with ``Passage:``, so tokenizing the two
        parts apart gives the same tokens as tokenizing the whole prompt)."""
        text, qids = self.render(pid, _MARKER, tokenizer)
        before, sep, after = text.partition(" " + _MARKER)
        if not sep or _MARKER in after:
            raise ValueError("the prompt template does not contain the passage exactly once")
        target = _one_line(_truncate(passage, self.config.max_passage_tokens, tokenizer))
        return PromptParts(before, " " + target + after, qids, self.prefix_id(pid))

    def describe(self) -> dict[str, Any]:
        """Manifest entry: the settings and every example id that may appear in a prompt."""
        return {
            "config": asdict(self.config),
            "example_qids": sorted({e.qid for e in self.examples}),
            "example_pairs": [[e.qid, e.pid] for e in self.examples],
            "num_forbidden_queries": self.num_forbidden,
            **({"prefix_example_qids": [[e.qid for e in group] for group in self._prefix_sets]}
               if self.config.num_prefixes else {}),
        }

    def fingerprint(self) -> str:
        """Hash of everything that changes a prompt (settings and example texts)."""
        payload = {
            "config": asdict(self.config),
            "examples": [[e.qid, e.pid, e.query, e.passage] for e in self.examples],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]


_MARKER = "\x00PASSAGE\x00"


def _truncate(text: str, max_tokens: int, tokenizer: PromptTokenizer) -> str:
    if text == _MARKER:
        return text
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _render_chat(
    instruction: str, shots: list[tuple[str, str]], target: str, tokenizer: PromptTokenizer
) -> str:
    # Few-shot as earlier conversation turns: small chat models follow the answer format of prior turns
    # much better than a list of examples inside one message.
    messages = [{"role": "system", "content": instruction}]
    for passage, query in shots:
        messages.append({"role": "user", "content": f"Passage: {_one_line(passage)}"})
        messages.append({"role": "assistant", "content": _one_line(query)})
    messages.append({"role": "user", "content": f"Passage: {_one_line(target)}"})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _render_plain(instruction: str, shots: list[tuple[str, str]], target: str) -> str:
    blocks = [instruction, ""]
    for passage, query in shots:
        blocks.append(f"Passage: {_one_line(passage)}\nQuery: {_one_line(query)}\n")
    blocks.append(f"Passage: {_one_line(target)}\nQuery:")
    return "\n".join(blocks)
