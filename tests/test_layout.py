"""The layout DESIGN.md describes: the leaf packages never import ``hybrid``, and the docs name only files and
modules that exist."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from hybrid.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]
LEAVES = ("sparse", "dense", "fusion")
PACKAGES = ("hybrid", "dense", "fusion", "sparse")
# a repository path (globs allowed) and a dotted module / attribute / config-key reference
PATH = re.compile(r"(?<![\w./])((?:hybrid|dense|fusion|sparse|scripts|tests|configs)/[\w/*.-]*\w)")
DOTTED = re.compile(r"(?<![\w./])((?:hybrid|dense|fusion|sparse)(?:\.[A-Za-z_]\w*)+)")


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_leaf_packages_never_import_hybrid() -> None:
    offenders = [
        f"{path.relative_to(REPO)} imports {name}"
        for package in LEAVES
        for path in sorted((REPO / package).rglob("*.py"))
        for name in _imported_modules(path)
        if name == "hybrid" or name.startswith("hybrid.")
    ]
    assert offenders == []


def _resolves(dotted: str) -> bool:
    """``dotted`` is a module, or a module and attributes inside it."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def _is_config_key(dotted: str) -> bool:
    """``dotted`` is a ``section.key`` of the pipeline config (``fusion.depth``, ``dense.train.max_steps``)."""
    node: object = PipelineConfig()
    for part in dotted.split("."):
        if isinstance(node, dict):
            return True  # free-form tables (dense.train, dense.encoder) are checked by their own dataclasses
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


@pytest.mark.parametrize("doc", ["DESIGN.md", "README.md"])
def test_docs_name_only_files_and_modules_that_exist(doc: str) -> None:
    text = (REPO / doc).read_text(encoding="utf-8")
    missing = sorted(path for path in set(PATH.findall(text)) if not any(REPO.glob(path)))
    missing += sorted(name for name in set(DOTTED.findall(text)) if not (_resolves(name) or _is_config_key(name)))
    assert missing == []


def test_the_reference_checks_catch_what_does_not_exist() -> None:
    assert not _resolves("hybrid.errors.ArtifactError") and _resolves("hybrid.artifacts.ArtifactError")
    assert _is_config_key("fusion.depth") and not _is_config_key("fusion.use_synthetic")
    assert PATH.findall("see `hybrid/msmarco.py`, ../shared/STYLE.md") == ["hybrid/msmarco.py"]
