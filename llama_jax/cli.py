"""What the absl entry points share: one-line errors for bad flags and bad input, quiet library logs."""

from __future__ import annotations

import logging as std_logging
import os
import pickle
import re
import sys
import threading
from typing import Any, Callable, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for configuration and input errors.")

# Errors that mean "the user's input or the machine is wrong" (unknown key, bad shape, a missing file, a path that
# is a file or not writable, a full disk, a refused pickle): reported in one line.
USER_ERRORS = (ValueError, KeyError, OSError, pickle.UnpicklingError)


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of checkpointing internals (every rename and thread hand-off), and the tracebacks
    Orbax's background threads log when a save fails (the failure reaches the run as one error line); keeps
    other warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno >= std_logging.ERROR and record.exc_info:
            return False
        return record.levelno >= std_logging.WARNING


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
    """A directory flag that the command writes into: refuses an empty path (it would mean the current
    directory), a path that is a file and one that is not writable."""
    if not path.strip():
        raise ValueError(f"{flag} is empty; give a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag}={path} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):  # the nearest existing ancestor is where the folders get created
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{flag}={path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag}={path}: {existing} is not writable")


def validate(flag: flags.FlagHolder, check: Callable[[Any], bool], allowed: str) -> None:
    """Refuses a value of `flag` for which `check` is false when the flags are parsed, in one line naming the flag
    and `allowed` (`bad flag: --top_p=0.0: must be in (0, 1]`). An unset flag (None) is not checked."""
    flags.register_validator(flag, lambda v: v is None or bool(check(v)), message=f"must be {allowed}")


def nonempty(*path_flags: flags.FlagHolder) -> None:
    """Refuses an empty path (an unset shell variable), which would otherwise mean the current directory."""
    for flag in path_flags:
        flags.register_validator(flag, lambda v: v is None or bool(v.strip()),
                                 message="must not be empty (an unset variable?)")


_MISSING = re.compile(r"Flag (--\S+) must have a value other than None\.")


def _exit_with_error(message: str) -> NoReturn:
    print(f"llama_jax: error: {message}", file=sys.stderr)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        # A failed run has nothing left to wait for: background threads (a failed async checkpoint's) would hold
        # the exit for minutes.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)


def _check_config_files() -> None:
    """ml_collections defers a config file's load error (a missing file, an OSError in `get_config`) to the first
    use of the config, as an OSError traceback; report it now, naming the flag and the file."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if not flag.present:
            continue
        try:
            arg = config_flags.get_config_filename(flag)
        except TypeError:  # not a config flag
            continue
        path = arg.split(":", 1)[0]
        if not os.path.isfile(path):
            _exit_with_error(f"bad flag: --{name}={arg}: experiment file {path!r} does not exist")
        try:
            getattr(flag.value, "_probe", None)  # a config that failed to load raises on any attribute
        except OSError as e:
            _exit_with_error(f"bad flag: --{name}={arg}: {_one_line(e.__cause__ or e)}")


def _parse_flags(argv, known_only=False):
    try:
        argv = flags.FLAGS(argv, known_only=known_only)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        message = _one_line(e)
        missing = _MISSING.findall(message)
        if missing:
            _exit_with_error(f"missing required flag{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        if isinstance(e, (KeyError, AttributeError)):  # ml_collections: a --config.a.b=v override, no such key
            _exit_with_error(f"bad flag: a --config override names no config field: {message}")
        _exit_with_error(f"bad flag: {message.removeprefix('flag ')}")  # absl's "flag --x=v: why"
    _check_config_files()
    return argv


def run(main: Callable[..., None], commands: tuple[str, ...] = (), pass_unknown_flags: bool = False) -> None:
    """Parses flags, then runs `main()`; a USER_ERRORS exception becomes `llama_jax: error: ...` and exit 2, as do
    usage errors (an unknown or missing flag, a value a validator refuses, a missing config file, stray arguments).

    With `commands`, exactly one positional argument, one of them, is expected and passed: `main(command)`.
    With `pass_unknown_flags`, arguments that are not this program's flags are passed on as `main(args)`
    (e.g. Apache Beam pipeline options) instead of being an error.
    """
    def wrapped(argv):
        args = argv[1:]
        if commands and (len(args) != 1 or args[0] not in commands):
            _exit_with_error(f"expected one command of {', '.join(commands)}; got {' '.join(args) or 'none'}")
        if args and not commands and not pass_unknown_flags:
            _exit_with_error(f"unexpected arguments: {' '.join(args)}")
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
            _exit_with_error(_one_line(e))

    app.run(wrapped, flags_parser=lambda argv: _parse_flags(argv, known_only=pass_unknown_flags))
