"""Held-out intervals and paired tests (`posttrain.significance`) against hand-computed values, their error
rates on simulated data, and the report of a run's score files."""

import json
import os

import numpy as np
import pytest

from llama_jax import workdir as workdir_lib
from llama_jax.posttrain import significance as sig


def test_wilson_interval_matches_hand_computed_values():
    # 8 / 10: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71675, half-width 0.22658 (z = 1.95996)
    lo, hi = sig.wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94333, abs=1e-4)
    lo, hi = sig.wilson_interval(0, 20)  # never below 0; upper z^2 / (n + z^2) = 0.16113
    assert lo == 0.0 and hi == pytest.approx(0.16113, abs=1e-4)
    with pytest.raises(ValueError, match="at least one trial"):
        sig.wilson_interval(0, 0)


def test_mcnemar_exact_matches_the_binomial_tail():
    before = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 58, float)
    after = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 58, float)
    t = sig.mcnemar_exact(before, after)
    # 12 discordant prompts, 10 won: p = 2 (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096
    assert (t["won"], t["lost"]) == (10, 2) and t["p"] == pytest.approx(158 / 4096, rel=1e-12)
    assert sig.mcnemar_exact(before, before)["p"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        sig.mcnemar_exact(before, after[:-1])


def test_interval_coverage_and_test_size_on_simulated_models():
    rng = np.random.default_rng(0)
    # coverage of the 95% interval for accuracy 0.3 on 1,000 prompts, 2,000 simulated evaluations
    hits = rng.binomial(1000, 0.3, size=2000)
    covered = np.mean([lo <= 0.3 <= hi for lo, hi in (sig.wilson_interval(k, 1000) for k in hits)])
    assert 0.935 <= covered <= 0.965, covered
    # two models of the same accuracy that disagree on 20% of prompts: the exact test rejects at most ~5%
    p_null, p_alt = [], []
    for _ in range(400):
        base = rng.random(1000) < 0.5
        flip = rng.random(1000) < 0.2
        p_null.append(sig.mcnemar_exact(base, np.where(flip, ~base, base))["p"])
        # a model that fixes 4% more of the prompts: found nearly always on 1,000 prompts
        better = base | (rng.random(1000) < 0.08)
        p_alt.append(sig.mcnemar_exact(base, better)["p"])
    assert np.mean(np.array(p_null) < 0.05) <= 0.06
    assert np.mean(np.array(p_alt) < 0.05) >= 0.95


def _write(workdir, stage, name, scores, compared_with=()):
    path = workdir_lib.stage_output_path(workdir, stage, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(stage=stage, compared_with=list(compared_with), scores=list(map(float, scores))), f)


def test_report_pairs_each_stage_with_its_start_and_sources(tmp_path):
    workdir = str(tmp_path)
    with open(workdir_lib.config_path(workdir), "w") as f:
        json.dump({"stages": [{"name": n} for n in ("pretrain", "sft", "rs", "dpo", "avg")]}, f)
    pre = np.zeros(50)
    sft = np.r_[np.ones(20), np.zeros(30)]
    dpo = np.r_[np.ones(25), np.zeros(25)]
    _write(workdir, "sft", sig.START_SCORES, pre)
    _write(workdir, "sft", sig.TASK_SCORES, sft)
    _write(workdir, "rs", sig.TASK_SCORES, sft, ["sft"])
    _write(workdir, "dpo", sig.TASK_SCORES, dpo, ["rs", "pretrain"])  # pretrain has no scores: left out
    _write(workdir, "avg", sig.TASK_SCORES, dpo, ["dpo", "sft"])
    rows = {r["model"]: r for r in sig.report(workdir)}
    assert list(rows) == ["sft:start", "sft", "rs", "dpo", "avg"]
    (t,) = rows["sft"]["paired"]
    assert t["against"] == "sft:start" and (t["won"], t["lost"]) == (20, 0) and t["p"] == pytest.approx(2 / 2 ** 20)
    assert rows["rs"]["paired"][0]["p"] == 1.0  # rejection sampling trains nothing: the same model
    (t,) = rows["dpo"]["paired"]
    assert t["against"] == "rs" and t["delta"] == pytest.approx(0.1) and t["p"] == pytest.approx(2 / 2 ** 5)
    assert [t["against"] for t in rows["avg"]["paired"]] == ["dpo", "sft"]
    assert rows["sft"]["ci95"] == list(sig.wilson_interval(20, 50))
    assert "| dpo | 50 | 0.500 [" in sig.format_table(sig.report(workdir))
