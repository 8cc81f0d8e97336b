"""The recipe's two errors, and how a command turns them into one line.

* :class:`UserError`: a mistake in what the user asked for (a flag, a file, a
  folder). It is a ``SystemExit``: uncaught, the interpreter prints
  ``error: <message>`` and exits with status 1, with no traceback.
* :class:`CheckpointError`: a weights file that cannot be read or does not fit the
  model. A ``RuntimeError``, so that library-style callers (``load_model``) can
  catch it with the errors they expect; :func:`run_command` prints it as one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CheckpointError", "UserError", "one_line", "run_command"]


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(message).split())


class UserError(SystemExit):
    """A mistake in the user's input: names the flag or file and what was expected.

    Args:
        message: ``"--data-root data/raf: expected a directory, got a file"``; made
            one line.

    ``str(error)`` is the message; ``error.code`` (what the interpreter prints when
    the error ends the program) is ``"error: " + message``.
    """

    def __init__(self, message: str) -> None:
        self.message = one_line(message)
        super().__init__(f"error: {self.message}")

    def __str__(self) -> str:
        return self.message


class CheckpointError(RuntimeError):
    """A weights file does not fit the model: names the missing/unexpected/misshapen keys."""


def run_command(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)``; return its exit status, printing user errors as one line.

    ``UserError`` and ``CheckpointError`` become ``error: ...`` on stderr and status 1;
    Ctrl-C becomes status 130 (whatever ``main`` logged about it stays). Any other
    exception is a bug and keeps its traceback.

    Args:
        main: The command, called with ``argv``.
        argv: Arguments without the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        0, 1 or 130.
    """
    try:
        main(argv)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(exc.code, file=sys.stderr)
        return 1
    except CheckpointError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    return 0
