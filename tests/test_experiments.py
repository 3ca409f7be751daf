"""Every experiment variant builds, validates, and carries the paper's numbers."""

import importlib.util
import pathlib

import pytest

from llama_jax import experiment as E

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("variant", ["tiny", "tiny,stages=2", "llama3.2-1b", "llama3.1-8b", "llama3.1-70b",
                                     "llama3.1-405b"])
def test_pretrain_variants_validate(variant):
    c = _load("pretrain").get_config(variant)
    E.validate(c)
    for st in c.stages:
        total, phases = E.stage_steps(st)
        assert total > 0 and phases[0][0] == 0


@pytest.mark.parametrize("variant,lr", [("llama3.1-8b", 3e-4), ("llama3.1-70b", 1.5e-4), ("llama3.1-405b", 8e-5)])
def test_paper_recipe(variant, lr):
    c = _load("pretrain").get_config(variant)
    (st,) = c.stages
    assert st["optim"]["peak_lr"] == lr and st["optim"]["warmup_steps"] == 8000
    assert st["optim"]["final_lr_ratio"] == pytest.approx(8e-7 / 8e-5)
    assert [(p["seq_len"], p["seq_len"] * p["global_batch"]) for p in st["phases"]] == [
        (4096, 4096 * 1024), (8192, 8192 * 1024), (8192, 8192 * 2048)]  # 4M -> 8M -> 16M tokens per step
    assert st["tokens"] == int(15.6e12)


def test_unknown_variant_and_knob_are_named():
    mod = _load("pretrain")
    with pytest.raises(ValueError, match="unknown variant 'llama9'"):
        mod.get_config("llama9")
    with pytest.raises(ValueError, match="unknown config argument 'stepz'"):
        mod.get_config("tiny,stepz=3")
