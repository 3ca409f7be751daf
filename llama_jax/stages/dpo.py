"""Stage kind `dpo`: Llama 3's DPO (§4.1.4): a frozen reference, formatting tokens masked out of both
log-probabilities, an NLL term on the chosen response, β 0.1, coefficient 0.2 (`posttrain.dpo.pair_losses`, the
objective written once).

A step's rows are each pair's chosen and rejected rows side by side, plus `ref_logps` ([B, L] float32 per-token
log-probs of the frozen reference model, computed once when the stage's data is built). The reference is the
model the stage starts from (the previous stage's final parameters, or init_from), loaded onto the stage's mesh.
Options (`stages.options.DPOOptions`): preferences (the latest annotation batches in the paper's recipe),
eval_preferences, beta, nll_coef, truncation, strengths (annotator labels kept), task evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.posttrain import data as data_lib
from llama_jax.posttrain import dpo as dpo_lib
from llama_jax.stages import common
from llama_jax.stages import options as options_lib
from llama_jax.stages.preference import PreferenceKind


class DPO(PreferenceKind):
    name = "dpo"
    frozen_models = 1  # the reference model, sharded like the policy
    Options = options_lib.DPOOptions
    ROLES = ("chosen", "rejected")

    def _logps_fn(self, ctx):
        return ctx.cached("logps_fn", lambda: jax.jit(lambda prm, b: common.sequence_logps(ctx.stage.model, prm, b)))

    def rows(self, ctx, record, seq_len):
        enc = data_lib.encode_preference(ctx.tokenizer, record, seq_len, ctx.stage.options.truncation)
        return None if enc is None else {role: data_lib.single_row(enc[role], seq_len) for role in self.ROLES}

    def examples(self, ctx, spec, seq_len: int, record: bool = True) -> list[dict]:
        """Pairs of rows with the frozen reference model's per-token log-probs (`ref_logps`)."""
        pairs = super().examples(ctx, spec, seq_len, record)
        reference = ctx.cached("reference", lambda: common.start_params(ctx))
        fn = self._logps_fn(ctx)
        rows = [pair[role] for pair in pairs for role in self.ROLES]
        ref = np.concatenate([np.asarray(fn(reference, b)[2])[:n] for n, b in common.host_batches(rows, 32)])
        ref = ref.astype(np.float32)
        for i, row in enumerate(rows):
            row["ref_logps"] = ref[i] * (row["loss_mask"] > 0)
        return pairs

    def loss_fn(self, ctx):
        cfg, options = ctx.stage.model, ctx.stage.options

        def loss(params, batch):
            logps, counts, _ = common.sequence_logps(cfg, params, batch)
            ref = jnp.sum(batch["ref_logps"] * batch["loss_mask"].astype(jnp.float32), axis=1)
            (pc, pr), (rc, rr), (nc, _) = (common.split_roles(x, 2) for x in (logps, ref, counts))
            nll = -pc / jnp.maximum(nc, 1.0)  # per-token NLL of each chosen response
            losses = dpo_lib.pair_losses(pc, pr, rc, rr, nll, options.beta, options.nll_coef)
            return jnp.sum(losses), jnp.float32(pc.shape[0])
        return loss

    def evaluate(self, ctx, params, phase, step):
        options = ctx.stage.options
        pairs = self.eval_examples(ctx, phase)
        fn = self._logps_fn(ctx)
        logps = {}
        for role in self.ROLES:
            pol, ref = [], []
            for n, b in common.host_batches([pair[role] for pair in pairs], 32):
                ref_b = b.pop("ref_logps")
                pol.append(np.asarray(fn(params, b)[0])[:n])
                ref.append(np.sum(ref_b, axis=1)[:n])
            logps[role] = (np.concatenate(pol), np.concatenate(ref))
        loss, m = dpo_lib.dpo_loss(logps["chosen"][0], logps["rejected"][0], logps["chosen"][1],
                                   logps["rejected"][1], options.beta)
        out = {"dpo_loss": float(loss), "reward_accuracy": float(m["reward_accuracy"]),
               "chosen_reward": float(np.mean(m["chosen_rewards"])),
               "rejected_reward": float(np.mean(m["rejected_rewards"])),
               "reward_margin": float(np.mean(m["chosen_rewards"] - m["rejected_rewards"]))}
        out.update(common.task_eval(ctx, params, options.eval_prompts, options.verifier, options.eval_max_new_tokens))
        return out


__all__ = ["DPO"]
