"""The post-training stage kinds: SFT packing, the DPO stage loss (mask, NLL term), rejection sampling's
selection, and a driver run where each round's output feeds the next."""
import json
import os
import types

import jax
import numpy as np
import pytest

from llama_jax import experiment
from llama_jax.model import transformer
from llama_jax.posttrain import data as data_lib
from llama_jax.posttrain import dpo as dpo_lib
from llama_jax.posttrain import rejection
from llama_jax.stages import KINDS
from llama_jax.train import loss as loss_lib
from llama_jax.train import resume
from llama_jax.train import step as step_lib

DIALOGS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 1?"},
     {"role": "assistant", "content": "8"}],
    [{"role": "user", "content": "compute 4 + 4"},
     {"role": "assistant", "content": "<|python_tag|>print(4 + 4)", "eom": True},
     {"role": "ipython", "content": "8"}, {"role": "assistant", "content": "The answer is 8."}],
]


def length_score(record, response):  # a deterministic verifier for the driver test
    return float(len(response) % 5)


def test_sft_packed_batch_equals_dialogs_one_by_one(tok, tiny_cfg):
    params = transformer.init(tiny_cfg, jax.random.key(1))
    seqs = [data_lib.encode_sft(tok, d, 64) for d in DIALOGS]
    (packed,) = data_lib.pack_rows(seqs, 128)
    assert packed["segment_ids"].max() == 3
    batch = {k: v[None] for k, v in packed.items()}
    total, count = step_lib.loss_sum(tiny_cfg, params, batch)
    alone = [step_lib.loss_sum(tiny_cfg, params, {k: v[None] for k, v in data_lib.single_row(s, 64).items()})
             for s in seqs]
    assert float(count) == sum(float(n) for _, n in alone) == sum(int(s["loss_mask"].sum()) for s in seqs)
    np.testing.assert_allclose(float(total), sum(float(t) for t, _ in alone), rtol=1e-5)


def _ctx(cfg, tok, **opts):
    options = KINDS["dpo"].parse_options("dpo", {"preferences": "stage:rs/preferences.jsonl", **opts})
    stage = types.SimpleNamespace(model=cfg, options=options, name="dpo")
    return types.SimpleNamespace(stage=stage, tokenizer=tok)


def test_dpo_stage_loss_masks_formatting_and_adds_nll(tok, tiny_cfg):
    params = transformer.init(tiny_cfg, jax.random.key(2))
    ref_params = transformer.init(tiny_cfg, jax.random.key(3))
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    records = [{"prompt": prompt, "chosen": "2 + 2 = 4", "rejected": "<|python_tag|>print(5)"},
               {"prompt": prompt, "chosen": "4", "rejected": "2 + 2 = 22"}]
    seq_len = 32
    pairs = [data_lib.encode_preference(tok, r, seq_len) for r in records]
    rows = {role: [data_lib.single_row(p[role], seq_len) for p in pairs] for role in ("chosen", "rejected")}

    def by_hand(p, response_tokens_fn):
        out = []
        for r in records:
            for role in ("chosen", "rejected"):
                tokens, content = data_lib.encode_response(tok, r["prompt"], r[role])
                lp = np.asarray(loss_lib.token_logprobs(transformer.forward(tiny_cfg, p, tokens[None, :-1]),
                                                        tokens[None, 1:]))[0]
                out.append((role, lp[content[1:]], tokens[1:][content[1:]]))
        return out

    pol, ref = by_hand(params, None), by_hand(ref_params, None)
    specials = {tok.eot_id, tok.eom_id, tok.python_tag_id, tok.start_header_id, tok.end_header_id}
    assert all(not specials & set(t.tolist()) for _, _, t in pol)  # formatting tokens masked out
    sums = lambda xs, role: np.array([lp.sum() for r, lp, _ in xs if r == role])  # noqa: E731
    nll = np.array([-lp.mean() for r, lp, _ in pol if r == "chosen"])
    expected_pair = dpo_lib.dpo_loss(sums(pol, "chosen"), sums(pol, "rejected"), sums(ref, "chosen"),
                                     sums(ref, "rejected"), 0.1)[0]
    expected = float(expected_pair) * 2 + 0.2 * nll.sum()

    # the stage's batch: each pair's chosen and rejected rows side by side, with the reference's log-probs
    batch_rows = [r for pair in zip(rows["chosen"], rows["rejected"]) for r in pair]
    batch = {k: np.stack([r[k] for r in batch_rows]) for k in batch_rows[0]}
    ref_lp = np.asarray(loss_lib.token_logprobs(
        transformer.apply(tiny_cfg, ref_params, batch["inputs"], batch["positions"], batch["segment_ids"])[0],
        batch["targets"]))
    batch["ref_logps"] = (ref_lp * batch["loss_mask"]).astype(np.float32)
    loss_fn = KINDS["dpo"].loss_fn(_ctx(tiny_cfg, tok))
    total, count = loss_fn(params, batch)
    assert float(count) == 2
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    no_nll, _ = KINDS["dpo"].loss_fn(_ctx(tiny_cfg, tok, nll_coef=0.0))(params, batch)
    np.testing.assert_allclose(float(total) - float(no_nll), 0.2 * nll.sum(), rtol=1e-4)


def test_rejection_sampling_keeps_the_argmax_under_a_verifier():
    records = [{"prompt": [{"role": "user", "content": f"What is {i + 1} + 1?"}], "answer": i + 2}
               for i in range(3)]
    responses = [["1 + 1 = 3", "1 + 1 = 2", "2", ""], ["7", "8", "9", "10"], ["3 + 1 = 5", "", "6", "x"]]
    from llama_jax.posttrain import tasks
    scores = rejection.score_with_verifier(records, responses, tasks.verify_arithmetic)
    np.testing.assert_array_equal(scores[0], [0, 1, 1, -np.inf])
    dialogs, pairs, stats = rejection.select(records, responses, scores, min_score=1.0)
    assert [d["messages"][-1]["content"] for d in dialogs] == ["1 + 1 = 2"]  # the first argmax, only correct
    assert pairs == [{"prompt": records[0]["prompt"], "chosen": "1 + 1 = 2", "rejected": "1 + 1 = 3"}]
    assert stats["kept"] == 1 and stats["kept_fraction"] == pytest.approx(1 / 3) and stats["empty_samples"] == 2
    assert stats["score_quantiles"]["1.0"] == 1.0
    dialogs, _, _ = rejection.select(records, responses, scores)
    assert [d["messages"][-1]["content"] for d in dialogs] == ["1 + 1 = 2", "7", "3 + 1 = 5"]


def test_posttrain_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['betta'\]"):
        KINDS["dpo"].parse_options("d", {"preferences": "stage:rs/p.jsonl", "betta": 0.1})
    with pytest.raises(ValueError, match="options.preferences is required"):
        KINDS["dpo"].parse_options("d", {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KINDS["sft"].parse_options("s", {"dialogs": str(tmp_path / "none.jsonl")})
    with pytest.raises(ValueError, match="trains nothing: give it no steps"):
        experiment.stage_steps(experiment.stage("r", [experiment.phase(64, 8)], experiment.optim(1.0, 1), steps=3,
                                                kind="rejection_sampling"), trains=False)
    with pytest.raises(ValueError, match="takes no options"):
        KINDS["pretrain"].parse_options("p", {"beta": 1})


def _driver_config(tok_path, tmp_path):
    from llama_jax.posttrain import tasks
    paths = tasks.write_arithmetic(str(tmp_path / "task"), max_operand=6, n_sft=12, n_prompts=4, n_heldout=3)
    prefs = str(tmp_path / "prefs.jsonl")
    data_lib.write_jsonl(prefs, [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}],
                                  "chosen": f"{a} + 1 = {a + 1}", "rejected": f"{a} + 1 = {a + 2}",
                                  **({"edited": f"{a + 1}"} if a % 2 else {})} for a in range(8)])
    # the annotation stage's prompts: enough that some pairs of the barely trained models' samples are both
    # non-empty and of different scores
    ann_prompts = str(tmp_path / "ann_prompts.jsonl")
    data_lib.write_jsonl(ann_prompts, [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                                        "answer": a + b} for a in range(8) for b in range(4)])
    c = experiment.base_config()
    c.tokenizer = tok_path
    c.model.update(dict(vocab_size=640, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=128))
    c.data.sources = [dict(name="code", kind="corpus", path="code", weight=1.0)]
    c.checkpoint.update(dict(every_steps=0, async_save=False))
    c.eval.update(dict(every_steps=0, batches=1))
    c.sample.max_new_tokens = 0
    c.log_every_steps = 0
    opt = experiment.optim(1e-3, warmup_steps=1)
    task = dict(eval_prompts=paths["heldout"], verifier="llama_jax.posttrain.tasks:verify_arithmetic",
                eval_max_new_tokens=4)
    c.stages = [
        experiment.stage("sft", [experiment.phase(64, 8)], opt, steps=2, kind="sft",
                         options=dict(dialogs=paths["sft"], **task)),
        experiment.stage("rm", [experiment.phase(64, 24)], opt, steps=2, kind="reward",
                         options=dict(preferences=prefs)),
        experiment.stage("rs", [experiment.phase(64, 8)], opt, kind="rejection_sampling",
                         options=dict(prompts=paths["prompts"], k=3, scorer="reward", reward_model="stage:rm",
                                        max_new_tokens=6, start_from="sft")),
        experiment.stage("sft2", [experiment.phase(64, 8)], opt, steps=2, kind="sft",
                         options=dict(dialogs="stage:rs/sft.jsonl")),
        experiment.stage("ann", [experiment.phase(64, 8)], opt, kind="preference_annotation",
                         options=dict(prompts=ann_prompts, models=["stage:sft", "stage:sft2"],
                                      annotator="tests.posttrain.test_stages:length_score", score_scale=4.0,
                                      max_new_tokens=6)),
        experiment.stage("dpo", [experiment.phase(64, 16)], opt, steps=2, kind="dpo",
                         options=dict(preferences="stage:ann/preferences.jsonl",
                                      strengths=list(data_lib.STRENGTHS))),
    ]
    return c


def test_a_round_feeds_the_next(tok_path, tmp_path):
    from llama_jax import workdir as workdir_lib
    from llama_jax.stages import KINDS
    from llama_jax.train import driver
    c = _driver_config(tok_path, tmp_path)
    workdir = str(tmp_path / "run")
    results = driver.run_experiment(c, workdir, KINDS)
    assert 0.0 <= results["sft"]["eval_task_accuracy"] <= 1.0
    # the per-prompt scores behind the accuracy, for the paired tests (posttrain.significance)
    with open(workdir_lib.stage_output_path(workdir, "sft", "task_scores.json")) as f:
        scores = json.load(f)
    assert len(scores["scores"]) == 3 and scores["compared_with"] == []
    assert np.mean(scores["scores"]) == pytest.approx(results["sft"]["eval_task_accuracy"])
    assert 0.0 <= results["rm"]["eval_ranking_accuracy"] <= 1.0
    stats = results["rs"]["rejection_sampling"]
    assert stats["prompts"] == 4 and stats["samples_per_prompt"] == 3 and stats["scorer"] == "reward"
    # rejection sampling trains nothing: its checkpoint is the model it started from (sft, not rm)
    _, sft_params = resume.load_workdir(workdir, stage="sft")
    _, rs_params = resume.load_workdir(workdir, stage="rs")
    for a, b in zip(jax.tree.leaves(sft_params), jax.tree.leaves(rs_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sft_file = workdir_lib.stage_output_path(workdir, "rs", "sft.jsonl")
    kept = [json.loads(line) for line in open(sft_file)]
    assert len(kept) == stats["kept"] > 0
    # the next stages trained on what rejection sampling wrote
    assert results["sft2"]["data"]["path"] == sft_file and results["sft2"]["data"]["kept"] == len(kept)
    prefs = [json.loads(line) for line in open(workdir_lib.stage_output_path(workdir, "rs", "preferences.jsonl"))]
    assert len(prefs) == stats["pairs"] > 0
    # the annotation stage labelled one sample of each of two models per prompt; DPO trained on its pairs
    labelled = results["ann"]["annotation"]
    ann_file = workdir_lib.stage_output_path(workdir, "ann", "preferences.jsonl")
    annotations = [json.loads(line) for line in open(ann_file)]
    assert labelled["prompts"] == 32 and len(annotations) == labelled["pairs"] > 0
    assert labelled["pairs"] + labelled["ties"] + labelled["empty"] == 32
    for a in annotations:
        assert sorted(a["models"]) == ["stage:sft", "stage:sft2"] and a["strength"] in data_lib.STRENGTHS
        assert length_score(None, a["chosen"]) > length_score(None, a["rejected"])
    assert results["dpo"]["data"]["path"] == ann_file and results["dpo"]["data"]["used"] == len(annotations)
    assert 0.0 <= results["dpo"]["eval_reward_accuracy"] <= 1.0 and "eval_reward_margin" in results["dpo"]
    assert os.path.isfile(workdir_lib.stage_output_path(workdir, "rs", "stats.json"))
