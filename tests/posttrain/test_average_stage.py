"""Model averaging as a stage of an experiment: exact weighted means of earlier stages and of another run's
workdir, recorded in DONE.json, skipped on restart; the average's settings are checked when the config is
resolved."""
import json
import os

import jax
import numpy as np
import pytest

from llama_jax import experiment
from llama_jax import workdir as workdir_lib
from llama_jax.posttrain import data as data_lib
from llama_jax.posttrain import recipe
from llama_jax.stages import KINDS
from llama_jax.train import driver, resume, stage_run
from tests.posttrain import tiny_run


def _config(tok_path, tmp_path, stages):
    return tiny_run.config(tok_path, tmp_path, stages, max_seq_len=64)


def _params(workdir, stage):
    return [np.asarray(x) for x in jax.tree.leaves(resume.load_workdir(workdir, stage=stage)[1])]


def test_average_stage_is_the_exact_weighted_mean_and_is_skipped_on_restart(tok_path, tmp_path):
    opt = experiment.optim(1e-2, warmup_steps=1)
    pre = lambda name: experiment.stage(name, [experiment.phase(32, 8)], opt, steps=2)  # noqa: E731
    run1 = str(tmp_path / "run1")
    c1 = _config(tok_path, tmp_path, [pre("a"), pre("b"), recipe.average_stage("avg", ["stage:a", "stage:b"],
                                                                                [1, 3], seq_len=32)])
    results = driver.run_experiment(c1, run1, KINDS)
    a, b, avg = (_params(run1, s) for s in ("a", "b", "avg"))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    for x, y, got in zip(a, b, avg):  # 0.25 a + 0.75 b: float32 products and sum, within their roundings
        exact = 0.25 * x.astype(np.float64) + 0.75 * y
        assert np.all(np.abs(got - exact) <= 2 ** -23 * (0.25 * np.abs(x) + 0.75 * np.abs(y)))
        assert np.abs(got - exact).max() < np.abs(x - y).max() * 1e-3  # and far from any other mixture
    assert results["avg"]["average"] == {"sources": ["stage:a", "stage:b"], "weights": [0.25, 0.75],
                                         "steps": [2, 2]}
    steps_before = os.listdir(workdir_lib.checkpoints_dir(run1, "avg"))
    again = driver.run_experiment(c1, run1, KINDS)  # every stage finished: all skipped, nothing rewritten
    assert again == json.loads(json.dumps(results))
    assert os.listdir(workdir_lib.checkpoints_dir(run1, "avg")) == steps_before
    # another run averages run1's workdir (its last stage: avg) with a stage checkpoint directory, uniformly;
    # an average stage may be the first stage of a run
    run2 = str(tmp_path / "run2")
    c2 = _config(tok_path, tmp_path, [recipe.average_stage(
        "soup", [run1, workdir_lib.checkpoints_dir(run1, "a")], seq_len=32)])
    driver.run_experiment(c2, run2, KINDS)
    for x, y, got in zip(avg, a, _params(run2, "soup")):
        np.testing.assert_array_equal(got, np.float32(0.5) * x + np.float32(0.5) * y)


def test_average_settings_are_checked_when_resolved(tok_path, tmp_path):
    opt = experiment.optim(1e-2, warmup_steps=1)
    pre = experiment.stage("a", [experiment.phase(32, 8)], opt, steps=2)
    bad = [
        ([pre, recipe.average_stage("avg", ["stage:a", "stage:later"]), dict(pre, name="later")],
         r"stage 'avg': its options read stage 'later', which is not an earlier stage"),
        ([pre, recipe.average_stage("avg", ["stage:a"], [1, 2])], r"options.weights=\[1.0, 2.0\]: average: 2 "
                                                                   r"weights for 1 models"),
        ([pre, recipe.average_stage("avg", ["stage:a", "stage:a"], [1, -1])], r"weights must be finite, >= 0"),
        ([pre, dict(recipe.average_stage("avg", ["stage:a"]), steps=3)], r"trains nothing: give it no steps"),
        ([pre, recipe.average_stage("avg", [str(tmp_path / "nowhere")])], r"sources=.*nowhere' does not exist"),
    ]
    for stages, message in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            experiment.resolve(_config(tok_path, tmp_path, stages), KINDS)
