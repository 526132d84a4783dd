"""pyproject.toml declares what the code imports, and the code imports what pyproject.toml declares.

A declared package nothing imports must say here why it is installed; a third-party module the code imports must
come from a declared package (not only from some other package's dependencies).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = ("hybrid", "dense", "fusion", "sparse", "scripts")
# declared, never imported by name: why each is installed
USED_WITHOUT_IMPORT = {
    "pyserini": "ships the Anserini fat jar that sparse/jvm.py runs; its Python modules are never imported",
    "gguf": "transformers reads SmolLM2's GGUF file with it (dense/pretrained.py, dense/querygen/generator.py)",
}
# imported inside try/except ImportError, used when installed (fusion/analysis.py: stemming is off by default)
OPTIONAL_IMPORTS = {"Stemmer", "nltk"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_names(requirements: list[str]) -> dict[str, str]:
    """Distribution name (normalised) -> requirement string."""
    return {_normalise(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]): r for r in requirements}


def installed_faiss_extra() -> str:
    """The faiss extra this environment was installed with: ``gpu`` after ``make install FAISS=gpu``, else ``cpu``."""
    return "gpu" if "faiss-gpu-cu12" in distributions_of("faiss") else "cpu"


def declared(faiss: str | None = None) -> dict[str, str]:
    """What ``make install`` installs: the dependencies and one faiss extra (the installed one by default)."""
    extra = faiss or installed_faiss_extra()
    return requirement_names(project()["dependencies"] + project()["optional-dependencies"][extra])


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(roots: tuple[str, ...] = CODE) -> dict[str, str]:
    """Top-level module -> first file importing it, over every import statement (also inside functions)."""
    found: dict[str, str] = {}
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def third_party(modules: dict[str, str]) -> dict[str, str]:
    ours = {"hybrid", "dense", "fusion", "sparse"}
    return {m: f for m, f in modules.items() if m not in sys.stdlib_module_names and m not in ours}


def distributions_of(module: str) -> set[str]:
    return {_normalise(d) for d in md.packages_distributions().get(module, [])}


def test_every_declared_package_is_imported_or_says_why_it_is_installed() -> None:
    imported = {d for m in third_party(imported_modules()) for d in distributions_of(m)}
    unused = sorted(set(declared()) - imported - set(USED_WITHOUT_IMPORT))
    assert unused == [], f"declared in pyproject.toml but never imported: {unused}"
    stale = sorted(set(USED_WITHOUT_IMPORT) - set(declared()))
    assert stale == [], f"USED_WITHOUT_IMPORT names packages that are no longer declared: {stale}"


def test_every_imported_third_party_module_comes_from_a_declared_package() -> None:
    names = set(declared())
    undeclared = {
        module: where for module, where in third_party(imported_modules()).items()
        if module not in OPTIONAL_IMPORTS and not distributions_of(module) & names
    }
    assert undeclared == {}, f"imported without being declared (module: first file): {undeclared}"


def test_the_two_faiss_builds_are_alternatives_never_installed_together() -> None:
    extras = project()["optional-dependencies"]
    builds = {name: set(requirement_names(extras[name])) for name in ("cpu", "gpu")}
    assert builds == {"cpu": {"faiss-cpu"}, "gpu": {"faiss-gpu-cu12"}}
    assert not any(name.startswith("faiss") for name in requirement_names(project()["dependencies"]))
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q -e '.[dev,$(FAISS)]'" in makefile and "uninstall -q -y faiss-cpu faiss-gpu-cu12" in makefile


def test_the_checks_see_imports_and_distributions() -> None:
    modules = imported_modules()
    assert modules["faiss"].startswith("dense/") and "jnius" in modules  # a plain and a from-import, both found
    assert distributions_of("sklearn") == {"scikit-learn"}
    assert distributions_of("faiss") & {"faiss-cpu", "faiss-gpu-cu12"}  # whichever build `make install` chose
    assert ("faiss-gpu-cu12" if installed_faiss_extra() == "gpu" else "faiss-cpu") in declared()
    assert "datasets" not in declared()  # never imported: 600k training records take ~1.3 GB as plain tuples
