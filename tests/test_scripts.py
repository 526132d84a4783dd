"""Smoke tests of every command line in scripts/: ``--help`` works, and with its default paths pointing at nothing
(an empty artifact directory, a missing file) each one exits non-zero with one line that names what is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("*.py"))


def run_script(script: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero(script: str) -> None:
    result = run_script(script, ["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "Traceback" not in result.stderr
    # a shell line continuation in an example stays a line break (a plain docstring would join the lines)
    source = (REPO / "scripts" / script).read_text(encoding="utf-8")
    if " \\\n" in source.split('"""')[1]:
        assert " \\\n" in result.stdout


# script -> (arguments given a work directory and the tiny data directory, text the error line must hold).
# Everything not given takes its default: the artifact directory is $HYBRID_ARTIFACTS, which does not exist.
Case = Callable[[Path, Path], tuple[list[str], str]]
CASES: dict[str, Case] = {
    "benchmark_latency.py": lambda w, d: (["--queries", str(d / "queries.dev.tsv")], "no-artifacts"),
    "benchmark_ql_scorer.py": lambda w, d: (
        ["--run", str(_write(w / "run.trec", "200 Q0 3 1 1.0 x\n")), "--queries", str(d / "queries.dev.tsv")],
        "no-artifacts"),
    "benchmark_querygen.py": lambda w, d: (["--data-dir", str(w / "missing-data")], "missing-data"),
    "benchmark_train_step.py": lambda w, d: (["--config", "configs/cpu-marco43k.toml", "--base-model-dir",
                                              str(w / "no-model"), "--variant", "freeze_embeddings=true"], "no-model"),
    "build_faiss_index.py": lambda w, d: ([], "no-artifacts"),
    "convert_smollm2.py": lambda w, d: (["--out", str(w / "model"), "--gguf", str(w / "missing.gguf")],
                                        "missing.gguf"),
    "encode_corpus.py": lambda w, d: (["--model-dir", str(w / "no-model"), "--collection",
                                       str(d / "collection.tsv")], "no-model"),
    "evaluate.py": lambda w, d: (["--queries", str(d / "queries.dev.tsv"), "--qrels", str(d / "qrels.dev.txt"),
                                  "--modes", "sparse"], "no-artifacts"),
    "export_holdout.py": lambda w, d: (["--config", "configs/cpu-marco43k.toml", "--data-dir",
                                        str(w / "missing-data"), "--out", str(w / "out")], "missing-data"),
    "generate_queries.py": lambda w, d: (["--method", "crop", "--collection", str(w / "missing.tsv"), "--out",
                                          str(w / "out")], "missing.tsv"),
    "plot_scaling.py": lambda w, d: (["--run", str(w / "no-run"), "--out", str(w / "scaling.png")], "no-run"),
    "prepare_data.py": lambda w, d: (["--source", "local", "--dir", str(w / "missing-data")], "missing-data"),
    "rerank_experiment.py": lambda w, d: (["--queries", str(d / "queries.dev.tsv"), "--qrels",
                                           str(d / "qrels.dev.txt")], "no-artifacts"),
    "run_pipeline.py": lambda w, d: (["--config", "configs/cpu-marco43k.toml", "--stages", "fusion"],
                                     "needs stage"),
    "score_teacher.py": lambda w, d: (["--config", "configs/cpu-marco43k.toml", "--queries", "3", "--out",
                                       str(w / "teacher.jsonl")], "no-artifacts"),
    "train_dense.py": lambda w, d: (["--encoder-config", '{"model_name_or_path": "m"}', "--train-config", "{}",
                                     "--records", str(w / "missing.jsonl"), "--collection",
                                     str(d / "collection.tsv")], "missing.jsonl"),
    "train_ql_reranker.py": lambda w, d: (["--config", "configs/cpu-marco43k.toml"], "no-artifacts"),
    "train_cross_encoder.py": lambda w, d: (["--config", "configs/cpu-marco43k.toml"], "no-artifacts"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_script_has_a_smoke_case() -> None:
    assert sorted(CASES) == SCRIPTS


@pytest.mark.parametrize("script", sorted(CASES))
def test_missing_inputs_are_one_line_and_a_nonzero_exit(script: str, tmp_path: Path, tiny_msmarco_dir: Path) -> None:
    args, missing = CASES[script](tmp_path, tiny_msmarco_dir)
    result = run_script(script, args, {"HYBRID_ARTIFACTS": str(tmp_path / "no-artifacts"),
                                       "MSMARCO_DIR": str(tiny_msmarco_dir)})
    assert result.returncode == 1  # the exit status README and hybrid/scripting.py document
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and missing in last, last


def test_train_dense_without_out_trains_into_the_artifact_directory(tmp_path: Path, tiny_msmarco_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The default --out is <artifacts>/dense_model (it raised KeyError on the stage name)."""
    from dense_fixtures import make_tiny_bert_dir

    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"qid": q, "query": text, "positives": [p]}) + "\n"
                               for q, text, p in [("1", "topic one", "1"), ("2", "number", "8")]))
    monkeypatch.setenv("HYBRID_ARTIFACTS", str(tmp_path / "artifacts"))
    spec = importlib.util.spec_from_file_location("train_dense_script", REPO / "scripts" / "train_dense.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main([
        "--encoder-config", json.dumps({"model_name_or_path": str(make_tiny_bert_dir(tmp_path)),
                                        "query_max_len": 8, "passage_max_len": 16}),
        "--train-config", json.dumps({"max_steps": 1, "batch_size": 2, "hard_negatives": 0}),
        "--records", str(records), "--collection", str(tiny_msmarco_dir / "collection.tsv"), "--device", "cpu",
    ])
    assert status == 0
    manifest = json.loads((tmp_path / "artifacts" / "dense_model" / "model" / "manifest.json").read_text())
    assert manifest["steps"] == 1


def test_ablation_script_prints_usage_without_running_anything(tmp_path: Path) -> None:
    script = REPO / "scripts" / "ablation_run.sh"
    env = {**os.environ, "EXP_DIR": str(tmp_path / "exps"), "MSMARCO_DIR": str(tmp_path)}
    for args, status in ((["--help"], 0), ([], 2), (["only-a-name"], 2)):
        result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == status and "usage: scripts/ablation_run.sh NAME MODES" in result.stdout + result.stderr
    assert not (tmp_path / "exps").exists()


def test_export_holdout_writes_the_pipelines_heldout_queries(tmp_path: Path, tiny_msmarco_dir: Path) -> None:
    from hybrid.synthetic_data import heldout_train_qids

    result = run_script("export_holdout.py", ["--config", "configs/cpu-marco43k.toml", "--data-dir",
                                              str(tiny_msmarco_dir), "--out", str(tmp_path / "h")])
    assert result.returncode == 0, result.stderr
    qids = [line.split("\t")[0] for line in (tmp_path / "h" / "queries.tsv").read_text().splitlines()]
    assert qids == heldout_train_qids(REPO / "configs" / "cpu-marco43k.toml", tiny_msmarco_dir) and qids
    judged = {line.split()[0] for line in (tmp_path / "h" / "qrels.txt").read_text().splitlines()}
    assert judged == set(qids)
