"""Preference annotations (Llama 3 §4.2.1): strength labels, the synthetic annotator, the paper's filter of the
reward model's and DPO's data, and the post-training starting points."""

import types

import numpy as np
import pytest

from llama_jax import experiment
from llama_jax.posttrain import annotation, rejection, tasks
from llama_jax.posttrain import data as data_lib
from llama_jax.stages import KINDS
from llama_jax.stages.annotation import model_pairs


def _record(a, b):
    return {"prompt": [{"role": "user", "content": tasks.question(a, b)}], "answer": a + b}


def test_strength_grows_with_the_score_gap():
    # thresholds: the whole range, a half, a quarter, anything above 0
    assert [annotation.strength(g) for g in (1.0, 0.99, 0.5, 0.49, 0.25, 0.2, 1e-9, 0.0)] == [
        "significantly better", "better", "better", "slightly better", "slightly better", "marginally better",
        "marginally better", None]
    assert annotation.strength(2.0, scale=4.0) == "better" and annotation.strength(4.0, scale=4.0) == \
        "significantly better"


def test_the_synthetic_annotator_labels_edits_and_skips_ties():
    records = [_record(3, 4), _record(7, 19), _record(2, 2), _record(5, 5), _record(1, 1)]
    responses = [("3 + 4 = 7", "3 + 4 = 8"),  # right vs wrong: grades 1 vs 0
                 ("7 + 18 = 26", "7 + 19 = 26"),  # right answer with wrong work (0.5) vs fully right (1)
                 ("2 + 2 = 5", "5"),  # both wrong: a tie
                 ("10", "10"),  # the same text
                 ("2", "")]  # an empty response
    scores = rejection.score_with_verifier(records, [list(r) for r in responses], tasks.score_arithmetic)
    models = [("A", "B")] * len(records)
    out, stats = annotation.annotate(records, responses, scores, models, editor=tasks.edit_arithmetic)
    assert [(a["chosen"], a["rejected"], a["strength"], a["models"]) for a in out] == [
        ("3 + 4 = 7", "3 + 4 = 8", "significantly better", ["A", "B"]),
        ("7 + 19 = 26", "7 + 18 = 26", "better", ["B", "A"])]
    assert "edited" not in out[0] and "edited" not in out[1]  # fully correct chosen responses need no edit
    assert stats["pairs"] == 2 and stats["ties"] == 2 and stats["empty"] == 1 and stats["edited"] == 0
    assert stats["strengths"] == {"significantly better": 1, "better": 1, "slightly better": 0,
                                  "marginally better": 0}
    assert stats["model_score_mean"] == {"A": pytest.approx((1 + 0.5 + 0 + 1 + 1) / 5),
                                         "B": pytest.approx((0 + 1 + 0 + 1 + 0) / 5)}
    # the editing step improves a chosen response that is not fully correct: edited > chosen > rejected
    out, stats = annotation.annotate([_record(7, 19)], [("7 + 18 = 26", "25")], np.array([[0.5, 0.0]]),
                                     [("A", "A")], editor=tasks.edit_arithmetic)
    assert out[0]["edited"] == "7 + 19 = 26" and out[0]["strength"] == "better" and stats["edited"] == 1
    for record in out:
        assert data_lib.parse_preference(record)["strength"] == record["strength"]


def test_two_different_models_answer_each_prompt():
    assert model_pairs(4, 2) == [(0, 1), (1, 0), (0, 1), (1, 0)]
    assert model_pairs(3, 3) == [(0, 1), (1, 2), (2, 0)]
    assert model_pairs(2, 1) == [(0, 0), (0, 0)]


def test_strength_labels_are_checked_and_only_the_papers_two_are_kept():
    base = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"}
    with pytest.raises(ValueError, match="strength 'much better': expected one of"):
        data_lib.parse_preference({**base, "strength": "much better"})
    records = [dict(base, strength=s) for s in data_lib.STRENGTHS] + [dict(base)]
    kept = data_lib.keep_strengths(records, data_lib.KEPT_STRENGTHS)
    assert [r.get("strength") for r in kept] == ["significantly better", "better", None]
    with pytest.raises(ValueError, match="must be a non-empty subset"):
        KINDS["dpo"].parse_options("d", {"preferences": "stage:a/p.jsonl", "strengths": ["best"]})


def test_the_preference_kinds_drop_weaker_annotations(tok, tiny_cfg, tmp_path):
    path = str(tmp_path / "prefs.jsonl")
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    data_lib.write_jsonl(path, [{"prompt": prompt, "chosen": f"2 + 2 = {4 + i}", "rejected": "5", "strength": s}
                                for i, s in enumerate(data_lib.STRENGTHS)]
                         + [{"prompt": prompt, "chosen": "4", "rejected": "22"}])
    options = KINDS["reward"].parse_options("rm", {"preferences": path})
    stage = types.SimpleNamespace(model=tiny_cfg, options=options, name="rm", kind="reward")
    ctx = types.SimpleNamespace(stage=stage, tokenizer=tok, cache={})
    examples = KINDS["reward"].examples(ctx, options.preferences, 32)
    assert len(examples) == 3  # "significantly better", "better" and the unlabelled record
    assert ctx.cache["data"]["weaker"] == 2 and ctx.cache["data"]["used"] == 3 and ctx.cache["data"]["kept"] == 5
    assert KINDS["dpo"].parse_options("d", {"preferences": path}).strengths == data_lib.KEPT_STRENGTHS
    every = KINDS["reward"].parse_options("rm", {"preferences": path, "strengths": list(data_lib.STRENGTHS)})
    ctx = types.SimpleNamespace(stage=types.SimpleNamespace(**{**vars(stage), "options": every}), tokenizer=tok,
                                cache={})
    assert len(KINDS["reward"].examples(ctx, every.preferences, 32)) == 5


def test_system_prompts_steer_rejection_samples():
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}],
               [{"role": "system", "content": "own"}, {"role": "user", "content": "c"}]]
    steered = rejection.with_system_prompts(prompts, ["S1", "S2"])
    assert [p[0]["content"] for p in steered] == ["S1", "S2", "own"] and len(steered[2]) == 2
    assert rejection.with_system_prompts(prompts, []) == prompts
    with pytest.raises(ValueError, match="system_prompts holds an empty prompt"):
        KINDS["rejection_sampling"].parse_options("rs", {"prompts": "stage:a/p.jsonl", "verifier": "m:f",
                                                         "system_prompts": ["S1", " "]})


def test_start_from_init_from_is_the_runs_starting_model(tmp_path):
    dialogs = str(tmp_path / "d.jsonl")
    data_lib.write_jsonl(dialogs, [{"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}])
    c = experiment.base_config()
    c.data.sources = [dict(name="code", kind="corpus", path="code", weight=1.0)]
    opt = experiment.optim(1e-3, 0)
    c.stages = [experiment.stage("a", [experiment.phase(64, 8)], opt, steps=2),
                experiment.stage("b", [experiment.phase(64, 8)], opt, steps=2, kind="sft",
                                 options=dict(dialogs=[dialogs], start_from="init_from"))]
    with pytest.raises(ValueError, match="options.start_from='init_from' needs config.init_from"):
        experiment.resolve(c, KINDS)
    c.init_from = str(tmp_path)
    stages = experiment.resolve(c, KINDS)
    assert stages[1].init_source == f"init_from:{tmp_path}" and stages[0].init_source == f"init_from:{tmp_path}"
    c.stages[0]["name"] = "init_from"
    with pytest.raises(ValueError, match="stage name 'init_from' is reserved"):
        experiment.resolve(c, KINDS)


def test_a_round_reads_every_batch_for_the_reward_model_and_the_latest_for_dpo():
    from llama_jax.posttrain import recipe
    stages = {st["name"]: st for st in recipe.round_stages(3, "p.jsonl", 64, policy="avg_r2",
                                                            annotations="a{round}.jsonl", reward_model=True,
                                                            dpo_batches=2, sft_runs=(dict(lr=5e-6),))}
    assert list(stages) == ["rm_r3", "rs_r3", "sft_r3", "sft_r3_2", "avg_sft_r3", "dpo_r3"]
    assert stages["rm_r3"]["options"]["preferences"] == ["a1.jsonl", "a2.jsonl", "a3.jsonl"]
    assert stages["dpo_r3"]["options"]["preferences"] == ["a2.jsonl", "a3.jsonl"]
    assert stages["rm_r3"]["options"]["start_from"] == stages["sft_r3_2"]["options"]["start_from"] == "init_from"
    assert stages["dpo_r3"]["options"]["start_from"] == "avg_sft_r3"
    assert stages["rs_r3"]["options"]["start_from"] == "avg_r2"
    with pytest.raises(ValueError, match="DPO trains on preference annotations"):
        recipe.round_stages(1, "p.jsonl", 64, policy="sft", verifier="m:f")
    with pytest.raises(ValueError, match="must be one of \\('pretrained', 'policy'\\)"):
        recipe.round_stages(1, "p.jsonl", 64, policy="sft", annotations="a.jsonl", sft_from="scratch")
