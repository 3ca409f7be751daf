"""Sweep planning: budgets spent, the shape rule, the paper's run settings, and the experiment variants."""

import importlib.util
import math
import pathlib

import pytest

from llama_jax import experiment as E
from llama_jax.stages import KINDS
from llama_jax.scaling import isoflop

REPO = pathlib.Path(__file__).resolve().parents[2]


def _experiment():
    spec = importlib.util.spec_from_file_location("scaling_laws", REPO / "experiments" / "scaling_laws.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("variant", ["cpu", "paper", "toy"])
def test_planner_spends_each_budget_and_every_run_is_a_pretrain_stage(variant):
    c = _experiment().get_config(variant)
    E.resolve(c, KINDS)
    runs = {r["name"]: r for r in c.sweep.runs}
    assert [st["name"] for st in c.stages] == list(runs)
    per_budget = {}
    for st in c.stages:
        r = runs[st["name"]]
        per_budget.setdefault(r["flops"], []).append(r)
        assert st["kind"] == "pretrain"
        total, [(_, seq_len, batch)] = E.stage_steps(st)
        assert total == r["steps"] and r["tokens"] == total * seq_len * batch
        cfg = E.resolve_model(c, st)
        # the project's FLOPs accounting, independently: C = steps x batch x seq_len x flops_per_token
        spent = r["tokens"] * cfg.flops_per_token(seq_len)
        assert spent == pytest.approx(r["flops_spent"], rel=1e-12)
        assert spent == pytest.approx(6 * r["params"] * r["tokens"], rel=1e-12)
        assert abs(spent / r["flops"] - 1) < (0.05 if variant != "toy" else 0.2)  # toy: 3-step runs
        assert cfg.param_count() == r["param_count"]
        assert cfg.n_layers == max(1, math.floor(cfg.dim / (128 if variant == "paper" else 32) + 0.5))
        assert cfg.n_kv_heads == math.gcd(cfg.n_heads, 8 if variant == "paper" else 2)
        o = st["optim"]
        assert o["decay"] == "cosine" and o["final_lr_ratio"] == 0.1 and o["weight_decay"] == 0.1
    for budget, group in per_budget.items():
        assert len(group) >= 3, budget
        assert len({r["global_batch"] for r in group}) == 1  # a fixed batch per budget
        assert len({r["dim"] for r in group}) == len(group)


def test_paper_grid_and_run_settings():
    c = _experiment().get_config("paper")
    budgets = sorted({r["flops"] for r in c.sweep.runs})
    assert budgets == [6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21, 1e22]
    batch_tokens = {r["flops"]: r["global_batch"] * r["seq_len"] for r in c.sweep.runs}
    assert batch_tokens[6e18] == 32 * 8192 and batch_tokens[1e22] == 512 * 8192  # 262K -> 4.2M tokens
    assert all(st["optim"]["warmup_steps"] == 2000 for st in c.stages)
    assert all(2e-4 <= st["optim"]["peak_lr"] <= 4e-4 for st in c.stages)
    params = [r["param_count"] for r in c.sweep.runs]
    assert 4e7 < min(params) < 1.2e8 and 1.2e10 < max(params) < 2.5e10  # the paper: 40M to 16B
    assert c.sweep.forecast_flops == 3.8e25


def test_single_run_and_bad_input_are_named():
    mod = _experiment()
    one = mod.get_config("cpu,run=c3e12_d64")
    assert [st["name"] for st in one.stages] == ["c3e12_d64"] and len(one.sweep.runs) == 1
    with pytest.raises(ValueError, match="unknown run 'c3e12_d65'"):
        mod.get_config("cpu,run=c3e12_d65")
    with pytest.raises(ValueError, match="budget 1e\\+09 FLOPs: only 0 ladder shapes"):
        mod.get_config("cpu,budgets=1e9/1e12")
    with pytest.raises(ValueError, match="unknown variant 'gpu'"):
        mod.get_config("gpu")
    with pytest.raises(ValueError, match="not a positive multiple of head_dim 16"):
        isoflop.ShapeRule().overrides(40)
