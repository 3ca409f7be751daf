"""Direct Preference Optimization (Rafailov et al., 2023) and Llama 3's variant of it.

The DPO loss of one preference pair, with policy log-probabilities log π(y|x) and those of a frozen reference
model log π_ref(y|x) of the chosen (w) and rejected (l) responses:

    r_w = β (log π(y_w|x) - log π_ref(y_w|x))      r_l = β (log π(y_l|x) - log π_ref(y_l|x))
    L   = -log σ(r_w - r_l)

`dpo_loss` is that formula, pure, averaged over pairs. Llama 3 (§4.1.4) adds, in the `dpo` stage kind
(`llama_jax.stages.dpo`): formatting tokens (headers, `<|eot_id|>`, `<|eom_id|>`) masked out of both
log-probabilities, an NLL term on the chosen response with coefficient 0.2 (`pair_losses`), β = 0.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BETA = 0.1  # Llama 3 §4.1.4
NLL_COEF = 0.2  # Llama 3 §4.1.4


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """Sigmoid DPO loss, mean over pairs.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [P] summed
        log-probabilities of each pair's responses under the policy / the frozen reference.
      beta: the KL coefficient β.

    Returns:
      (loss, metrics): loss = mean_p -log σ(r_w - r_l); metrics `chosen_rewards` and `rejected_rewards` ([P],
      β x (policy - reference)) and `reward_accuracy` (mean of chosen_rewards > rejected_rewards, strict).
    """
    chosen = beta * (jnp.asarray(policy_chosen_logps, jnp.float32) - jnp.asarray(ref_chosen_logps, jnp.float32))
    rejected = beta * (jnp.asarray(policy_rejected_logps, jnp.float32)
                       - jnp.asarray(ref_rejected_logps, jnp.float32))
    if chosen.shape != rejected.shape or chosen.ndim != 1 or chosen.shape[0] == 0:
        raise ValueError(f"dpo_loss expects four [pairs] arrays of one shape with at least one pair; got chosen "
                         f"{chosen.shape}, rejected {rejected.shape}")
    loss = jnp.mean(-jax.nn.log_sigmoid(chosen - rejected))
    metrics = {"chosen_rewards": chosen, "rejected_rewards": rejected,
               "reward_accuracy": jnp.mean((chosen > rejected).astype(jnp.float32))}
    return loss, metrics


def pair_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_nll_per_token, beta: float = BETA, nll_coef: float = NLL_COEF):
    """Llama 3's per-pair DPO objective: -log σ(r_w - r_l) + nll_coef x (mean NLL per token of the chosen
    response under the policy). Returns [P]; `dpo_loss` x P + nll_coef x Σ chosen_nll_per_token = its sum."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return -jax.nn.log_sigmoid(chosen - rejected) + nll_coef * chosen_nll_per_token


__all__ = ["BETA", "NLL_COEF", "dpo_loss", "pair_losses"]
