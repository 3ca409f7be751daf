"""Runs an experiment: `python -m llama_jax.main --config=experiments/NAME.py:ARG --workdir=DIR [--config.a.b=v]`.

Intentionally short: flags are parsed here and everything else happens in `llama_jax.train.loop`, so the same
logic is importable from tests and notebooks.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/NAME.py:ARG).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for configuration/data errors.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of checkpointing internals (every rename and thread hand-off); keeps warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from llama_jax.train import loop  # noqa: PLC0415 - import after flags are parsed (jax reads its flags)

    try:
        loop.run_experiment(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if _TRACEBACK.value:
            raise
        logging.flush()
        print(f"llama_jax: error: {e}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv):
    """absl flag parsing, with config-override mistakes (unknown key, wrong type) reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        msg = e
        while isinstance(msg, BaseException) and msg.args:
            msg = msg.args[0]
        lines = [line.strip() for line in str(msg).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # a config file raised: keep its last line
            lines = [lines[0].split(": Error whilst")[0] + ":", lines[-1]]
        print(f"llama_jax: error: bad flag: {' '.join(lines)}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
