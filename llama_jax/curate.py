"""Curates raw documents on Apache Beam: `python -m llama_jax.curate --input=GLOB --output=DIR [--stages=a,b]
[--config=FILE] [--config.near_dedup.threshold=0.7] [--overwrite] [Beam options: --runner, --direct_num_workers,
--direct_running_mode, ...]`.

Writes `DIR/part-*.array_record` (JSON records with `text`, read by the training pipeline as an `array_record`
source with `text_key="text"`), `DIR/stats.json` and `DIR/stats.png`. Logic: `llama_jax.data.curation`.
"""

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from llama_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "data", "curation", "config.py")
_INPUT = flags.DEFINE_string("input", None, "Input jsonl files: a glob (any Beam filesystem).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not hold results unless --overwrite).")
_STAGES = flags.DEFINE_string("stages", None, "Comma-separated stages to run (default: the config's, all of "
                              "extract,language,url_dedup,exact_dedup,near_dedup,line_dedup,heuristics,quality,pii).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an output directory that already holds results.")
try:  # the default config file is loaded here, with any --config.x=y overrides from the command line
    _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Curation config file (thresholds).",
                                              lock_config=True)
except (AttributeError, KeyError) as e:
    print(f"llama_jax: error: bad flag: --config override names no config field: {cli._one_line(e)}",
          file=sys.stderr)
    sys.exit(2)
except (TypeError, ValueError) as e:
    print(f"llama_jax: error: bad flag: --config override: {cli._one_line(e)}", file=sys.stderr)
    sys.exit(2)
flags.mark_flags_as_required(["input", "output"])


def main(pipeline_args):
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # Beam's INFO chatter (imports, workers)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # importing Beam warns about optional GCP client libraries
    try:
        from llama_jax.data import curation  # noqa: PLC0415
        from llama_jax.data.curation import pipeline  # noqa: F401, PLC0415
        from llama_jax.data.curation import stats as curation_stats  # noqa: PLC0415
    finally:
        root.setLevel(level)

    stats = curation.run(_INPUT.value, _OUTPUT.value, _CONFIG.value, stages=_STAGES.value,
                         pipeline_args=pipeline_args, overwrite=_OVERWRITE.value)
    warning = curation_stats.bad_input_warning(stats)
    if warning:
        print(f"llama_jax: warning: {warning}", file=sys.stderr)
    print(f"curate: {stats['input']['docs']} documents in, {stats['output']['docs']} out "
          f"({stats['output']['tokens']} {stats['token_unit']}) -> {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main, pass_unknown_flags=True)
