"""How the scripts in ``scripts/`` end: a user's mistake is one line on stderr and exit status 1, not a traceback.

A mistake is what the project raises on purpose with a message that says what to do: a missing or malformed file
(``OSError``, ``ValueError`` and their subclasses such as ``DataFormatError`` and ``ConfigError``) or any error class
defined in ``hybrid``, ``dense``, ``fusion`` or ``sparse`` (``ArtifactError``, ``TrainingStateError``,
``IndexBuildError``, ...). Anything else is a bug and keeps its traceback; so does everything when the environment
sets ``HYBRID_TRACEBACK=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

PROJECT_PACKAGES = ("hybrid", "dense", "fusion", "sparse")
EXIT_ERROR = 1


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a mistake in the inputs (see the module docstring) rather than a bug."""
    if isinstance(error, (OSError, ValueError)):
        return True
    return any(cls.__module__.split(".")[0] in PROJECT_PACKAGES for cls in type(error).__mro__)


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages, such as a log tail, are joined)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split()) or type(error).__name__


def run_script(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
               prog: str | None = None) -> int:
    """Call ``main(argv)`` and return its exit status; a user error becomes ``<prog>: error: <message>``."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("HYBRID_TRACEBACK") == "1" or not is_user_error(error):
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
