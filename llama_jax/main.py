"""Runs an experiment: `python -m llama_jax.main --config=experiments/NAME.py:ARG --workdir=DIR [--config.a.b=v]`.

Intentionally short: flags are parsed here and everything else happens in `llama_jax.train.driver`, so the same
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
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume a workdir although the config's "
                                         "model, data, seed or stages differ from its config.json (the "
                                         "checkpoints must still have the config's shapes).")
_START_OVER = flags.DEFINE_bool("start_over", False, "When none of a stage's checkpoints restores, move them aside "
                                "and train the stage again (otherwise the run stops and names them).")
flags.mark_flags_as_required(["config", "workdir"])
cli.nonempty(_WORKDIR)


def main():
    from llama_jax.sharding import distributed  # noqa: PLC0415
    from llama_jax.stages import KINDS  # noqa: PLC0415 - import after flags are parsed (jax reads its flags)
    from llama_jax.train import driver  # noqa: PLC0415

    if _MULTIHOST.value:
        distributed.initialize()
    cli.check_output_dir(_WORKDIR.value, "--workdir")

    if "sweep" in _CONFIG.value:  # an IsoFLOP sweep: every run is its own one-stage experiment
        from llama_jax.scaling import sweep  # noqa: PLC0415
        sweep.run_sweep(_CONFIG.value, _WORKDIR.value)
    else:
        driver.run_experiment(_CONFIG.value, _WORKDIR.value, KINDS, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                            start_over=_START_OVER.value)


if __name__ == "__main__":
    cli.run(main)
