"""Every experiment variant builds, validates, and carries the paper's numbers."""

import importlib.util
import os
import pathlib

import pytest

from llama_jax import experiment as E
from llama_jax.stages import KINDS

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
    E.resolve(c, KINDS)
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
    (stage,) = E.resolve(_load("pretrain").get_config("llama3.1-405b"), KINDS)
    assert stage.kind == "pretrain" and stage.model.n_layers == 126
    assert stage.schedule_steps == 1_200_000 > stage.total_steps  # ~1.1M steps of data, 1.2M-step schedule
    assert [(p.seq_len, p.global_batch) for p in stage.phases] == [(4096, 1024), (8192, 1024), (8192, 2048)]
    (tiny,) = E.resolve(_load("pretrain").get_config("tiny"), KINDS)
    assert tiny.schedule_steps == tiny.total_steps == 300 and tiny.init_source == "scratch"


def test_unknown_stage_key_and_unused_knob_are_named():
    c = _load("pretrain").get_config("tiny")
    c.stages[0]["lenght"] = 3
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['lenght'\\]"):
        E.resolve(c, KINDS)
    with pytest.raises(ValueError, match="does not use config argument\\(s\\) \\['steps'\\]"):
        _load("pretrain").get_config("llama3.1-8b,steps=10")


def test_loss_chunk_defaults_to_the_platform_choice():
    from llama_jax.train import loss as loss_lib
    (tiny,) = E.resolve(_load("pretrain").get_config("tiny"), KINDS)
    assert tiny.loss_chunk == loss_lib.resolve_chunk(-1) == 128  # CPU: the fused chunked loss
    assert loss_lib.resolve_chunk(-1, "gpu") == 512 and loss_lib.resolve_chunk(-1, "tpu") == 0 and loss_lib.resolve_chunk(0, "cpu") == 0
    assert loss_lib.resolve_chunk(512, "cpu") == 512
    c = _load("pretrain").get_config("tiny")
    c.stages[0]["loss_chunk"] = -2
    with pytest.raises(ValueError, match="loss_chunk=-2"):
        E.resolve(c, KINDS)


def test_herd_task_size_knobs(tmp_path):
    """`prompts=` and `heldout=` size the rejection-sampling and held-out sets (defaults 400 and 1,000, operands
    below `max_operand=40`)."""
    herd = _load("herd")

    def lines(path):
        with open(path) as f:
            return len(f.read().splitlines())

    def task_files(config):
        directory = os.path.dirname(config.data.sources[0]["path"])
        return os.path.join(directory, "prompts.jsonl"), os.path.join(directory, "heldout.jsonl")

    small = herd.get_config(f"cpu,prompts=32,heldout=64,task_dir={tmp_path}")
    default = herd.get_config(f"cpu,task_dir={tmp_path}")
    assert list(tmp_path.iterdir()) == []  # loading a config writes nothing; the run writes the task (prepare)
    E.prepare(small)
    E.resolve(small, KINDS)
    prompts, heldout = task_files(small)
    assert lines(prompts) == 32 and lines(heldout) == 64
    E.prepare(default)
    prompts, heldout = task_files(default)
    assert lines(prompts) == 400 and lines(heldout) == 1000
    assert [lines(p) for p in task_files(small)] == [32, 64]  # another size never rewrites a task's files
    with pytest.raises(ValueError, match="120 \\+ 240 \\+ 100 problems requested but only 400 distinct pairs"):
        herd.get_config(f"cpu,prompts=240,heldout=100,max_operand=20,task_dir={tmp_path / 'big'}")


def _tiny_workdir(path, stage="pretrain"):
    """A directory laid out as a workdir with a stage checkpoint folder (resolving only reads the layout)."""
    (path / "stages" / stage / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text('{"stages": [{"name": "%s"}]}' % stage)
    return str(path)


def test_herd_and_posttrain_cpu_variants_resolve(tmp_path):
    task = f"task_dir={tmp_path / 'task'}"
    # the default: DPO on on-policy rejection-sampled pairs at LR 1e-4, NLL 1.0 (choices measured by a sweep)
    default_config = _load("herd").get_config(f"cpu,{task}")
    E.prepare(default_config)
    default = {s.name: s for s in E.resolve(default_config, KINDS)}
    assert list(default) == ["pretrain", "sft", "rs_r1", "sft_r1", "pairs_r1", "dpo_r1", "dpo_r1_2", "avg_r1"]
    assert default["pairs_r1"].init_source == "previous:sft_r1"
    for name in ("dpo_r1", "dpo_r1_2"):
        d = default[name]
        assert d.optim.peak_lr == 1e-4 and d.total_steps == 200 and d.options.nll_coef == 1.0 and d.options.beta == 0.1
        assert d.options.preferences == (E.StageRef("pairs_r1", "preferences.jsonl"),)
    # the paper's data flow and DPO settings, one knob each
    herd_config = _load("herd").get_config(f"cpu,pairs=annotations,dpo_lr=1e-5,dpo_nll=0.2,dpo_steps=40,{task}")
    E.prepare(herd_config)
    herd = E.resolve(herd_config, KINDS)
    names = [s.name for s in herd]
    assert names == ["pretrain", "sft", "ann_r1", "rs_r1", "sft_r1", "dpo_r1", "dpo_r1_2", "avg_r1"]
    by_name = {s.name: s for s in herd}
    dpo = by_name["dpo_r1"]
    assert dpo.optim.peak_lr == 1e-5 and dpo.options.beta == 0.1 and dpo.options.nll_coef == 0.2
    avg = by_name["avg_r1"]
    assert avg.kind == "average" and [str(x) for x in avg.options.sources] == ["stage:dpo_r1", "stage:dpo_r1_2"]
    # the paper's starting points and data: SFT fine-tunes the pre-trained model, DPO reads the annotations
    assert by_name["sft_r1"].init_source == "previous:pretrain"
    assert dpo.init_source == "previous:sft_r1"
    assert dpo.options.preferences == (E.StageRef("ann_r1", "preferences.jsonl"),)
    assert dpo.options.strengths == ("significantly better", "better")
    assert by_name["ann_r1"].init_source == by_name["rs_r1"].init_source == "previous:sft"
    run = _tiny_workdir(tmp_path / "herd_run")
    post = E.resolve(_load("posttrain").get_config(f"cpu,init={run},rounds=2,rm=1,{task}"), KINDS)
    names = [s.name for s in post]
    assert names[:9] == ["sft", "ann_r1", "rm_r1", "rs_r1", "sft_r1", "dpo_r1", "dpo_r1_2", "avg_r1", "ann_r2"]
    first = post[0]
    pretrained = f"init_from:{run}/stages/pretrain/checkpoints"
    assert first.init_source == pretrained
    by_name = {s.name: s for s in post}
    # round 2's data comes from round 1's models; its reward model and SFT start from the pretrained model
    assert by_name["rs_r2"].init_source == by_name["ann_r2"].init_source == "previous:avg_r1"
    assert by_name["ann_r2"].options.models == (E.StageRef("dpo_r1"), E.StageRef("dpo_r1_2"))
    assert by_name["rm_r2"].init_source == by_name["sft_r2"].init_source == pretrained
    assert by_name["rs_r2"].options.reward_model == E.StageRef("rm_r2")
    # the reward model reads every annotation batch so far, DPO only the latest
    batch = lambda r: E.StageRef(f"ann_r{r}", "preferences.jsonl")  # noqa: E731
    assert by_name["rm_r2"].options.preferences == (batch(1), batch(2))
    assert by_name["dpo_r2"].options.preferences == (batch(2),)
    # the choices that are not the paper's
    chosen = {s.name: s for s in E.resolve(_load("posttrain").get_config(
        f"cpu,init={run},rounds=2,rm=1,sft_from=policy,rm_from=policy,pairs=rejection,{task}"), KINDS)}
    assert chosen["sft_r2"].init_source == chosen["rm_r2"].init_source == "previous:avg_r1"
    assert chosen["dpo_r2"].options.preferences == (E.StageRef("pairs_r2", "preferences.jsonl"),)
    assert chosen["pairs_r2"].init_source == "previous:sft_r2"
    assert "ann_r2" in chosen  # the reward model still reads annotations
    sweep = E.resolve(_load("posttrain").get_config(f"dpo_sweep,init={_tiny_workdir(tmp_path / 'h2', 'sft_r1')},"
                                                      f"{task}"), KINDS)
    assert [s.optim.peak_lr for s in sweep[1:]] == [1e-4, 3e-5, 1e-5, 1e-5, 1e-4]
    assert {s.init_source for s in sweep[1:]} == {"previous:pairs"}
    with pytest.raises(ValueError, match="needs init="):
        _load("posttrain").get_config(f"cpu,{task}")
    with pytest.raises(FileNotFoundError, match="no checkpoints of stage 'sft'"):
        E.resolve(_load("posttrain").get_config(f"cpu,init={run},init_stage=sft,{task}"), KINDS)


def test_herd_without_annotations_is_the_rejection_sampling_recipe(tmp_path):
    """`sft_from=policy,pairs=rejection` (choices, not the paper's) give back the rounds without annotations."""
    config = _load("herd").get_config(f"cpu,sft_from=policy,pairs=rejection,task_dir={tmp_path}")
    E.prepare(config)
    by_name = {s.name: s for s in E.resolve(config, KINDS)}
    assert list(by_name) == ["pretrain", "sft", "rs_r1", "sft_r1", "pairs_r1", "dpo_r1", "dpo_r1_2", "avg_r1"]
    assert by_name["sft_r1"].init_source == "previous:sft" and by_name["sft_r1"].optim.peak_lr == 3e-4
    assert by_name["dpo_r1"].options.preferences == (E.StageRef("pairs_r1", "preferences.jsonl"),)
    with pytest.raises(ValueError, match="dpo_pairs='best'; expected one of"):
        _load("herd").get_config(f"cpu,pairs=best,task_dir={tmp_path}")


def test_posttrain_paper_variant_resolves_with_the_papers_settings(tmp_path):
    files = {}
    for name, line in (("sft", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                '"content": "hello"}]}'),
                       ("prompts", '{"prompt": [{"role": "user", "content": "hi"}]}'),
                       ("preferences", '{"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", '
                                       '"rejected": "go away"}'),
                       ("tokenizer", "")):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(line + "\n")
    init = tmp_path / "llama3.1-8b"
    init.mkdir()
    arg = "paper," + ",".join(f"{k}={v}" for k, v in files.items()) + f",init={init},sampler={init}"
    stages = E.resolve(_load("posttrain").get_config(arg), KINDS)
    by_name = {s.name: s for s in stages}
    assert len([s for s in stages if s.kind == "dpo"]) == 12 and "avg_r6" in by_name  # 6 rounds, 2 DPO runs each
    dpo, sft = by_name["dpo_r1"], by_name["sft_r1"]
    assert dpo.optim.peak_lr == sft.optim.peak_lr == 1e-5 and sft.total_steps == 9000
    assert dpo.options.beta == 0.1 and dpo.options.nll_coef == 0.2
    assert by_name["rs_r1"].options.k == 10 and by_name["rs_r1"].options.scorer == "reward"
    assert stages[0].model.n_layers == 32 and stages[0].phases[0].seq_len == 8192
    assert stages[0].init_source == f"init_from:{init}"
    for s in ("70b", "405b"):
        assert E.resolve(_load("posttrain").get_config(f"{arg},size={s}"), KINDS)[0].model.name.endswith(s)


def _paper_arg(tmp_path, rounds: int) -> str:
    """The paper variant's argument with one-record files, the annotations a file per round."""
    prompt = '{"role": "user", "content": "hi"}'
    lines = {"sft": '{"messages": [%s, {"role": "assistant", "content": "hello"}]}' % prompt,
             "prompts": '{"prompt": [%s]}' % prompt, "tokenizer": ""}
    for name, line in lines.items():
        (tmp_path / f"{name}.jsonl").write_text(line + "\n")
    for r in range(1, rounds + 1):
        (tmp_path / f"prefs{r}.jsonl").write_text('{"prompt": [%s], "chosen": "hello %d", "rejected": "go away", '
                                                  '"strength": "better"}\n' % (prompt, r))
    (tmp_path / "init").mkdir(exist_ok=True)
    files = ",".join(f"{name}={tmp_path / name}.jsonl" for name in lines)
    return f"paper,{files},preferences={tmp_path}/prefs{{round}}.jsonl,init={tmp_path / 'init'},rounds={rounds}"


def test_posttrain_paper_rounds_start_average_and_sample_as_the_paper(tmp_path):
    post = _load("posttrain")
    arg = _paper_arg(tmp_path, rounds=2)
    teacher = tmp_path / "llama3.1-405b-post"
    teacher.mkdir()
    by_name = {s.name: s for s in E.resolve(post.get_config(f"{arg},sampler={teacher}"), KINDS)}
    pretrained = f"init_from:{tmp_path / 'init'}"
    # §4.1: the reward model and each round's SFT start from the pre-trained checkpoint
    for r in (1, 2):
        for name in (f"rm_r{r}", f"rm_r{r}_2", f"sft_r{r}", f"sft_r{r}_2"):
            assert by_name[name].init_source == pretrained, name
    # §4.1.5: every reward model, SFT and DPO stage is two runs (LR 1e-5 and 5e-6) and their average
    for stage, average in (("rm_r2", "avg_rm_r2"), ("sft_r2", "avg_sft_r2"), ("dpo_r2", "avg_r2")):
        assert by_name[stage].optim.peak_lr == 1e-5 and by_name[f"{stage}_2"].optim.peak_lr == 5e-6
        assert by_name[average].options.sources == (E.StageRef(stage), E.StageRef(f"{stage}_2"))
    assert by_name["rs_r2"].options.reward_model == E.StageRef("avg_rm_r2")
    assert by_name["dpo_r2"].init_source == by_name["dpo_r2_2"].init_source == "previous:avg_sft_r2"
    # §4.1.2, §4.2.1: the reward model reads every annotation batch so far, DPO the latest; both keep the
    # "significantly better" and "better" pairs
    assert by_name["rm_r2"].options.preferences == (str(tmp_path / "prefs1.jsonl"), str(tmp_path / "prefs2.jsonl"))
    assert by_name["dpo_r2"].options.preferences == (str(tmp_path / "prefs2.jsonl"),)
    assert by_name["rm_r2"].options.strengths == by_name["dpo_r2"].options.strengths == ("significantly better",
                                                                                         "better")
    # §1, §4.2.2: the 405B model samples for the 8B model; later rounds steer with system prompts
    assert by_name["rs_r1"].options.sampler == by_name["rs_r2"].options.sampler == str(teacher)
    assert by_name["rs_r1"].options.system_prompts == ()
    assert by_name["rs_r2"].options.system_prompts == post.STYLE_SYSTEM_PROMPTS
    (tmp_path / "style.txt").write_text("Be brief.\n\nUse lists.\n")
    own = {s.name: s for s in E.resolve(post.get_config(f"{arg},size=405b,system_prompts={tmp_path}/style.txt"),
                                        KINDS)}
    assert own["rs_r2"].options.sampler == "" and own["rs_r2"].options.system_prompts == ("Be brief.", "Use lists.")
    with pytest.raises(ValueError, match="size=70b needs sampler=<a 405B post-training workdir>"):
        post.get_config(f"{arg},size=70b")
    with pytest.raises(FileNotFoundError, match="prefs3.jsonl"):  # round 3's annotations are not there yet
        E.resolve(post.get_config(f"{arg.replace('rounds=2', 'rounds=3')},sampler=self"), KINDS)
