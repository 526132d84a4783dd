"""The end-to-end pipeline: data -> BM25 -> synthetic queries -> dense training -> corpus encoding + faiss ->
fusion training -> evaluation, driven by one :class:`hybrid.config.PipelineConfig`.

Each stage writes into its own sub-directory of the artifact directory and finishes by writing ``stage.json``
with the fingerprint of its inputs (its config section and the fingerprints of the stages it reads). A stage whose
``stage.json`` carries the fingerprint computed now is skipped; anything upstream that changed makes it rerun.
Stages that take long (dense training, corpus encoding, LLM generation) resume from their own checkpoints.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dense.splits import holdout_split, usable_qids
from dense.atomic import write_text_atomic
from hybrid.artifacts import (
    STAGE_FILE,
    ArtifactError,
    artifacts_dir,
    base_model_path,
    file_checksum,
    fingerprint,
    machine,
    read_stage,
    smollm2_dir,
    stage_dir,
    to_stored_path,
    versions,
    write_json_atomic,
)
from hybrid.config import PipelineConfig
from hybrid.msmarco import Collection, MsMarcoDir, read_collection

logger = logging.getLogger(__name__)

FUSION_ARTIFACT_FORMAT = 2  # 2: fusion/lexicon/ added
# dense_train with a second round (dense.refine): the first round's model and mined records live here
FIRST_ROUND_DIR = "first_round"
SELF_MINED_RECORDS = "self_mined_records.jsonl"
MINED_RECORDS = "bm25_mined_records.jsonl"  # dense_train's records with their BM25 negatives, reused by a resumed run
HOLDOUT_TEXT_GUARD = 1  # the synthetic and bm25_expanded stages drop generated queries equal to a held-out query (E55)
STAGES = ("data", "bm25", "bm25_expanded", "synthetic", "dense_train", "dense_index", "fusion", "rerank", "evaluate")
# stages that run on every process of a torchrun launch (dense/distributed.py); the others run on rank 0 only
DISTRIBUTED_STAGES = ("dense_train", "dense_index")
# what each stage reads (its fingerprint includes theirs); bm25_expanded only while sparse.expansion is enabled
# (Pipeline.upstream), so configs without document expansion keep the fingerprints they had before it existed
UPSTREAM = {
    "data": (),
    "bm25": ("data",),
    "bm25_expanded": ("data",),
    "synthetic": ("data", "bm25"),
    "dense_train": ("data", "bm25", "synthetic"),
    "dense_index": ("data", "dense_train"),
    "fusion": ("data", "bm25", "bm25_expanded", "dense_train", "dense_index"),
    "rerank": ("fusion",),
    "evaluate": ("data", "bm25", "bm25_expanded", "dense_train", "dense_index", "fusion", "rerank"),
}


def sparse_index_name(config: PipelineConfig) -> str:
    """The stage whose index the sparse and fused modes search under ``config``."""
    return "bm25_expanded" if config.sparse.expansion.enabled else "bm25"


class Pipeline:
    """Runs (or skips) the stages for one config over one artifact directory."""

    def __init__(self, config: PipelineConfig, root: str | Path | None = None) -> None:
        self.config = config
        self.root = artifacts_dir(root or config.artifacts or None)
        self._fingerprints: dict[str, str] = {}
        self._bm25 = None
        self._bm25_expanded = None
        self._store = None
        self._context = None

    @property
    def context(self):
        """This process's place in a ``torchrun`` launch (``dense.distributed.SINGLE`` in a plain run)."""
        if self._context is None:
            from dense.distributed import current_context

            self._context = current_context()
        return self._context

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def _section(self, stage: str) -> dict[str, Any]:
        c = self.config
        return {
            # where the files were downloaded from is not an input: a mirror's files are checked against the official
            # md5 sums (hybrid.download); left out entirely, so fingerprints from before the field existed still hold
            "data": {"data": {k: v for k, v in asdict(c.data).items() if k != "download_urls"},
                     "dir": str(self._data_source_dir())},
            # the expansion has a stage of its own: the plain index (and what reads it) does not depend on it
            "bm25": {k: v for k, v in asdict(c.sparse).items() if k != "expansion"},
            # HOLDOUT_TEXT_GUARD: stages built before generated queries equal to a held-out query were dropped rebuild
            "bm25_expanded": self._expansion_section() | {"holdout_text_guard": HOLDOUT_TEXT_GUARD},
            "synthetic": {"synthetic": asdict(c.synthetic), "seed": c.seed, "holdout_text_guard": HOLDOUT_TEXT_GUARD},
            "dense_train": {"dense": self._dense_section(), "holdout": c.fusion.holdout_queries, "seed": c.seed},
            "dense_index": {k: v for k, v in asdict(c.dense).items() if k.startswith(("encode", "index"))},
            # the artifact format joins the inputs so artifacts from an older layout (no lexicon) are rebuilt
            "fusion": asdict(c.fusion) | {"artifact_format": FUSION_ARTIFACT_FORMAT},
            "rerank": self._rerank_section(),
            "evaluate": asdict(c.eval) | {"splits": c.data.eval_splits, "rel_levels": c.data.rel_levels},
        }[stage]

    def _expansion_section(self) -> dict[str, Any]:
        section = asdict(self.config.sparse)
        # without extra files those fields stay out, so indexes built before they existed stay up to date
        if not self.config.sparse.expansion.extra_files:
            del section["expansion"]["extra_files"], section["expansion"]["extra_sha256"]
        return section

    def _dense_section(self) -> dict[str, Any]:
        section = asdict(self.config.dense)
        # without a second round the field stays out, so models trained before it existed stay up to date
        if not self.config.dense.refine.steps:
            del section["refine"]
        if not self.config.dense.teacher_scores:  # the same for distillation's fields
            for key in ("teacher_scores", "teacher_scores_sha256", "teacher_groups"):
                del section[key]
        return section

    def _rerank_section(self) -> dict[str, Any]:
        section = asdict(self.config.rerank)
        # The cross-encoder's settings count only when it is the scorer, and the fields that came with it stay out
        # while at their defaults, so rerank stages built before they existed (the QL scorer) stay up to date.
        if section["scorer"] == "ql":
            del section["scorer"], section["cross_encoder"]
        if section["batch_size"] == 1:
            del section["batch_size"]
        if section["dtype"] == "float32":
            del section["dtype"]
        if section["attention"] == "sdpa":
            del section["attention"]
        if not section["few_shot"]:
            del section["few_shot"], section["few_shot_seed"]
        return section

    def upstream(self, stage: str) -> tuple[str, ...]:
        """The stages ``stage`` reads under this config (:data:`UPSTREAM`, less ``bm25_expanded`` while document
        expansion is off: then nothing reads that stage)."""
        if self.config.sparse.expansion.enabled:
            return UPSTREAM[stage]
        return tuple(u for u in UPSTREAM[stage] if u != "bm25_expanded")

    def inputs_fingerprint(self, stage: str) -> str:
        if stage not in self._fingerprints:
            upstream = {u: self.inputs_fingerprint(u) for u in self.upstream(stage)}
            self._fingerprints[stage] = fingerprint({"stage": stage, "config": self._section(stage), **upstream})
        return self._fingerprints[stage]

    def up_to_date(self, stage: str) -> bool:
        done = read_stage(self.root, stage)
        return bool(done) and done.get("inputs_fingerprint") == self.inputs_fingerprint(stage)

    def _finish(self, stage: str, summary: dict[str, Any], seconds: float) -> dict:
        record = {
            "stage": stage,
            "inputs_fingerprint": self.inputs_fingerprint(stage),
            "config": self.config.to_dict(),
            "seconds": round(seconds, 1),
            "versions": versions(),
            "machine": machine(),
            # what it read, so loaders can tell when an upstream stage was rebuilt after it (require_stage)
            "upstream": {up: self.inputs_fingerprint(up) for up in self.upstream(stage)},
            **summary,
        }
        write_json_atomic(stage_dir(self.root, stage) / STAGE_FILE, record)
        return record

    def run(self, stages: Sequence[str] | None = None, force: Sequence[str] = ()) -> dict[str, dict]:
        """Run the given stages (default: all) in order; returns each stage's ``stage.json``.

        Under ``torchrun`` every process runs :data:`DISTRIBUTED_STAGES` together (dense training on its share of
        each batch, corpus encoding on its share of the shards); rank 0 alone writes ``stage.json`` and runs the
        stages after them, the other ranks stop there. The stages before them must already be up to date (run them
        in one process first), so no rank waits for hours at a barrier.
        """
        from dense.distributed import init_distributed

        wanted = list(stages or STAGES)
        unknown = [s for s in [*wanted, *force] if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES}")
        self._context = context = init_distributed()
        ordered = [s for s in STAGES if s in wanted]
        if context.enabled:
            ordered = self._distributed_plan(ordered, force)
        if context.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
        done: dict[str, dict] = {}
        bar = tqdm(ordered, desc="pipeline", unit="stage", disable=not context.is_main)
        for stage in bar:
            bar.set_postfix_str(stage)
            if stage not in force and self.up_to_date(stage):
                logger.info("stage %s: up to date, skipped", stage)
                done[stage] = read_stage(self.root, stage)
                continue
            for up in self.upstream(stage):
                if not self.up_to_date(up):
                    raise ArtifactError(
                        f"stage {stage} needs stage {up}, which is missing or out of date for this config; "
                        f"run it first (--stages {up} {stage}, or the whole pipeline)"
                    )
            logger.info("stage %s: running", stage)
            start = time.time()
            summary = getattr(self, f"_run_{stage}")()
            done[stage] = self._finish(stage, summary, time.time() - start) if context.is_main else summary
            if stage in DISTRIBUTED_STAGES:
                context.barrier()  # the next distributed stage checks this one's stage.json on every rank
            release_gpu_cache()
            logger.info("stage %s: done in %.1f s", stage, time.time() - start)
        return done

    def _distributed_plan(self, ordered: list[str], force: Sequence[str]) -> list[str]:
        """The stages this rank runs in a torchrun launch (see :meth:`run`)."""
        distributed = [i for i, s in enumerate(ordered) if s in DISTRIBUTED_STAGES]
        if not distributed:
            raise ArtifactError(
                f"a torchrun launch runs the stages {DISTRIBUTED_STAGES} on every process, but none of {ordered} "
                "is one of them; run the pipeline in one process (python scripts/run_pipeline.py ...)"
            )
        before = [s for s in ordered[: distributed[0]] if s in force or not self.up_to_date(s)]
        if before:
            raise ArtifactError(
                f"under torchrun the stages {sorted(set(before))} would run on rank 0 while the other processes "
                "wait; run them in one process first (python scripts/run_pipeline.py --config ... --stages "
                f"{' '.join(dict.fromkeys(before))}), then launch torchrun for {' '.join(DISTRIBUTED_STAGES)}"
            )
        if self.context.is_main:
            return ordered
        return ordered[: distributed[-1] + 1]

    # ---- data ------------------------------------------------------------------------------------------------
    def _data_source_dir(self) -> Path:
        c = self.config.data
        if c.source == "download":
            return Path(c.dir) if c.dir else self.root / "msmarco"
        if c.source != "local":
            raise ValueError(f"data.source must be 'local' or 'download', got {c.source!r}")
        return self.config.data_dir()

    def data_dir(self) -> MsMarcoDir:
        """The canonical directory the stages read (the subset when one is configured)."""
        if self.config.data.subset_distractors > 0:
            return MsMarcoDir(self.root / "msmarco-subset")
        return MsMarcoDir(self._data_source_dir())

    def _run_data(self) -> dict:
        c = self.config.data
        src = MsMarcoDir(self._data_source_dir())
        if c.source == "download":
            from hybrid.download import download_msmarco

            download_msmarco(src.root, c.download_urls or None,
                             splits=tuple(dict.fromkeys((c.train_split, *c.eval_splits))))
        data = src
        if c.subset_distractors > 0:
            from hybrid.msmarco import build_subset

            data = build_subset(
                src, self.root / "msmarco-subset", splits=(c.train_split, *c.eval_splits),
                n_distractors=c.subset_distractors, seed=self.config.seed,
            )
        summary = data.validate(splits=(c.train_split, *c.eval_splits))
        from hybrid.passage_store import PassageStore

        store = self._store = PassageStore.build(data.collection_path, stage_dir(self.root, "data"),
                                                 relative_to=self.root)
        return {
            "data_dir": to_stored_path(self.root, data.root),
            "collection_checksum": file_checksum(data.collection_path),
            "passages": len(store),
            "splits": {s: asdict(v) for s, v in summary.splits.items()},
        }

    def passages(self):
        """The passage store of the data stage, opened once per pipeline run."""
        if self._store is None:
            from hybrid.passage_store import PassageStore

            self._store = PassageStore.open(stage_dir(self.root, "data"))
        return self._store

    # ---- bm25 ------------------------------------------------------------------------------------------------
    def _run_bm25(self) -> dict:
        from sparse.index import IndexConfig, build_index

        c = self.config.sparse
        data = self.data_dir()
        build_index(
            read_collection(data.collection_path),
            stage_dir(self.root, "bm25"),
            IndexConfig(threads=c.threads, heap=c.heap),
            manifest_extra={"collection_checksum": file_checksum(data.collection_path), "k1": c.k1, "b": c.b},
        )
        return {"k1": c.k1, "b": c.b}

    # ---- bm25 over expanded passages (doc2query) ---------------------------------------------------------------
    def _run_bm25_expanded(self) -> dict:
        """A second Lucene index of the passages with their generated queries appended (``sparse.expansion``), for
        the sparse and fused modes; nothing to build while it is off (the modes then search the plain index)."""
        c = self.config.sparse
        out = stage_dir(self.root, "bm25_expanded")
        if not c.expansion.enabled:
            shutil.rmtree(out, ignore_errors=True)  # an index from an earlier config is not searched: free the disk
            out.mkdir(parents=True, exist_ok=True)
            return {"enabled": False}
        from dense.querygen.prompt import ForbiddenQueries, normalize_query
        from hybrid.synthetic_data import SyntheticDataError, check_sha256, resolve_precomputed
        from sparse.expansion import expanded_passages, merge_expansions, read_expansions
        from sparse.index import IndexConfig, build_index

        data = self.data_dir()
        heldout = set(self.real_train_split()[3])
        parts, checksums = [], []
        for i, (name, expected) in enumerate(c.expansion.files):
            key, sha_key = ("file", "sha256") if i == 0 else (f"extra_files[{i - 1}]", f"extra_sha256[{i - 1}]")
            path = resolve_precomputed(name)
            if not path.is_file():
                raise FileNotFoundError(f"sparse.expansion.{key} = {name!r} does not exist ({path})")
            checksums.append(check_sha256(path, expected, f"sparse.expansion.{sha_key}"))
            part = read_expansions(path)
            leaked = sorted(part.example_qids & heldout)
            if leaked:
                raise SyntheticDataError(f"{path}: the prompts used {len(leaked)} held-out train queries as few-shot "
                                         f"examples (e.g. {leaked[:5]}); regenerate it without them")
            parts.append(part)
        expansions = merge_expansions(parts)
        sha256 = checksums[0]
        # a generated query that happens to equal an evaluation query (case and punctuation aside) is left out, and so
        # is one that equals a held-out selection query (E55)
        forbidden = ForbiddenQueries.from_data_dir(data.root, self.config.data.train_split)
        expansions, dropped = expansions.without(lambda q: forbidden.why_forbidden("", q) is not None)
        heldout_texts = self.heldout_query_texts()
        expansions, dropped_heldout = expansions.without(lambda q: normalize_query(q) in heldout_texts)
        store = self.passages()
        outside = sum(pid not in store for pid in expansions.queries)
        build_index(
            expanded_passages(read_collection(data.collection_path), expansions), out,
            IndexConfig(threads=c.threads, heap=c.heap),
            manifest_extra={"collection_checksum": file_checksum(data.collection_path), "k1": c.k1, "b": c.b,
                            "expansion_file": str(c.expansion.file), "expansion_sha256": sha256}
            | ({"expansion_extra_files": list(c.expansion.extra_files), "expansion_extra_sha256": checksums[1:]}
               if c.expansion.extra_files else {}),
        )
        summary = {"enabled": True, "k1": c.k1, "b": c.b, "expansion_sha256": sha256,
                   **({"extra_sha256": checksums[1:]} if c.expansion.extra_files else {}),
                   "expanded_passages": len(expansions) - outside, "queries": expansions.num_queries,
                   "dropped_evaluation_queries": dropped, "dropped_heldout_queries": dropped_heldout,
                   "not_in_collection": outside}
        logger.info("bm25_expanded: %s", summary)
        return summary

    def sparse_retriever(self):
        """The BM25 searcher the sparse and fused modes use: over the expanded passages when ``sparse.expansion``
        is on, else the plain one (:meth:`bm25`, which the synthetic filter and negative mining always read)."""
        if not self.config.sparse.expansion.enabled:
            return self.bm25()
        if self._bm25_expanded is None:
            from sparse.bm25 import BM25Searcher

            c = self.config.sparse
            self._bm25_expanded = BM25Searcher(stage_dir(self.root, "bm25_expanded"), k1=c.k1, b=c.b,
                                               threads=c.threads)
        return self._bm25_expanded

    def bm25(self):
        if self._bm25 is None:
            from sparse.bm25 import BM25Searcher

            c = self.config.sparse
            self._bm25 = BM25Searcher(stage_dir(self.root, "bm25"), k1=c.k1, b=c.b, threads=c.threads)
        return self._bm25

    # ---- synthetic queries -----------------------------------------------------------------------------------
    def _run_synthetic(self) -> dict:
        c = self.config.synthetic
        out = stage_dir(self.root, "synthetic")
        data = self.data_dir()
        files: list[str] = []
        counts: dict[str, int] = {}
        if c.precomputed:
            counts = self._copy_precomputed(out / "precomputed.jsonl", data)
            files.append("precomputed.jsonl")
        for method in c.methods:
            files.append(f"{method}/train.jsonl")
            self._generate(method, out / method, data)
        return {"files": files, **({"precomputed": counts} if counts else {})}

    def _copy_precomputed(self, target: Path, data: MsMarcoDir) -> dict[str, int]:
        """The committed records file, checked (checksum, no evaluation query, no held-out few-shot example), cut
        to the records whose positives this collection holds and to the first ``precomputed_max_records``."""
        from dense.querygen.output import read_training_records, write_jsonl_atomic
        from dense.querygen.prompt import ForbiddenQueries, normalize_query
        from hybrid.synthetic_data import resolve_precomputed, verify_precomputed

        c = self.config.synthetic
        src = resolve_precomputed(c.precomputed)
        verify_precomputed(src, c.precomputed_sha256,
                           ForbiddenQueries.from_data_dir(data.root, self.config.data.train_split),
                           set(self.real_train_split()[3]))
        records = read_training_records(src)
        store = self.passages()
        usable = [r for r in records if all(p in store for p in r["positives"])]
        # a generated query that happens to equal a held-out selection query's text is not trained on (E55)
        heldout = self.heldout_query_texts()
        allowed = [r for r in usable if normalize_query(r["query"]) not in heldout]
        kept = allowed[: c.precomputed_max_records] if c.precomputed_max_records else allowed
        write_jsonl_atomic(target, kept)
        logger.info("synthetic: %d of %d precomputed records used (%d lack their passage here, %d equal a held-out "
                    "query)", len(kept), len(records), len(records) - len(usable), len(usable) - len(allowed))
        return {"records": len(records), "without_passage": len(records) - len(usable),
                "equal_to_heldout_query": len(usable) - len(allowed), "used": len(kept)}

    def _generate(self, method: str, out: Path, data: MsMarcoDir) -> None:
        from dense.querygen.crop import CropConfig
        from dense.querygen.filters import SanityFilterConfig
        from dense.querygen.pipeline import StageInputs, run_crop, run_llm, select_passages

        from dense.querygen.prompt import evaluation_query_files

        c = self.config.synthetic
        # every evaluation split the data directory holds, not only the configured ones
        forbid = tuple(evaluation_query_files(data.root, self.config.data.train_split))
        inputs = StageInputs(
            data.collection_path, data.queries_path(self.config.data.train_split),
            data.qrels_path(self.config.data.train_split), forbid,
        )
        passages = select_passages(data.collection_path, c.max_passages or None, c.seed)
        search = self.bm25().batch_search if c.filter_k > 0 else None
        extra = {"max_passages": c.max_passages, "sample_seed": c.seed}
        if method == "crop":
            run_crop(out, inputs, passages, CropConfig(seed=c.seed, num_queries_per_passage=c.queries_per_passage),
                     SanityFilterConfig(), search, c.filter_k or 1, extra, exclude_qids=self.real_train_split()[3])
        elif method == "llm":
            from hybrid.synthetic_data import llm_generation

            model, gguf, generation, prompt = llm_generation(c)
            heldout = self.real_train_split()[3]  # the selection queries never appear in a prompt
            run_llm(out, inputs, passages, model, gguf, generation, prompt, SanityFilterConfig(),
                    search, c.filter_k or 1, extra, exclude_qids=heldout)
        else:
            raise ValueError(f"unknown synthetic method {method!r}; use 'crop' or 'llm'")

    # ---- dense training --------------------------------------------------------------------------------------
    def real_train_split(self) -> tuple[dict[str, str], dict[str, dict[str, int]], list[str], list[str]]:
        """Train queries whose positive is in the corpus, split into (dense training qids, fusion holdout qids)."""
        data = self.data_dir()
        split = self.config.data.train_split
        queries = data.queries(split)
        qrels = data.qrels(split, queries)
        store = self.passages()
        usable = usable_qids(queries, qrels, store.__contains__)
        dense_qids, fusion_qids = holdout_split(usable, self.config.fusion.holdout_queries, self.config.seed)
        cap = self.config.dense.max_real_train_queries
        if cap:
            dense_qids = dense_qids[:cap]
        return queries, qrels, dense_qids, fusion_qids

    def heldout_query_texts(self) -> frozenset[str]:
        """Normalized texts of the held-out selection queries: no training data or expansion may equal one."""
        from dense.querygen.prompt import normalize_query

        queries, _, _, heldout = self.real_train_split()
        return frozenset(normalize_query(queries[q]) for q in heldout)

    def ql_examples(self, n: int, seed: int) -> list:
        """``n`` few-shot demonstrations for the QL prompt (``dense.querygen.prompt.FewShotExample``): real train
        queries the dense model trains on, with a positive passage in the corpus; never a fusion-holdout query (the
        set every choice is made on, so it must not see its own answers) nor a dev/DL id or text."""
        from dense.querygen.prompt import FewShotExample, ForbiddenQueries, draw_examples

        if n == 0:
            return []
        queries, qrels, dense_qids, heldout = self.real_train_split()
        store = self.passages()
        pairs = []
        for q in dense_qids:
            pid = min(p for p, g in qrels[q].items() if g > 0 and p in store)
            pairs.append(FewShotExample(qid=q, query=queries[q], pid=pid, passage=store.get(pid)))
        forbidden = ForbiddenQueries.from_data_dir(self.data_dir().root, self.config.data.train_split)
        return draw_examples(pairs, n, seed, forbidden, exclude_texts=[queries[q] for q in heldout])

    def _training_records(self, mined_path: Path | None = None):
        """Real + synthetic training records, with ``dense.hard_negatives`` BM25 negatives each when configured.

        ``mined_path``: where the mined records are kept, so a rerun of the same inputs (a killed training, resumed
        from its checkpoint) does not mine again (on the A10G recipe, ~600k queries x 200 BM25 hits)."""
        from dense.training_data import read_msmarco_train_records, read_records, write_records

        c = self.config.dense
        queries, qrels, dense_qids, _ = self.real_train_split()
        store = self.passages()
        real = read_msmarco_train_records(
            {q: queries[q] for q in dense_qids}, {q: qrels[q] for q in dense_qids}, store
        )
        synthetic = []
        synth_dir = stage_dir(self.root, "synthetic")
        for name in read_stage(self.root, "synthetic").get("files", []):
            synthetic.extend(read_records(synth_dir / name))
        records = real + synthetic
        known = {r.qid: set(r.positives) for r in records}
        for q in dense_qids:
            known.setdefault(q, set()).update(p for p, g in qrels[q].items() if g > 0)
        if c.hard_negatives > 0:
            mined = read_records(mined_path) if mined_path is not None and mined_path.is_file() else None
            if mined is not None and [r.qid for r in mined] == [r.qid for r in records]:
                logger.info("dense_train: BM25 negatives of a previous run of these inputs (%s)", mined_path)
                records = mined
            else:
                records = self._mine(records, self.bm25().batch_search, depth=c.hard_negatives_depth,
                                     n_negatives=c.hard_negatives, known_positives=known)
                if mined_path is not None and self.context.is_main:
                    write_records(records, mined_path)
        return records, known, {"real_queries": len(real), "synthetic_queries": len(synthetic)}

    def _teacher_groups(self, train_config) -> list:
        """The distillation groups of ``dense.teacher_scores``, checked (checksum, no held-out or evaluation query);
        empty when the config does not distil."""
        from dense.querygen.prompt import ForbiddenQueries
        from hybrid.config import ConfigError
        from hybrid.synthetic_data import resolve_precomputed
        from hybrid.teacher_scores import load_teacher_groups

        c = self.config.dense
        if not train_config.distill_batch_size:
            return []
        if not c.teacher_scores:
            raise ConfigError("dense.train.distill_batch_size > 0 needs dense.teacher_scores (a file from "
                              "scripts/score_teacher.py)")
        _, _, _, heldout = self.real_train_split()
        forbidden = ForbiddenQueries.from_data_dir(self.data_dir().root, self.config.data.train_split)
        return load_teacher_groups(resolve_precomputed(c.teacher_scores), c.teacher_scores_sha256, forbidden,
                                   heldout, c.teacher_groups, min_passages=train_config.distill_passages)

    def _mine(self, records: list, search, **options: Any) -> list:
        """``mine_hard_negatives``; under torchrun each rank mines every ``world_size``-th record and all ranks get
        the whole list back, in order."""
        from dense.training_data import mine_hard_negatives

        context = self.context
        if not context.enabled:
            return mine_hard_negatives(records, search, **options)
        share = mine_hard_negatives(records[context.rank :: context.world_size], search, **options)
        mined: list = [None] * len(records)
        for rank, part in enumerate(context.all_gather_object(share)):
            mined[rank :: context.world_size] = part
        return mined

    def _base_model(self) -> str:
        return base_model_path(self.root, self.config.dense.base_model, self.config.dense.base_layers)

    def _run_dense_train(self) -> dict:
        from dense.config import EncoderConfig, TrainConfig
        from dense.training import total_steps, train

        c = self.config.dense
        encoder_config = EncoderConfig.from_dict({"model_name_or_path": self._base_model(), **c.encoder})
        train_config = TrainConfig.from_dict({"seed": self.config.seed, **c.train})
        out = stage_dir(self.root, "dense_train")
        refine = c.refine
        mined_path = out / MINED_RECORDS

        def prepare() -> bool:
            # A finished model, checkpoints or mined negatives from other inputs must not be mistaken for this run's;
            # those made with the same inputs (a killed run) are reused: checkpoints resume, and so does a finished
            # first round.
            marker = out / "inputs_fingerprint.txt"
            if marker.exists() and marker.read_text().strip() != self.inputs_fingerprint("dense_train"):
                for stale in ("model", "checkpoints", FIRST_ROUND_DIR):
                    shutil.rmtree(out / stale, ignore_errors=True)
                mined_path.unlink(missing_ok=True)
            elif read_stage(self.root, "dense_train") is not None:
                shutil.rmtree(out / "model", ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(marker, self.inputs_fingerprint("dense_train") + "\n")
            return (out / "checkpoints").exists() or (out / FIRST_ROUND_DIR).exists()

        from dense.distributed import run_on_main

        resume = run_on_main(self.context, prepare)  # rank 0 decides; every rank then trains its share
        records, known, counts = self._training_records(mined_path)
        teacher = self._teacher_groups(train_config)
        if teacher:
            counts["teacher_groups"] = len(teacher)
        if refine.steps:
            first = train(encoder_config, train_config, records, self.passages().get, out / FIRST_ROUND_DIR,
                          resume=resume, teacher_groups=teacher)
            counts["first_round_steps"] = total_steps(len(records), train_config)
            counts["second_round_steps"] = refine.steps
            records = self._self_mined_records(first, records, known)
            encoder_config = dataclasses.replace(encoder_config, model_name_or_path=str(first))
            train_config = dataclasses.replace(train_config, max_steps=refine.steps, seed=train_config.seed + 1)
        model_dir = train(encoder_config, train_config, records, self.passages().get, out, resume=resume,
                          teacher_groups=teacher)
        from dense.corpus_encoding import directory_fingerprint

        return {"model_fingerprint": directory_fingerprint(model_dir), "records": len(records), **counts}

    def _self_mined_records(self, first_model: Path, records: list, known: dict[str, set[str]]) -> list:
        """``records`` with the negatives of ``dense.refine``, mined from the corpus encoded by ``first_model``.

        The mined records are written next to the first round's model and reused on a rerun, so a killed second
        round resumes on exactly the same data (a rebuilt HNSW graph need not return the same neighbours); the
        corpus encoding and index used for mining are deleted once they are.
        """
        from dense.corpus_encoding import directory_fingerprint
        from dense.encoder import load_encoder
        from dense.searcher import DenseSearcher
        from dense.training_data import read_records, write_records

        work = first_model.parent
        mined_path = work / SELF_MINED_RECORDS
        if mined_path.is_file():
            logger.info("dense_train: self-mined negatives from %s", mined_path)
            return read_records(mined_path)
        encoder = load_encoder(first_model, device=self.context.resolve_device(None))
        self._encode_and_index(encoder, directory_fingerprint(first_model), work)
        self.context.barrier()
        searcher = DenseSearcher.from_dir(work / "faiss", encoder)
        r = self.config.dense.refine
        mined = self._mine(records, searcher.batch_search, depth=r.depth, n_negatives=r.negatives,
                           skip_top=r.skip_top, known_positives=known, keep_existing=r.keep_bm25)
        if self.context.is_main:
            write_records(mined, mined_path)
            for scratch in ("embeddings", "faiss"):
                shutil.rmtree(work / scratch, ignore_errors=True)
        self.context.barrier()
        return mined

    def encoder(self):
        from dense.encoder import load_encoder

        # under torchrun: this rank's GPU
        return load_encoder(stage_dir(self.root, "dense_train") / "model", device=self.context.resolve_device(None))

    # ---- corpus encoding + faiss -----------------------------------------------------------------------------
    def _encode_and_index(self, encoder, model_fingerprint: str, out: Path):
        """The corpus encoded by ``encoder`` into ``out/embeddings`` (every rank its share of the shards) and its
        faiss index in ``out/faiss`` (built once, by rank 0); returns the encoded corpus and the index directory
        (``None`` on the other ranks)."""
        from dense.corpus_encoding import encode_corpus
        from dense.faiss_index import IndexConfig, index_corpus

        c = self.config.dense
        corpus = encode_corpus(
            encoder, Collection(self.data_dir().collection_path), out / "embeddings",
            batch_size=c.encode_batch_size, shard_size=c.encode_shard_size, model_fingerprint=model_fingerprint,
            overwrite=True, context=self.context,
        )
        if not self.context.is_main:
            return corpus, None
        index_dir = index_corpus(out / "embeddings", IndexConfig.from_dict({"kind": c.index_kind, **c.index_params}),
                                 index_dir=out / "faiss", force=True)
        return corpus, index_dir

    def _run_dense_index(self) -> dict:
        model_fp = read_stage(self.root, "dense_train")["model_fingerprint"]
        corpus, index_dir = self._encode_and_index(self.encoder(), model_fp, stage_dir(self.root, "dense_index"))
        summary = {"model_fingerprint": model_fp, "count": corpus.count, "dim": corpus.dim}
        if index_dir is None:  # not rank 0
            return summary
        return {**summary, "index_dir": to_stored_path(self.root, index_dir)}

    def dense_searcher(self):
        from dense.searcher import DenseSearcher

        return DenseSearcher.from_dir(stage_dir(self.root, "dense_index") / "faiss", self.encoder())

    # ---- fusion ----------------------------------------------------------------------------------------------
    def _run_fusion(self) -> dict:
        from hybrid.fusion_stage import train_fusion_artifacts

        c = self.config.fusion
        queries, qrels, _, fusion_qids = self.real_train_split()
        if c.max_train_queries:
            fusion_qids = fusion_qids[: c.max_train_queries]
        if not fusion_qids:
            raise RuntimeError("no held-out train queries for fusion training: set fusion.holdout_queries > 0")
        texts = [queries[q] for q in fusion_qids]
        bm25 = self.sparse_retriever().batch_search(texts, c.depth)
        dense = self.dense_searcher().batch_search(texts, c.depth)
        rankings = {q: {"bm25": b, "dense": d} for q, b, d in zip(fusion_qids, bm25, dense)}
        store = self.passages()
        summary = train_fusion_artifacts(
            stage_dir(self.root, "fusion"), {q: queries[q] for q in fusion_qids}, rankings,
            {q: qrels[q] for q in fusion_qids}, store.get_many, read_collection(self.data_dir().collection_path),
            len(store), depth=c.depth, rrf_k=c.rrf_k, C=c.C,
        )
        return {"train_queries": len(fusion_qids), "sparse_index": sparse_index_name(self.config), **summary}

    # ---- rerank ----------------------------------------------------------------------------------------------
    def _run_rerank(self) -> dict:
        """Settings for ``Retriever(mode="rerank")``. The query-likelihood model needs no training, only conversion
        from GGUF; a cross-encoder (``rerank.scorer = "cross_encoder"``) is trained here into
        ``rerank/cross_encoder/`` (resumable) unless ``rerank.model`` names a trained one."""
        c = self.config.rerank
        out = stage_dir(self.root, "rerank")
        out.mkdir(parents=True, exist_ok=True)
        if not c.enabled:
            write_json_atomic(out / "settings.json", {"enabled": False})
            return {"enabled": False}
        if c.model:
            model_dir = Path(c.model)
            if not (model_dir / "config.json").is_file():
                raise FileNotFoundError(f"rerank.model = {c.model!r} is not a model directory (no config.json)")
            if c.scorer == "cross_encoder":
                from fusion.cross_encoder import read_cross_encoder_config

                read_cross_encoder_config(model_dir)  # a clear error when it is a plain LM, not a trained one
        elif c.scorer == "cross_encoder":
            model_dir = self._train_cross_encoder(out / "cross_encoder")
        else:
            model_dir = smollm2_dir(self.root)
        settings = {**asdict(c), "model_dir": to_stored_path(self.root, model_dir)}  # relative when inside root
        if c.few_shot:  # the demonstrations themselves, so Retriever needs no data directory
            settings["examples"] = [asdict(e) for e in self.ql_examples(c.few_shot, c.few_shot_seed)]
        write_json_atomic(out / "settings.json", settings)
        return settings

    def cross_encoder_base(self, section) -> str:
        """The pretrained LM a cross-encoder starts from (``"smollm2"``: converted from the GGUF wheel)."""
        return base_model_path(self.root, section.base_model, section.base_layers)

    def cross_encoder_records(self, section, extra: Sequence = ()) -> list:
        """Training records of the cross-encoder: the train queries outside the fusion holdout whose positive is in
        the corpus (a seeded sample of ``section.max_train_queries`` when set), the synthetic stage's records with
        ``section.use_synthetic``, and ``extra``; hard negatives mined from the first stage
        ``section.negatives_from`` (``hybrid``: the fused ranking the reranker will reorder)."""
        import random

        from dense.training_data import read_msmarco_train_records

        queries, qrels, train_qids, _ = self.real_train_split()
        if section.max_train_queries and len(train_qids) > section.max_train_queries:
            train_qids = sorted(random.Random(self.config.seed).sample(train_qids, section.max_train_queries))
        store = self.passages()
        real = read_msmarco_train_records(
            {q: queries[q] for q in train_qids}, {q: qrels[q] for q in train_qids}, store
        )
        records = [*real, *(self._synthetic_records() if section.use_synthetic else []), *extra]
        known = {r.qid: set(r.positives) for r in records}
        for q in train_qids:
            known.setdefault(q, set()).update(p for p, g in qrels[q].items() if g > 0)
        if section.negatives_from == "bm25":
            search, close = self.bm25().batch_search, None
        else:
            from hybrid.searchers import fused_searcher

            fused = fused_searcher(self.root, "hybrid", store.get_many)
            search, close = fused.batch_search, fused.close
        try:
            return self._mine(records, search, depth=section.negatives_depth, n_negatives=section.negatives,
                              known_positives=known)
        finally:
            if close is not None:
                close()

    def _synthetic_records(self) -> list:
        from dense.training_data import read_records

        synth_dir = stage_dir(self.root, "synthetic")
        return [r for name in read_stage(self.root, "synthetic").get("files", [])
                for r in read_records(synth_dir / name)]

    def _train_cross_encoder(self, out: Path) -> Path:
        from dense.training_data import read_records, write_records
        from fusion.cross_encoder import CrossEncoderConfig
        from fusion.cross_encoder_training import CrossEncoderTrainConfig, train_cross_encoder

        section = self.config.rerank.cross_encoder
        train_config = CrossEncoderTrainConfig.from_dict({"seed": self.config.seed, **section.train},
                                                         where="[rerank.cross_encoder.train]")
        # Only what the model depends on: changing the rerank depth or time budget must not retrain it. A model,
        # checkpoints or mined records from other inputs are removed; those of the same inputs are reused/resumed.
        inputs = fingerprint({"cross_encoder": asdict(section), "seed": self.config.seed,
                              "fusion": self.inputs_fingerprint("fusion")})
        marker = out / "inputs_fingerprint.txt"
        records_path = out / "train_records.jsonl"
        if marker.exists() and marker.read_text().strip() != inputs:
            for stale in ("model", "checkpoints"):
                shutil.rmtree(out / stale, ignore_errors=True)
            records_path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, inputs + "\n")
        if records_path.is_file():  # mined by a run that was killed while training
            records = read_records(records_path)
        else:
            records = self.cross_encoder_records(section)
            write_records(records, records_path)
        return train_cross_encoder(
            self.cross_encoder_base(section), CrossEncoderConfig(max_length=section.max_length), train_config,
            records, self.passages().get, out, resume=(out / "checkpoints").exists(),
        )

    # ---- evaluation ------------------------------------------------------------------------------------------
    def _run_evaluate(self) -> dict:
        from hybrid.anchor import anchor_modes_for
        from hybrid.report import evaluate_modes, make_searcher

        c = self.config.eval
        data = self.data_dir()
        out = stage_dir(self.root, "evaluate")
        own = [m for m in c.modes if m != "rerank"] + (["rerank"] if self.config.rerank.enabled else [])
        modes = [*own, *anchor_modes_for(c.anchor, self.root)]
        # A run of the same inputs that was killed resumes: its finished (split, mode) metrics are reused instead of
        # searching again (on the A10G recipe, 18 runs over 7k queries, most reloading a 30 GB HNSW index). Not after
        # other inputs, and not when a finished evaluation of these inputs is being redone on purpose (--force).
        marker, inputs = out / "inputs_fingerprint.txt", self.inputs_fingerprint("evaluate")
        finished = read_stage(self.root, "evaluate")
        resume = (marker.is_file() and marker.read_text().strip() == inputs
                  and not (finished and finished.get("inputs_fingerprint") == inputs))
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, inputs + "\n")
        tables = {}
        for split in self.config.data.eval_splits:
            queries = data.queries(split)
            qrels = data.qrels(split, queries)
            report = evaluate_modes(
                lambda mode: make_searcher(mode, self.root), modes, queries, qrels,
                out_dir=out, split=split, k=c.k, rel_level=self.config.data.rel_levels.get(split, 1),
                latency_queries=c.latency_queries, chart=True, resume=resume,
            )
            tables[split] = report.table
            print(f"\n### {split} ({len(qrels)} judged queries)\n\n{report.table}")
        coefficients = coefficient_table(read_stage(self.root, "fusion")["coefficients"])
        write_text_atomic(out / "fusion_coefficients.md", coefficients + "\n")
        print(f"\n### fusion model coefficients (standardised features)\n\n{coefficients}")
        return {"tables": tables, "fusion_coefficients": coefficients}


def release_gpu_cache() -> None:
    """Hand the GPU memory PyTorch's allocator keeps cached after a stage back to the device.

    Every stage runs in one process: after generation (SmolLM2-1.7B) and training, the caching allocator would keep
    ~8-10 GB of the A10G's 24 that faiss-gpu (a flat index of 8.8M x 768 float16 is 13.5 GB, allocated outside
    PyTorch) needs in the stages after. Does nothing without torch imported or without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    gc.collect()  # models of the finished stage that only cycles still reference
    torch.cuda.empty_cache()


def coefficient_table(coefficients: dict[str, float]) -> str:
    """Markdown table of the fusion model's standardised coefficients, largest magnitude first."""
    from hybrid.evaluation import markdown_table

    rows = [{"feature": name, "coefficient": value}
            for name, value in sorted(coefficients.items(), key=lambda kv: -abs(kv[1]))]
    return markdown_table(rows, ["feature", "coefficient"])
