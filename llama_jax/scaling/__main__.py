"""Scaling-law fits: `python -m llama_jax.scaling fit --workdir=DIR [--forecast_flops=C] [--bootstrap=N]
[--anchors=FILE]`.

Re-fits the runs recorded in DIR/runs.jsonl (written by the sweep, `python -m llama_jax.main
--config=experiments/scaling_laws.py:cpu --workdir=DIR`) and writes DIR/fit.json, DIR/fit.txt and DIR/plots/*.png.
`--anchors` adds models beyond the sweep to the sigmoid from NLL to accuracy (`report.read_anchors`: a CSV of
flops,nll,accuracy rows).
"""

import math

from absl import flags

from llama_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's workdir (holding runs.jsonl).")
_FORECAST = flags.DEFINE_float("forecast_flops", 0.0, "Compute budget to forecast at (default: the sweep's "
                               "forecast_flops from sweep.json, else the paper's 3.8e25).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the intervals (0: none).")
_ANCHORS = flags.DEFINE_string("anchors", "", "CSV of models beyond the sweep (header flops,nll,accuracy[,name]; "
                               "NLL and accuracy on the sweep's multiple-choice set) added to the sigmoid fit from "
                               "NLL to accuracy, as the paper adds Llama 2 models.")
flags.mark_flags_as_required(["workdir"])
cli.nonempty(_WORKDIR)
cli.validate(_FORECAST, lambda c: 0 <= c < math.inf, ">= 0 (0 = the sweep's forecast_flops)")
cli.validate(_BOOTSTRAP, lambda n: n >= 0, ">= 0 (0 = no intervals)")


def main(command: str):
    from llama_jax.scaling import report  # noqa: PLC0415

    assert command == "fit"
    result = report.fit_workdir(_WORKDIR.value, forecast_flops=_FORECAST.value, bootstrap=_BOOTSTRAP.value,
                                anchors=_ANCHORS.value)
    print(report.summary(result))
    print(f"wrote {_WORKDIR.value}/fit.json, fit.txt and plots/")


if __name__ == "__main__":
    cli.run(main, commands=("fit",))
