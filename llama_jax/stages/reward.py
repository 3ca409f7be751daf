"""Stage kind `reward`: the reward model, the backbone's scalar head on each row's last token, trained with the
pairwise ranking loss (edited > chosen > rejected, no margin; `posttrain.reward.ranking_loss`). A step's rows
are each record's chosen, rejected and edited rows side by side (an all-padding edited row when a record has
none). Options (`stages.options.RewardOptions`): preferences (every annotation batch so far in the paper's
recipe), eval_preferences, truncation, strengths (annotator labels kept), task evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.posttrain import data as data_lib
from llama_jax.posttrain import reward as reward_lib
from llama_jax.stages import common
from llama_jax.stages import options as options_lib
from llama_jax.stages.preference import PreferenceKind


class Reward(PreferenceKind):
    name = "reward"
    Options = options_lib.RewardOptions
    ROLES = ("chosen", "rejected", "edited")

    def rows(self, ctx, record, seq_len):
        enc = data_lib.encode_preference(ctx.tokenizer, record, seq_len - 1, ctx.stage.options.truncation)
        if enc is None:
            return None
        return {role: data_lib.single_row(
            {"inputs": enc[role]["tokens"], "targets": np.zeros_like(enc[role]["tokens"]),
             "loss_mask": np.zeros_like(enc[role]["tokens"])} if role in enc else None, seq_len)
            for role in self.ROLES}

    def loss_fn(self, ctx):
        cfg, head = ctx.stage.model, reward_lib.reward_head_id(ctx.tokenizer)

        def loss(params, batch):
            r = reward_lib.rewards(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"], head)
            rc, rr, re = common.split_roles(r, 3)
            has_edited = jnp.any(common.split_roles(batch["segment_ids"], 3)[2] > 0, axis=1)
            return reward_lib.ranking_loss(rc, rr, re, has_edited)
        return loss

    def evaluate(self, ctx, params, phase, step):
        options = ctx.stage.options
        examples = self.eval_examples(ctx, phase)
        head = reward_lib.reward_head_id(ctx.tokenizer)
        fn = ctx.cached("reward_fn", lambda: jax.jit(
            lambda prm, b: reward_lib.rewards(ctx.stage.model, prm, b["inputs"], b["positions"], b["segment_ids"],
                                              head)))
        scores = {}
        for role in ("chosen", "rejected"):
            rows = [e[role] for e in examples]
            scores[role] = np.concatenate([np.asarray(fn(params, b))[:n] for n, b in common.host_batches(rows, 32)])
        total, count = reward_lib.ranking_loss(scores["chosen"], scores["rejected"])
        out = {"ranking_loss": float(total) / float(count),
               "ranking_accuracy": float(reward_lib.ranking_accuracy(scores["chosen"], scores["rejected"])),
               "reward_margin": float(np.mean(scores["chosen"] - scores["rejected"]))}
        out.update(common.task_eval(ctx, params, options.eval_prompts, options.verifier, options.eval_max_new_tokens))
        return out


__all__ = ["Reward"]
