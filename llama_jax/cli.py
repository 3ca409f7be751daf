"""What the absl entry points share: one-line errors for bad flags and bad input, quiet library logs."""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import Callable

from absl import app, flags, logging

_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for configuration and input errors.")

# Errors that mean "the user's input is wrong" (unknown key, missing file, bad shape, a path that is a file or
# not writable): reported in one line.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


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


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        print(f"llama_jax: error: bad flag: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def run(main: Callable[[], None]) -> None:
    """Parses flags, then runs `main()`; a USER_ERRORS exception becomes `llama_jax: error: ...` and exit 2."""
    def wrapped(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.get_absl_handler().addFilter(_QuietLibraries())
        try:
            main()
        except USER_ERRORS as e:
            if _TRACEBACK.value:
                raise
            logging.flush()
            print(f"llama_jax: error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped, flags_parser=_parse_flags)
