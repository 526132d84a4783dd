"""Build, save and load the faiss index over an encoded corpus (the ``dense_index/`` stage).

Three kinds, all scoring by inner product (the bi-encoder's similarity):

- ``flat``: exact search (``IndexFlatIP``). The default and the reference for the others. On a GPU it is a
  ``GpuIndexFlatIP`` storing float16 (half the memory; 8.8M x 768 fits a 24 GB A10G).
- ``hnsw``: ``IndexHNSWFlat``, a graph over full vectors: fast approximate search on CPU, no training, ~flat memory
  plus the graph; building it for 8.8M passages takes hours on CPU.
- ``ivfpq``: ``IndexIVFPQ``, compressed (``pq_m`` bytes per vector at 8 bits): the one that fits 8.8M passages in a
  few GB of RAM on CPU, at some cost in recall; trained on a random sample.

Vectors are added in batches read from the (float16, memory-mapped) embedding matrix, so the full float32 matrix
never exists outside the index itself. The index file and its manifest go into the same directory as the corpus
encoding by default; the manifest is written last, so a half-written index is never taken for a finished one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from tqdm.auto import tqdm

from dense.atomic import remove_dead_temporaries, write_json_atomic
from dense.corpus_encoding import PIDS_FILE, EncodedCorpus, check_expected, read_json
from dense.interfaces import ArtifactMismatchError, IncompleteArtifactError

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivfpq"]
UseGpu = bool | Literal["auto"]
STAGE = "dense index"
RERUN_HINT = "rerun the dense index stage (scripts/build_faiss_index.py)"
INDEX_FILE = "index.faiss"
INDEX_MANIFEST_FILE = "index_manifest.json"
REQUIRED_MANIFEST_FIELDS = (
    "model_fingerprint", "encoder_config", "corpus_sha256", "dim", "count", "kind", "metric", "params",
)
_PARAMS_BY_KIND: dict[str, tuple[str, ...]] = {
    "flat": (),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivfpq": ("nlist", "pq_m", "pq_nbits", "nprobe", "train_size", "seed"),
}
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT}


@dataclass(frozen=True)
class IndexConfig:
    """How to index; the defaults aim at 8.8M passages (fields not used by ``kind`` are ignored)."""

    kind: IndexKind = "flat"
    metric: Literal["ip"] = "ip"
    # hnsw: neighbours per node, candidate list size while building and while searching (recall vs speed).
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    # ivfpq: clusters (~4*sqrt(n) for 8.8M), sub-quantizers (must divide dim), bits per code, clusters searched,
    # rows sampled for training (faiss wants >= 39 per cluster), sampling seed.
    nlist: int = 16_384
    pq_m: int = 64
    pq_nbits: int = 8
    nprobe: int = 128
    train_size: int = 1_000_000
    seed: int = 0
    # rows converted to float32 and added at a time (bounds the extra memory while adding).
    add_batch_size: int = 65_536

    def params(self) -> dict[str, Any]:
        """The fields that shape an index of this kind (what the manifest records and a reload restores)."""
        return {name: getattr(self, name) for name in _PARAMS_BY_KIND[self.kind]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> IndexConfig:
        """Build from a config table, naming unknown keys instead of ignoring them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            place = f" in {where}" if where else ""
            raise ValueError(f"IndexConfig: unknown key(s) {unknown}{place}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> IndexConfig:
        return cls(kind=manifest["kind"], metric=manifest["metric"], **manifest["params"])


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees a CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(
    embeddings: np.ndarray,
    config: IndexConfig = IndexConfig(),
    *,
    use_gpu: UseGpu = False,
    progress: bool = True,
) -> faiss.Index:
    """Index the rows of ``embeddings`` (any float dtype, e.g. a float16 memmap); row ``i`` gets id ``i``.

    ``use_gpu`` (``"auto"``: when usable) builds a float16 GPU flat index, for searching in the same process; only
    ``kind="flat"`` runs on GPU. An index that is saved gains nothing from it: adding to a flat index is a copy, and
    ``load_index``/``DenseSearcher.from_dir`` can move the saved index onto the GPU.
    """
    count, dim = _validate(embeddings, config)
    on_gpu = _resolve_gpu(use_gpu, config.kind)
    started = time.perf_counter()
    index = _gpu_flat_fp16(dim) if on_gpu else _empty_cpu_index(dim, config)
    if not index.is_trained:
        _train(index, embeddings, config)
    _add_in_batches(index, embeddings, config.add_batch_size, progress=progress, desc=f"faiss {config.kind}")
    apply_search_params(index, config)
    seconds = time.perf_counter() - started
    logger.info(
        "built a %s faiss index of %d x %d%s in %.1f s (%.0f vectors/s)",
        config.kind, count, dim, " on GPU (float16)" if on_gpu else "", seconds, count / max(seconds, 1e-9),
    )
    return index


def apply_search_params(index: faiss.Index, config: IndexConfig) -> None:
    """Set the search-time knobs (``efSearch``, ``nprobe``) from ``config``."""
    if config.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = config.ef_search
    elif config.kind == "ivfpq":
        faiss.downcast_index(index).nprobe = config.nprobe


def save_index(index: faiss.Index, directory: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write ``index.faiss`` then ``index_manifest.json`` (both atomically) into ``directory``."""
    missing = [name for name in REQUIRED_MANIFEST_FIELDS if name not in manifest]
    if missing:
        raise ValueError(f"save_index: manifest lacks {missing}; see dense.faiss_index.index_manifest")
    if (manifest["count"], manifest["dim"]) != (index.ntotal, index.d):
        raise ValueError(
            f"save_index: manifest says {manifest['count']} x {manifest['dim']} but the index holds "
            f"{index.ntotal} x {index.d}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Remove the old manifest first: a kill between the two writes must not pair a new index with an old manifest.
    (directory / INDEX_MANIFEST_FILE).unlink(missing_ok=True)
    remove_dead_temporaries(directory / INDEX_FILE)  # a killed earlier save's partial index (tens of GB at full scale)
    tmp = directory / f"{INDEX_FILE}.tmp-{os.getpid()}"
    try:
        faiss.write_index(_to_cpu(index), str(tmp))
        os.replace(tmp, directory / INDEX_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(directory / INDEX_MANIFEST_FILE, {"stage": STAGE, "faiss_version": faiss.__version__, **manifest})


def load_index(
    directory: str | Path,
    expected: Mapping[str, Any] | None = None,
    *,
    use_gpu: UseGpu = False,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Load ``(index, manifest)``; every ``expected`` field must equal the manifest's or the load is refused.

    ``use_gpu`` moves a flat index onto the GPU as float16 (``"auto"``: when one is usable).
    """
    directory = Path(directory)
    manifest_path, index_path = directory / INDEX_MANIFEST_FILE, directory / INDEX_FILE
    if not manifest_path.exists():
        state = "an unfinished index" if index_path.exists() else "no index"
        raise IncompleteArtifactError(f"{directory}: {state} (no {INDEX_MANIFEST_FILE}); {RERUN_HINT}.")
    manifest = read_json(manifest_path, stage=STAGE)
    if expected:
        check_expected(manifest, expected, path=manifest_path, what="dense index", rerun=RERUN_HINT)
    if not index_path.exists():
        raise IncompleteArtifactError(f"{index_path}: missing although {manifest_path} exists; {RERUN_HINT}.")
    index = faiss.read_index(str(index_path))
    if (index.ntotal, index.d) != (manifest["count"], manifest["dim"]):
        raise ArtifactMismatchError(
            f"{index_path}: holds {index.ntotal} x {index.d} vectors but {manifest_path} says "
            f"{manifest['count']} x {manifest['dim']}; {RERUN_HINT}."
        )
    config = IndexConfig.from_manifest(manifest)
    apply_search_params(index, config)
    if _resolve_gpu(use_gpu, config.kind):
        index = _flat_to_gpu_fp16(index)
    return index, manifest


def index_manifest(corpus: EncodedCorpus, config: IndexConfig, **extra: Any) -> dict[str, Any]:
    """The manifest of an index over ``corpus``: its inputs (model, encoder config, corpus) and settings."""
    source = corpus.manifest
    return {
        "model_fingerprint": source["model_fingerprint"],
        "encoder_config": source.get("encoder_config"),
        "corpus_sha256": source["corpus_sha256"],
        "count": corpus.count,
        "dim": corpus.dim,
        "embeddings_dtype": str(corpus.embeddings.dtype),
        "kind": config.kind,
        "metric": config.metric,
        "params": config.params(),
        **extra,
    }


def index_corpus(
    encoded_dir: str | Path,
    config: IndexConfig = IndexConfig(),
    *,
    index_dir: str | Path | None = None,
    use_gpu: UseGpu = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build and save the index over the corpus encoded in ``encoded_dir``; returns the index directory.

    Skips the work when an index with the same inputs and settings is already there (unless ``force``).
    """
    corpus = EncodedCorpus.open(encoded_dir)
    index_dir = Path(index_dir) if index_dir is not None else corpus.directory
    wanted = index_manifest(corpus, config)
    if not force and (index_dir / INDEX_MANIFEST_FILE).exists():
        saved = read_json(index_dir / INDEX_MANIFEST_FILE, stage=STAGE)
        if all(saved.get(key) == value for key, value in wanted.items()) and (index_dir / INDEX_FILE).exists():
            logger.info("%s: dense index is up to date, nothing to do", index_dir)
            return index_dir
    started = time.perf_counter()
    index = build_index(corpus.embeddings, config, use_gpu=use_gpu, progress=progress)
    built_on_gpu = is_gpu_index(index)
    seconds = round(time.perf_counter() - started, 3)
    if index_dir.resolve() != corpus.directory.resolve():  # the searcher reads pids.txt next to the index
        index_dir.mkdir(parents=True, exist_ok=True)
        _copy_atomic(corpus.directory / PIDS_FILE, index_dir / PIDS_FILE)
    save_index(index, index_dir, {**wanted, "built_on_gpu": built_on_gpu, "seconds": seconds})
    return index_dir


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _validate(embeddings: np.ndarray, config: IndexConfig) -> tuple[int, int]:
    if config.kind not in _PARAMS_BY_KIND:
        raise ValueError(f"unknown index kind {config.kind!r}; choose one of {sorted(_PARAMS_BY_KIND)}")
    if config.metric not in _METRICS:
        raise ValueError(f"unsupported metric {config.metric!r}; supported: {sorted(_METRICS)}")
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D matrix, got shape {embeddings.shape}")
    count, dim = (int(x) for x in embeddings.shape)
    if config.add_batch_size < 1:
        raise ValueError(f"add_batch_size must be >= 1, got {config.add_batch_size}")
    if config.kind == "ivfpq":
        if dim % config.pq_m:
            raise ValueError(f"ivfpq: pq_m={config.pq_m} must divide the embedding dimension {dim}")
        if min(count, config.train_size) < max(config.nlist, 1 << config.pq_nbits):
            raise ValueError(
                f"ivfpq: training needs at least max(nlist, 2**pq_nbits) = {max(config.nlist, 1 << config.pq_nbits)} "
                f"vectors but has {min(count, config.train_size)} (count={count}, train_size={config.train_size}); "
                "lower nlist/pq_nbits or use kind='flat'"
            )
    return count, dim


def _empty_cpu_index(dim: int, config: IndexConfig) -> faiss.Index:
    metric = _METRICS[config.metric]
    if config.kind == "flat":
        return faiss.IndexFlat(dim, metric)
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, metric)
        index.hnsw.efConstruction = config.ef_construction
        return index
    quantizer = faiss.IndexFlat(dim, metric)
    return faiss.IndexIVFPQ(quantizer, dim, config.nlist, config.pq_m, config.pq_nbits, metric)


def _train(index: faiss.Index, embeddings: np.ndarray, config: IndexConfig) -> None:
    count = embeddings.shape[0]
    size = min(config.train_size, count)
    rows = np.sort(np.random.default_rng(config.seed).choice(count, size=size, replace=False))
    sample = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    started = time.perf_counter()
    index.train(sample)
    logger.info("trained %s on %d sampled vectors in %.1f s", config.kind, size, time.perf_counter() - started)


def _add_in_batches(index: faiss.Index, embeddings: np.ndarray, batch: int, *, progress: bool, desc: str) -> None:
    count = embeddings.shape[0]
    with tqdm(total=count, unit="vector", desc=desc, disable=not progress) as bar:
        for begin in range(0, count, batch):
            chunk = np.ascontiguousarray(embeddings[begin : begin + batch], dtype=np.float32)
            index.add(chunk)
            bar.update(len(chunk))


def _resolve_gpu(use_gpu: UseGpu, kind: str) -> bool:
    if use_gpu == "auto":
        return kind == "flat" and gpu_available()
    if not use_gpu:
        return False
    if not gpu_available():
        raise RuntimeError(
            "use_gpu=True but this faiss has no GPU support or sees no CUDA device; on a CUDA machine install "
            "faiss-gpu-cu12 with `make install FAISS=gpu` (it removes faiss-cpu first: both install the same `faiss` "
            "package), or pass use_gpu=False / 'auto'"
        )
    if kind != "flat":
        raise ValueError(f"use_gpu=True is supported for kind='flat' only, not {kind!r}; pass use_gpu='auto'")
    return True


# --- GPU (needs faiss-gpu and CUDA; not exercised by the CPU test suite) -------------------------------------------


def _gpu_flat_fp16(dim: int) -> faiss.Index:
    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.useFloat16 = True
    index = faiss.GpuIndexFlatIP(resources, dim, config)
    index.referenced_objects = [resources]  # the index must not outlive its GPU resources
    return index


def _flat_to_gpu_fp16(index: faiss.Index) -> faiss.Index:
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True
    gpu_index = faiss.index_cpu_to_gpu(resources, 0, index, options)
    gpu_index.referenced_objects = [resources]
    return gpu_index


def is_gpu_index(index: faiss.Index) -> bool:
    """True for faiss GPU indexes (checked by class name: ``faiss.GpuIndex`` is absent from some releases)."""
    return type(index).__name__.startswith("Gpu")


def _to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index


def describe(index: faiss.Index) -> str:
    """One line for logs: class, size, dimension."""
    return f"{type(faiss.downcast_index(index)).__name__}({index.ntotal} x {index.d})"

