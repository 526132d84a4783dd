"""``hybrid-search`` (hybrid/cli.py), called in-process against the tiny artifact directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid import Retriever
from hybrid.cli import SNIPPET_CHARS, main
from hybrid.evaluation import read_trec_run

QUERY = "what is the climate of oslo"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_both_uses(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for option in ("--topics", "--output", "--batch", "--mode", "--json", "--artifacts", "-k"):
        assert option in out


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "hybrid-search"
    assert script.is_file(), "run `.venv/bin/pip install -e .` to install the entry point"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "--topics" in done.stdout


def test_one_query_prints_rank_id_score_and_snippet(tiny_artifacts, capsys):
    code, out, err = run([QUERY, "-k", "4", "--mode", "hybrid", "--artifacts", str(tiny_artifacts.root)], capsys)
    assert code == 0, err
    expected = Retriever(mode="hybrid", artifacts_dir=tiny_artifacts.root).search(QUERY, 4)
    lines = out.splitlines()
    assert len(lines) == 4
    for rank, (line, result) in enumerate(zip(lines, expected), start=1):
        fields = line.split(maxsplit=3)
        assert fields[:3] == [str(rank), result.document_id, f"{result.score:.5f}"]
        assert result.document_text.startswith(fields[3].removesuffix("...")) and len(fields[3]) <= SNIPPET_CHARS


def test_json_output(tiny_artifacts, capsys):
    code, out, _ = run([QUERY, "--json", "--mode", "sparse", "--artifacts", str(tiny_artifacts.root)], capsys)
    assert code == 0
    payload = json.loads(out)
    expected = Retriever(mode="sparse", artifacts_dir=tiny_artifacts.root).search(QUERY, 10)
    assert payload["query"] == QUERY and payload["mode"] == "sparse"
    assert [(r["rank"], r["id"], r["score"], r["text"]) for r in payload["results"]] == [
        (i, x.document_id, x.score, x.document_text) for i, x in enumerate(expected, start=1)
    ]


def test_topics_are_written_as_a_trec_run(tiny_artifacts, tmp_path, capsys):
    topics = tmp_path / "topics.tsv"
    topics.write_text("".join(f"{qid}\t{q}\n" for qid, q in tiny_artifacts.dev_queries.items()))
    out_file = tmp_path / "runs" / "dev.trec"
    argv = ["--topics", str(topics), "--output", str(out_file), "-k", "15", "--batch", "5", "--mode", "rerank",
            "--artifacts", str(tiny_artifacts.root)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    run_file = read_trec_run(out_file)
    retriever = Retriever(mode="rerank", artifacts_dir=tiny_artifacts.root)
    assert list(run_file) == list(tiny_artifacts.dev_queries)
    for qid, query in tiny_artifacts.dev_queries.items():
        assert [p for p, _ in run_file[qid]] == [p for p, _ in retriever.rank(query, 15)]
    assert "hybrid-rerank" in out_file.read_text().splitlines()[0]
    assert "wrote" in err and "query" in err  # the summary line, after the progress bar


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_artifacts_is_one_line_and_status_1(tmp_path, capsys):
    code, out, err = run([QUERY, "--artifacts", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and out == ""
    assert "does not exist" in _one_error_line(err)


@pytest.mark.parametrize(("content", "message"), [(None, "not found"), ("no tab on this line\n", "topics.tsv:1"),
                                                  ("q1\t  \n", "'q1' is empty"), ("", "empty")])
def test_bad_topics_file_is_one_line_and_status_1(tiny_artifacts, tmp_path, capsys, content, message):
    topics = tmp_path / "topics.tsv"
    if content is not None:
        topics.write_text(content)
    code, _, err = run(["--topics", str(topics), "--output", str(tmp_path / "run.trec"),
                        "--artifacts", str(tiny_artifacts.root)], capsys)
    assert code == 1
    assert message in _one_error_line(err)
    assert not (tmp_path / "run.trec").exists()


@pytest.mark.parametrize("argv", [[], [QUERY, "-k", "0"], ["--topics", "t.tsv"], [QUERY, "--mode", "magic"],
                                  [QUERY, "--topics", "t.tsv", "--output", "r"], [QUERY, "--batch", "0"]])
def test_bad_arguments_are_one_line_and_status_2(argv, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert "see --help" in _one_error_line(err)
