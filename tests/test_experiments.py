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


def test_resolve_gives_typed_stages_with_the_paper_schedule_length():
    (stage,) = E.resolve(_load("pretrain").get_config("llama3.1-405b"))
    assert stage.kind == "pretrain" and stage.model.n_layers == 126
    assert stage.schedule_steps == 1_200_000 > stage.total_steps  # ~1.1M steps of data, 1.2M-step schedule
    assert [(p.seq_len, p.global_batch) for p in stage.phases] == [(4096, 1024), (8192, 1024), (8192, 2048)]
    (tiny,) = E.resolve(_load("pretrain").get_config("tiny"))
    assert tiny.schedule_steps == tiny.total_steps == 300 and tiny.init_source == "scratch"


def test_unknown_stage_key_and_unused_knob_are_named():
    c = _load("pretrain").get_config("tiny")
    c.stages[0]["lenght"] = 3
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['lenght'\\]"):
        E.resolve(c)
    with pytest.raises(ValueError, match="does not use config argument\\(s\\) \\['steps'\\]"):
        _load("pretrain").get_config("llama3.1-8b,steps=10")


def test_loss_chunk_defaults_to_the_platform_choice():
    from llama_jax.train import loss as loss_lib
    (tiny,) = E.resolve(_load("pretrain").get_config("tiny"))
    assert tiny.loss_chunk == loss_lib.resolve_chunk(-1) == 128  # CPU: the fused chunked loss
    assert loss_lib.resolve_chunk(-1, "gpu") == 0 and loss_lib.resolve_chunk(0, "cpu") == 0
    assert loss_lib.resolve_chunk(512, "cpu") == 512
    c = _load("pretrain").get_config("tiny")
    c.stages[0]["loss_chunk"] = -2
    with pytest.raises(ValueError, match="loss_chunk=-2"):
        E.resolve(c)


def test_herd_task_size_knobs(tmp_path):
    """`prompts=` and `heldout=` size the rejection-sampling and held-out sets; the defaults stay 120 and 100."""
    herd = _load("herd")

    def lines(path):
        with open(path) as f:
            return len(f.read().splitlines())

    small = herd.get_config(f"cpu,prompts=32,heldout=64,task_dir={tmp_path / 'small'}")
    E.validate(small)
    assert lines(tmp_path / "small" / "prompts.jsonl") == 32 and lines(tmp_path / "small" / "heldout.jsonl") == 64
    herd.get_config(f"cpu,task_dir={tmp_path / 'default'}")
    assert lines(tmp_path / "default" / "prompts.jsonl") == 120 and lines(tmp_path / "default" / "heldout.jsonl") == 100
    with pytest.raises(ValueError, match="120 \\+ 240 \\+ 100 problems requested but only 400 distinct pairs"):
        herd.get_config(f"cpu,prompts=240,heldout=100,task_dir={tmp_path / 'big'}")
