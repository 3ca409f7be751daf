"""What the absl entry points share: one-line errors for bad flags and bad input, quiet library logs."""

from __future__ import annotations

import logging as std_logging
import os
import pickle
import sys
from typing import Callable

from absl import app, flags, logging

_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for configuration and input errors.")

# Errors that mean "the user's input or the machine is wrong" (unknown key, bad shape, a missing file, a path that
# is a file or not writable, a full disk, a refused pickle): reported in one line.
USER_ERRORS = (ValueError, KeyError, OSError, pickle.UnpicklingError)


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of checkpointing internals (every rename and thread hand-off); keeps warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # OSError(errno, strerror, filename): its args[0] is a number
        return f"{e.strerror}: {e.filename!r}" if e.filename else e.strerror
    msg = e
    while isinstance(msg, BaseException) and msg.args:
        msg = msg.args[0]
    lines = [line.strip() for line in str(msg).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a config file raised: keep its last line
        lines = [lines[0].split(": Error whilst")[0] + ":", lines[-1]]
    return " ".join(lines)


def check_output_dir(path: str, flag: str) -> None:
    """A directory flag that the command writes into: refuses a path that is a file or not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag}={path} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):  # the nearest existing ancestor is where the folders get created
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{flag}={path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag}={path}: {existing} is not writable")


def _parse_flags(argv, known_only=False):
    try:
        return flags.FLAGS(argv, known_only=known_only)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        print(f"llama_jax: error: bad flag: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def run(main: Callable[..., None], commands: tuple[str, ...] = (), pass_unknown_flags: bool = False) -> None:
    """Parses flags, then runs `main()`; a USER_ERRORS exception becomes `llama_jax: error: ...` and exit 2.

    With `commands`, exactly one positional argument, one of them, is expected and passed: `main(command)`.
    With `pass_unknown_flags`, arguments that are not this program's flags are passed on as `main(args)`
    (e.g. Apache Beam pipeline options) instead of being an error.
    """
    def wrapped(argv):
        args = argv[1:]
        if commands and (len(args) != 1 or args[0] not in commands):
            raise app.UsageError(f"expected one command of {', '.join(commands)}; got {' '.join(args) or 'none'}")
        if args and not commands and not pass_unknown_flags:
            raise app.UsageError(f"unexpected arguments: {' '.join(args)}")
        logging.get_absl_handler().addFilter(_QuietLibraries())
        try:
            if pass_unknown_flags:
                main(args)
            else:
                main(*args)
        except USER_ERRORS as e:
            if _TRACEBACK.value:
                raise
            logging.flush()
            print(f"llama_jax: error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped, flags_parser=lambda argv: _parse_flags(argv, known_only=pass_unknown_flags))
