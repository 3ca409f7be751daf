"""The sweep's code path end to end at toy size: each run trained by the driver, a failed run recorded and not
fatal, finished runs skipped on restart; the multiple-choice set; and the fit entry point writing its report."""

import importlib.util
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from llama_jax.scaling import downstream, sweep
from llama_jax.stages import KINDS
from llama_jax.train import driver, stage_run

REPO = pathlib.Path(__file__).resolve().parents[2]


def _experiment():
    spec = importlib.util.spec_from_file_location("scaling_laws", REPO / "experiments" / "scaling_laws.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_toy_sweep_runs_records_skips_and_survives_a_failed_run(tmp_path):
    c = _experiment().get_config("toy,budgets=3e8")
    c.data.cache_dir = str(tmp_path / "cache")
    c.sweep.mc.n_items = 8
    bad = c.stages[1]["name"]
    c.stages[1]["model_overrides"]["n_heads"] = 3  # 3 query heads over 2 KV heads: the driver rejects it
    calls, out = [], io.StringIO()

    def train(config, workdir):
        calls.append(config.stages[0]["name"])
        assert "sweep" not in config and len(config.stages) == 1  # an ordinary one-stage experiment
        return driver.run_experiment(config, workdir, KINDS)

    records = sweep.run_sweep(c, str(tmp_path / "w"), train=train, stream=out)
    assert calls == [st["name"] for st in c.stages]
    by_name = {r["name"]: r for r in records}
    assert by_name[bad]["status"] == "failed" and "n_heads=3" in by_name[bad]["error"]
    good = [r for r in records if r["name"] != bad]
    assert len(good) == 2 and all(r["status"] == "ok" for r in good)
    for r in good:
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 6.5  # held-out NLL per token (ln 512 = 6.24)
        assert r["tokens_trained"] == r["tokens"] and r["flops"] == 3e8
        assert 0 < r["mc_nll"] and 0 <= r["mc_acc"] <= 1
        assert os.path.exists(tmp_path / "w" / "runs" / r["name"] / "stages" / r["name"] / "DONE.json")
    assert sweep.read_runs(str(tmp_path / "w")) == records
    log = out.getvalue()
    assert f"[isoflop 2/3] {bad} done" in log and "FAILED" in log and "2/3 runs finished" in log

    calls.clear()  # a restart skips the finished runs and retries the failed one
    again = sweep.run_sweep(c, str(tmp_path / "w"), train=train, stream=io.StringIO())
    assert calls == [bad] and [r for r in again if r["name"] != bad] == good


def test_multiple_choice_items_are_real_continuations(tmp_path):
    from llama_jax.data import tokenizer as tokenizer_lib
    tok_path = str(tmp_path / "tok.model")
    texts = [f"document {i}: " + " ".join(f"word{i}x{j}" for j in range(60)) for i in range(12)]
    tokenizer_lib.train_bpe(texts, 256, tok_path)
    tok = tokenizer_lib.Tokenizer.from_file(tok_path)
    items = downstream.build_items(texts + ["short"], tok, 8, 12, 6, seed=3)
    assert len(items) == 8 and {it.answer for it in items} <= set(range(4))
    for it in items:
        assert len(it.choices) == 4 and all(len(ch) == 6 for ch in it.choices)
        real = tok.decode(list(it.context) + list(it.choices[it.answer]))
        (doc,) = [t for t in texts if real in t]  # context + answer: a contiguous span of one document
        assert all(tok.decode(list(ch)) in doc for ch in it.choices)  # distractors: the same document's text
    with pytest.raises(ValueError, match="only .* passages of 18 tokens in documents of >= 72 tokens; the "
                                         "multiple-choice set needs 9999"):
        downstream.build_items(texts, tok, 9999, 12, 6)


def _synthetic_runs():
    """A sweep's records from L(N, D) = E + A/N^a + B/D^b, plus a failed run, with multiple-choice scores."""
    rng = np.random.default_rng(0)
    runs = []
    for c in [1e12, 3e12, 1e13, 3e13]:
        n_opt = 0.6 * (c / 6) ** 0.45
        for s in np.linspace(-1.2, 1.2, 5):
            n = n_opt * math.exp(s)
            d = c / (6 * n)
            loss = 1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28 + 0.002 * rng.standard_normal()
            nll = 0.4 * loss
            runs.append(dict(name=f"c{c:.0e}_{s:.1f}", status="ok", flops=c, params=n, tokens=d, loss=loss,
                             mc_nll=nll, mc_acc=0.25 + 0.75 / (1 + math.exp(5 * (nll - 1.3)))))
    runs.append(dict(name="broken", status="failed", error="boom", flops=1e13, params=1.0, tokens=1.0))
    return runs


def test_fit_entry_point_writes_report_and_plots(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    sweep.write_runs(str(workdir), _synthetic_runs())
    (workdir / "sweep.json").write_text(json.dumps({"forecast_flops": 1e15}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "llama_jax.scaling", "fit", f"--workdir={workdir}", "--bootstrap=200"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "failed (left out): broken" in p.stdout and "at 1e+15 FLOPs" in p.stdout
    report = json.loads((workdir / "fit.json").read_text())
    assert report["runs_fitted"] == 20 and len(report["minima"]) == 4
    assert report["params"]["alpha"] == pytest.approx(0.28 / 0.62, abs=0.03)
    lo, hi = report["tokens"]["interval_95"]["alpha"]
    assert lo < report["tokens"]["alpha"] < hi
    assert report["paper"]["tokens"]["forecast"] == pytest.approx(16.3e12, rel=0.005)
    assert report["downstream"]["sigmoid"]["k"] == pytest.approx(5.0, rel=1e-3)
    assert 0.25 < report["downstream"]["forecast"]["mc_acc"] < 1
    for name in ("isoflop", "power_laws", "downstream"):
        assert (workdir / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "fit.txt").read_text().splitlines()[0] == p.stdout.splitlines()[0]

    bad = subprocess.run([*cmd[:4], f"--workdir={tmp_path / 'nothing'}"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "llama_jax: error: no runs file" in bad.stderr
    wrong = subprocess.run([*cmd[:3], "plot", f"--workdir={workdir}"], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=300)
    assert wrong.returncode != 0 and "expected one command of fit; got plot" in wrong.stderr
