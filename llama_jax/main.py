"""Runs an experiment: `python -m llama_jax.main --config=experiments/NAME.py:ARG --workdir=DIR [--config.a.b=v]`.

Intentionally short: flags are parsed here and everything else happens in `llama_jax.train.loop`, so the same
logic is importable from tests and notebooks.
"""

from absl import flags
from ml_collections import config_flags

from llama_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/NAME.py:ARG).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (one process per "
                               "host under SLURM, TPU VMs or Kubernetes; see llama_jax/sharding/distributed.py and "
                               "launch/).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
    from llama_jax.sharding import distributed  # noqa: PLC0415
    from llama_jax.train import loop  # noqa: PLC0415 - import after flags are parsed (jax reads its flags)

    if _MULTIHOST.value:
        distributed.initialize()

    loop.run_experiment(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
