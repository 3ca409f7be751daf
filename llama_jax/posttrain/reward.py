"""The reward model: the Llama backbone with a scalar head on the last token, trained with a pairwise loss.

Scalar head: the reward of a sequence is the final (normed) hidden state of its last token projected on one
column of the output projection, the one of a reserved special token (`REWARD_TOKEN`, never produced by the
chat format): r = h_last · W_out[:, id]. The head is therefore a linear scalar head that lives in the ordinary
parameter tree, so a reward model is an ordinary checkpoint of the backbone (same shapes, same driver, same
interop); it starts from the SFT / pretrained model's row for that token.

Loss (Llama 2's Bradley-Terry objective with the margin term dropped, as Llama 3 §4.1.2 does): for a record
with chosen (c) and rejected (r) responses, -log σ(r_c - r_r); with an edited response (e) the ranking
e > c > r contributes the three ordered pairs, -log σ(r_e - r_c) - log σ(r_e - r_r) - log σ(r_c - r_r).
`ranking_loss` returns (sum over ordered pairs, number of pairs); the stage's loss is their mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.model import transformer
from llama_jax.model.config import ModelConfig

REWARD_TOKEN = "<|reserved_special_token_246|>"  # the last reserved id of the Llama 3.1 special tokens


def reward_head_id(tokenizer) -> int:
    return tokenizer.special_tokens[REWARD_TOKEN]


def last_token_index(segment_ids_BT: jax.Array) -> jax.Array:
    """[B] index of each row's last non-padding position (0 for an all-padding row)."""
    t = segment_ids_BT.shape[1]
    present = (segment_ids_BT > 0).astype(jnp.int32)
    return jnp.max(present * jnp.arange(t, dtype=jnp.int32)[None, :], axis=1)


def rewards(cfg: ModelConfig, params, tokens_BT, positions_BT, segment_ids_BT, head_id: int) -> jax.Array:
    """[B] float32 scalar rewards (one sequence per row, right-padded with segment id 0)."""
    hidden, _ = transformer.apply(cfg, params, tokens_BT, positions_BT, segment_ids_BT, return_hidden=True)
    last = last_token_index(segment_ids_BT)
    h_BD = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    w_D = transformer.output_embedding(cfg, params)[:, head_id].astype(jnp.float32)
    return h_BD @ w_D


def ranking_loss(r_chosen, r_rejected, r_edited=None, has_edited=None):
    """(Σ over ordered pairs of -log σ(r_better - r_worse), number of pairs) for [P] rewards per record.

    `r_edited` / `has_edited` ([P], 0/1): records with an edited response add e > c and e > r.
    """
    r_chosen = jnp.asarray(r_chosen, jnp.float32)
    r_rejected = jnp.asarray(r_rejected, jnp.float32)
    total = jnp.sum(-jax.nn.log_sigmoid(r_chosen - r_rejected))
    count = jnp.float32(r_chosen.shape[0])
    if r_edited is not None:
        e = jnp.asarray(r_edited, jnp.float32)
        w = jnp.asarray(has_edited, jnp.float32)
        total = total + jnp.sum(w * (-jax.nn.log_sigmoid(e - r_chosen) - jax.nn.log_sigmoid(e - r_rejected)))
        count = count + 2.0 * jnp.sum(w)
    return total, count


def ranking_accuracy(r_chosen, r_rejected) -> jax.Array:
    """Fraction of records whose chosen reward is strictly above the rejected one."""
    return jnp.mean((jnp.asarray(r_chosen) > jnp.asarray(r_rejected)).astype(jnp.float32))


def check_vocabulary(reward_cfg: ModelConfig, policy_cfg: ModelConfig, where: str) -> None:
    """A reward model scores token ids: it must share the policy's vocabulary."""
    if reward_cfg.vocab_size != policy_cfg.vocab_size:
        raise ValueError(f"reward model {where!r} has vocab_size {reward_cfg.vocab_size} but the sampling model "
                         f"has {policy_cfg.vocab_size}: a reward model must use the policy's tokenizer")


__all__ = ["REWARD_TOKEN", "check_vocabulary", "last_token_index", "ranking_accuracy", "ranking_loss",
           "reward_head_id", "rewards"]
