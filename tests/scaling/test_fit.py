"""Scaling-law fits against known answers: exact parabolas, a parametric L(N, D) law, the paper's constants."""

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from llama_jax.scaling import fit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Chinchilla's fitted law (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^a + B / D^b.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def _chinchilla_runs(budgets, spread=1.2, n=9, noise=0.0, seed=0):
    """Runs on each IsoFLOP curve C = 6 N D around the analytic optimum, losses from the law (+ noise)."""
    rng = np.random.default_rng(seed)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    runs = []
    for c in budgets:
        n_opt = g * (c / 6) ** (BETA / (ALPHA + BETA))
        for s in np.linspace(-spread, spread, n):
            n_params = n_opt * math.exp(s)
            tokens = c / (6 * n_params)
            loss = E + A / n_params ** ALPHA + B / tokens ** BETA + noise * rng.standard_normal()
            runs.append(dict(flops=c, params=n_params, tokens=tokens, loss=loss))
    return runs, g


def test_quadratic_minima_are_exact_on_noiseless_data():
    runs, truth = [], []
    for c, u_star, l0, curv in [(1e18, 20.0, 3.1, 0.05), (1e19, 21.3, 2.8, 0.08), (1e20, 22.1, 2.5, 0.02)]:
        truth.append(dict(flops=c, tokens=math.exp(u_star), params=c / (6 * math.exp(u_star)), loss=l0))
        for u in u_star + np.array([-1.7, -0.9, -0.2, 0.4, 1.3]):
            runs.append(dict(flops=c, tokens=math.exp(u), params=c / (6 * math.exp(u)),
                             loss=l0 + curv * (u - u_star) ** 2))
    got = fit.isoflop_minima(reversed(runs))  # any order in, sorted by flops out
    assert [set(m) for m in got] == [{"flops", "tokens", "params", "loss"}] * 3
    for m, t in zip(got, truth):
        for k in t:
            assert m[k] == pytest.approx(t[k], rel=1e-9), (k, m, t)


def test_parametric_law_gives_back_the_compute_optimal_exponents_and_minima():
    budgets = np.logspace(18, 22, 9)
    runs, g = _chinchilla_runs(budgets, noise=0.003)
    minima = fit.isoflop_minima(runs)
    assert [m["flops"] for m in minima] == pytest.approx(list(budgets))
    _, alpha_n = fit.power_law([m["flops"] for m in minima], [m["params"] for m in minima])
    _, alpha_d = fit.power_law([m["flops"] for m in minima], [m["tokens"] for m in minima])
    assert alpha_n == pytest.approx(BETA / (ALPHA + BETA), abs=0.01)  # 0.4516
    assert alpha_d == pytest.approx(ALPHA / (ALPHA + BETA), abs=0.01)  # 0.5484
    for m in minima:  # each budget's minimum is the analytic optimum, to within a few percent
        n_opt = g * (m["flops"] / 6) ** (BETA / (ALPHA + BETA))
        d_opt = m["flops"] / (6 * n_opt)
        assert m["params"] == pytest.approx(n_opt, rel=0.06)
        assert m["tokens"] == pytest.approx(d_opt, rel=0.06)
        assert m["loss"] == pytest.approx(E + A / n_opt ** ALPHA + B / d_opt ** BETA, abs=0.005)
    iv = fit.isoflop_bootstrap(runs, n=200, seed=1, targets=[1e24])
    lo, hi = iv["params"]["alpha"]
    assert lo < BETA / (ALPHA + BETA) < hi and hi - lo < 0.05
    assert iv["forecast_tokens"][1e24][0] < iv["forecast_tokens"][1e24][1]


def test_the_paper_constants_forecast_16_3t_tokens_at_3_8e25():
    assert fit.forecast(0.299, 0.537, 3.8e25) == pytest.approx(16.3e12, rel=0.005)
    assert fit.forecast(0.29, 0.53, 3.8e25) == pytest.approx(10.5e12, rel=0.01)  # the rounded pair does not
    flops = np.array([6e18, 1e19, 3e19, 1e20, 1e21, 1e22])
    a, alpha = fit.power_law(flops, 0.299 * flops ** 0.537)
    assert (a, alpha) == (pytest.approx(0.299, rel=1e-9), pytest.approx(0.537, rel=1e-12))


def test_power_law_bootstrap_intervals():
    rng = np.random.default_rng(0)
    flops = np.logspace(18, 22, 10)
    values = 0.3 * flops ** 0.5 * np.exp(0.05 * rng.standard_normal(10))
    a, alpha = fit.power_law(flops, values)
    iv = fit.power_law_bootstrap(flops, values, n=500)
    assert iv["alpha"][0] < alpha < iv["alpha"][1] and iv["alpha"][0] < 0.5 < iv["alpha"][1]
    assert iv["A"][0] < a < iv["A"][1]
    exact = fit.power_law_bootstrap(flops, 2.0 * flops ** 0.25, n=50)
    assert exact["alpha"] == pytest.approx((0.25, 0.25)) and exact["A"] == pytest.approx((2.0, 2.0))
    with pytest.raises(ValueError, match="2 distinct compute budgets"):
        fit.power_law([1e20, 1e20], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite and positive"):
        fit.power_law([1e20, 1e21], [1.0, -2.0])


def test_degenerate_budgets_are_reported_by_budget_and_left_out():
    runs, _ = _chinchilla_runs([1e19, 1e20, 1e21], n=5)
    runs = [r for r in runs if r["flops"] < 1e21] + [r for r in runs if r["flops"] == 1e21][:2]
    runs += [dict(flops=3e21, tokens=t, params=3e21 / (6 * t), loss=3.0 - 0.1 * (math.log(t) - 25) ** 2)
             for t in np.exp([24.0, 25.0, 26.0])]  # opens downward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        minima = fit.isoflop_minima(runs)
    messages = " | ".join(str(w.message) for w in caught)
    assert [m["flops"] for m in minima] == [1e19, 1e20]
    assert "budget 1e+21 FLOPs: 2 distinct token counts" in messages
    assert "budget 3e+21 FLOPs: the parabola of loss in ln(tokens) opens downward" in messages
    with pytest.raises(ValueError, match="every budget is degenerate.*budget 3e\\+21"):
        fit.isoflop_minima([r for r in runs if r["flops"] == 3e21])
    with pytest.raises(ValueError, match="lacks \\['loss'\\]"):
        fit.isoflop_minima([dict(flops=1.0, params=1.0, tokens=1.0)])


def test_two_step_downstream_forecast():
    # Step 1: a line in log10(C). Step 2: the sigmoid from NLL to accuracy, recovered from exact points.
    slope, icpt = fit.linear_fit([18, 19, 20, 21], [1.9, 1.7, 1.5, 1.3])
    assert (slope, icpt) == (pytest.approx(-0.2), pytest.approx(5.5))
    nll = np.linspace(0.6, 2.4, 15)
    acc = fit.sigmoid(nll, 4.0, 1.5)
    assert acc[0] > 0.95 and acc[-1] < 0.3 and fit.sigmoid(1.5, 4.0, 1.5) == pytest.approx(0.625)
    k, x0 = fit.sigmoid_fit(nll, acc)
    assert (k, x0) == (pytest.approx(4.0, rel=1e-4), pytest.approx(1.5, rel=1e-4))
    # The compute-optimal NLL of each budget: its quadratic in ln(tokens) at the loss minimum's tokens.
    runs = [dict(flops=1e20, tokens=t, params=1.0, loss=0.0, mc_nll=1.0 + (math.log(t) - 20) ** 2)
            for t in np.exp([19.0, 20.0, 21.5])]
    (p,) = fit.downstream_points(runs, [dict(flops=1e20, tokens=math.exp(20.5), params=1.0, loss=0.0)])
    assert p["mc_nll"] == pytest.approx(1.25)


def test_fit_command_names_the_file_and_line_of_a_bad_record(tmp_path):
    good = json.dumps(dict(name="a", flops=1e18, params=1e6, tokens=1.7e11, loss=3.0, status="ok"))
    failed = json.dumps(dict(name="b", status="failed", error="boom"))  # failed runs need no numbers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    runs = tmp_path / "runs.jsonl"
    for lines, want in [
        ([good, "", "garbage {"], "line 3: not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        ([good, failed, "[1, 2]"], "line 3: expected a JSON object, got list"),
        ([failed, json.dumps(dict(name="c", flops=1e18, params="1e6", tokens=1.0))],
         "line 2: run 'c' needs a number for each of ['params', 'loss']"),
    ]:
        runs.write_text("\n".join(lines) + "\n")
        p = subprocess.run([sys.executable, "-m", "llama_jax.scaling", "fit", f"--workdir={tmp_path}"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert p.stderr.strip().splitlines() == [f"llama_jax: error: {runs}, {want}"], p.stderr
    runs.write_bytes(good.encode() + b"\n\xff\n")  # not UTF-8
    p = subprocess.run([sys.executable, "-m", "llama_jax.scaling", "fit", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 2 and f"llama_jax: error: {runs}, line 2: not valid JSON" in p.stderr, p.stderr
    runs.write_text(good + "\n")
    (tmp_path / "sweep.json").write_text("{")
    p = subprocess.run([sys.executable, "-m", "llama_jax.scaling", "fit", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 2 and f"llama_jax: error: {tmp_path / 'sweep.json'}: not valid JSON" in p.stderr, p.stderr
