"""dpo_loss against the DPO paper's formula evaluated by hand."""
import math

import numpy as np
import pytest

from llama_jax.posttrain import dpo


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_dpo_loss_hand_computed():
    pc, pr = [-1.0, -4.0, -2.0], [-3.0, -2.5, -2.0]
    rc, rr = [-2.0, -3.0, -1.0], [-2.0, -3.0, -1.0]
    beta = 0.5
    loss, m = dpo.dpo_loss(np.array(pc), np.array(pr), np.array(rc), np.array(rr), beta)
    # pair 0: r_w = 0.5*(−1+2)=0.5, r_l = 0.5*(−3+2)=−0.5 -> −log σ(1.0) = 0.3132616875
    # pair 1: r_w = 0.5*(−4+3)=−0.5, r_l = 0.5*(−2.5+3)=0.25 -> −log σ(−0.75) = 1.1368710
    # pair 2: r_w = 0.5*(−2+1)=−0.5, r_l = −0.5 -> −log σ(0) = log 2
    expected = (0.3132616875182228 + 1.1368710061148622 + math.log(2)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(loss) == pytest.approx(-(_logsig(1.0) + _logsig(-0.75) + _logsig(0.0)) / 3, rel=1e-6)
    np.testing.assert_allclose(m["chosen_rewards"], [0.5, -0.5, -0.5], rtol=1e-6)
    np.testing.assert_allclose(m["rejected_rewards"], [-0.5, 0.25, -0.5], rtol=1e-6)
    assert float(m["reward_accuracy"]) == pytest.approx(1 / 3)  # a tie is not a win


def test_dpo_loss_at_reference_is_log2_and_rejects_bad_shapes():
    x = np.array([-3.0, -7.0])
    loss, m = dpo.dpo_loss(x, x + 1, x, x + 1, 0.1)
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    assert float(m["reward_accuracy"]) == 0.0
    with pytest.raises(ValueError, match="pairs"):
        dpo.dpo_loss(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(3), 0.1)


def test_pair_losses_adds_the_nll_term():
    pc, pr, rc, rr = np.array([-1.0]), np.array([-3.0]), np.array([-2.0]), np.array([-2.0])
    nll = np.array([1.5])
    out = dpo.pair_losses(pc, pr, rc, rr, nll, beta=0.1, nll_coef=0.2)
    # r_w − r_l = 0.1*(1) − 0.1*(−1) = 0.2 -> −log σ(0.2) = 0.5981388693; + 0.2 * 1.5
    assert float(out[0]) == pytest.approx(0.5981388693815918 + 0.3, rel=1e-6)
