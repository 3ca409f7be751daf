"""The pure train step: sharded equals unsharded, accumulation equals the full batch, learning, NaN skip."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax.model import config
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import step as step_lib
from llama_jax.train.optim import OptimConfig, make_schedule

CFG = config.get("tiny", n_layers=2)
OPT = OptimConfig(peak_lr=1e-3, warmup_steps=0, total_steps=100, final_lr_ratio=0.1)
B, L = 16, 32


def _batch(seed=0, vocab=CFG.vocab_size):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, (B, L + 1))
    segs = np.ones((B, L), np.int32)
    segs[:, L // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(L // 2)] * 2)[None].repeat(B, 0)
    mask = np.ones((B, L), np.int32)
    mask[:, -3:] = 0
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=segs, positions=pos, loss_mask=mask)


def _grads(mesh, rules, batch):
    """Loss and gradients of the tiny model with parameters and batch sharded over `mesh`."""
    state, sh = step_lib.init_train_state(CFG, OPT, mesh, rules, jax.random.key(0))

    def fn(params, b):
        with nn.logical_axis_rules(rules):
            (total, count), g = jax.value_and_grad(lambda p: step_lib.loss_sum(CFG, p, b), has_aux=True)(params)
        return total / count, jax.tree.map(lambda x: x / count, g)

    with jax.set_mesh(mesh):
        gb = step_lib.make_global_batch(batch, mesh)
        loss, grads = jax.jit(fn, in_shardings=(sh.params, {k: mesh_lib.data_sharding(mesh) for k in gb}),
                              out_shardings=(None, sh.params))(state.params, gb)
    return float(loss), jax.device_get(grads), grads


MESHES = [
    ("data8", {"data": 8}, "dp"),
    ("data2_fsdp4", {"data": 2, "fsdp": 4}, "fsdp"),
    ("data2_fsdp2_tensor2", {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
]


@pytest.fixture(scope="module")
def single_device_reference():
    mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    return _grads(mesh, rules_lib.get_rules("dp"), _batch())


@pytest.mark.parametrize("name,shape,rules", MESHES, ids=[m[0] for m in MESHES])
def test_sharded_loss_and_grads_equal_single_device(single_device_reference, name, shape, rules):
    ref_loss, ref_grads, _ = single_device_reference
    mesh = mesh_lib.make_mesh(shape)
    loss, grads, sharded = _grads(mesh, rules_lib.get_rules(rules), _batch())
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
    # The parameters really were distributed as the rule set says.
    w1 = sharded["layers"]["block"]["mlp"]["w1"]
    # (every set also splits `embed` over `pipe`, of size 1 here)
    expected = {"dp": (None, "pipe", None), "fsdp": (None, ("fsdp", "pipe"), None),
                "fsdp_tp": (None, ("fsdp", "pipe"), "tensor")}
    assert tuple(w1.sharding.spec) == expected[rules]


def _run_steps(mesh_shape, rules, grad_accum=1, n=2, devices=None, batch_fn=_batch, opt=OPT):
    mesh = mesh_lib.make_mesh(mesh_shape, devices=devices)
    r = rules_lib.get_rules(rules)
    state, sh = step_lib.init_train_state(CFG, opt, mesh, r, jax.random.key(0))
    fn = step_lib.jit_train_step(step_lib.make_train_step(CFG, opt, grad_accum), mesh, r, sh)
    metrics = []
    for i in range(n):
        state, m = fn(state, step_lib.make_global_batch(batch_fn(i), mesh))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


# Sharded and unsharded programs sum in different orders, and XLA:CPU picks different kernels per instruction
# set, so they agree only up to float32 round-off. Loss and gradients are well conditioned and are compared
# tightly (above). AdamW's first update is lr * g / (|g| + eps) per entry: an entry whose gradient is near zero
# (|g| ~ its round-off) can land anywhere in [-lr, lr], so the parameters after an AdamW step are bounded entry
# by entry by what the proven gradient tolerance can explain, never by a constant that held on one CPU. A large
# eps makes the update proportional to the gradient, which is well conditioned over several steps.
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7  # the gradient agreement test_sharded_loss_and_grads_equal_single_device proves
LARGE_EPS = OptimConfig(peak_lr=1e-3, warmup_steps=0, total_steps=100, final_lr_ratio=0.1, eps=1.0)


def _adam_first_step_bound(ref_grads, ref_grad_norm, opt=OPT):
    """Per-entry bound on |params_a - params_b| after one AdamW step from equal parameters, when the two runs'
    gradients each lie within GRAD_RTOL / GRAD_ATOL of `ref_grads`. Step one of Adam (bias-corrected) moves each
    entry by -lr * u(c g) with u(x) = x / (|x| + eps) and c the clipping factor; u is increasing, so the largest
    difference over the gradient interval g +- tol is u(c (g + tol)) - u(c (g - tol)). Weight decay acts on the
    equal parameters and cancels; the clipping factors differ by the grad norm's relative error, folded into tol."""
    scale = min(1.0, opt.clip_norm / ref_grad_norm)
    lr = float(make_schedule(opt)(0))
    u = lambda x: x / (np.abs(x) + opt.eps)  # noqa: E731
    def bound(g):
        tol = 2 * (GRAD_ATOL + GRAD_RTOL * np.abs(g)) + 4 * GRAD_RTOL * np.abs(g)  # both runs, and the clip factor
        return lr * (u(scale * (g + tol)) - u(scale * (g - tol))) + 1e-8  # + parameter round-off
    return jax.tree.map(bound, ref_grads)


def _assert_within(params, ref, bound):
    """|params - ref| <= bound + the float32 rounding of the updated parameters themselves: each run rounds
    p - update to float32, half an ulp of the result each, so one ulp of the parameter between the two (an
    RMSNorm scale starts at 1.0, where an ulp is 1.2e-7, far above the bound's 1e-8 for small parameters)."""
    for (path, a), b, t in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref),
                               jax.tree.leaves(bound)):
        excess = np.abs(a - b) - t - np.spacing(np.abs(np.asarray(b, np.float32)))
        assert excess.max() <= 0, (f"{jax.tree_util.keystr(path)}: a difference exceeds what the gradient "
                                   f"tolerance explains by {excess.max():.3g}")


def _assert_steps_match(reference, mesh_shape, rules, grad_accum=1, devices=None):
    """One AdamW step bounded entry by entry; two large-eps steps close; losses and grad norms tight."""
    ref_state, ref_m = _run_steps({"data": 1}, "dp", n=1, devices=jax.devices()[:1])
    state, m = _run_steps(mesh_shape, rules, grad_accum=grad_accum, n=1, devices=devices)
    assert m[0]["loss"] == pytest.approx(ref_m[0]["loss"], rel=1e-6)
    assert m[0]["grad_norm"] == pytest.approx(ref_m[0]["grad_norm"], rel=GRAD_RTOL)
    _, ref_grads, _ = reference
    _assert_within(state.params, ref_state.params, _adam_first_step_bound(ref_grads, float(ref_m[0]["grad_norm"])))

    ref_state, ref_m = _run_steps({"data": 1}, "dp", n=2, devices=jax.devices()[:1], opt=LARGE_EPS)
    state, m = _run_steps(mesh_shape, rules, grad_accum=grad_accum, n=2, devices=devices, opt=LARGE_EPS)
    for a, b in zip(m, ref_m):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_RTOL)
    # With eps = 1 an update is ~lr * g: the gradients' tolerance moves it by < 1e-9; what remains is a few ulps
    # of float32 rounding in the parameters themselves.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), state.params, ref_state.params)
    assert int(state.step) == 2 and int(state.skipped) == 0


def test_full_step_on_2x2x2_mesh_matches_single_device(single_device_reference):
    _assert_steps_match(single_device_reference, {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp")


def test_gradient_accumulation_equals_full_batch(single_device_reference):
    _assert_steps_match(single_device_reference, {"data": 8}, "dp", grad_accum=2)
    _, m = _run_steps({"data": 8}, "dp", grad_accum=2, n=1)
    assert m[0]["tokens"] == B * (L - 3)


def test_metrics_report_learning_rate_and_norms():
    _, m = _run_steps({"data": 8}, "dp", n=2)
    schedule = make_schedule(OPT)
    assert m[0]["learning_rate"] == pytest.approx(float(schedule(0)))
    assert m[1]["learning_rate"] == pytest.approx(float(schedule(1)))
    for k in ("grad_norm", "param_norm", "update_norm"):
        assert np.isfinite(m[0][k]) and m[0][k] > 0
    assert m[0]["loss"] == pytest.approx(np.log(CFG.vocab_size), rel=0.05)  # near-uniform at init


def test_nonfinite_step_is_skipped_and_training_continues():
    mesh = mesh_lib.make_mesh({"data": 8})
    r = rules_lib.get_rules("dp")
    state, sh = step_lib.init_train_state(CFG, OPT, mesh, r, jax.random.key(0))
    before = jax.device_get(state.params)
    poisoned_params = jax.tree.map(lambda x: x, state.params)
    # A NaN in one embedding row makes the loss of any batch containing that token NaN.
    poisoned_params["embed"]["embedding"] = poisoned_params["embed"]["embedding"].at[7].set(np.nan)
    fn = step_lib.jit_train_step(step_lib.make_train_step(CFG, OPT), mesh, r, sh, donate=False)
    batch = _batch()
    batch["inputs"][0, 0] = 7
    bad_state, m = fn(state.replace(params=poisoned_params), step_lib.make_global_batch(batch, mesh))
    assert int(m["nonfinite"]) == 1 and int(bad_state.skipped) == 1 and int(bad_state.step) == 1
    np.testing.assert_array_equal(jax.device_get(bad_state.params)["layers"]["block"]["mlp"]["w1"],
                                  before["layers"]["block"]["mlp"]["w1"])
    good_state, m2 = fn(state, step_lib.make_global_batch(_batch(1), mesh))
    assert int(m2["nonfinite"]) == 0 and np.isfinite(m2["loss"]) and int(good_state.skipped) == 0


def test_tiny_model_learns_a_synthetic_task():
    """Rows are arithmetic progressions mod 64: every next token is predictable from the previous two."""
    def batch_fn(i):
        rng = np.random.default_rng(100 + i)
        start = rng.integers(0, 64, (B, 1))
        stride = rng.integers(1, 4, (B, 1))
        toks = (start + stride * np.arange(L + 1)[None]) % 64
        return dict(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=np.ones((B, L), np.int32),
                    positions=np.arange(L)[None].repeat(B, 0), loss_mask=np.ones((B, L), np.int32))

    opt = OptimConfig(peak_lr=3e-3, warmup_steps=5, total_steps=60, final_lr_ratio=0.1)
    mesh = mesh_lib.make_mesh({"data": 8})
    r = rules_lib.get_rules("dp")
    state, sh = step_lib.init_train_state(CFG, opt, mesh, r, jax.random.key(0))
    fn = step_lib.jit_train_step(step_lib.make_train_step(CFG, opt), mesh, r, sh)
    losses = []
    for i in range(60):
        state, m = fn(state, step_lib.make_global_batch(batch_fn(i), mesh))
        losses.append(float(m["loss"]))
    assert losses[0] > 7.0
    assert np.mean(losses[-5:]) < 1.0, losses[::10]


def test_batch_the_mesh_cannot_split_is_named():
    mesh = mesh_lib.make_mesh({"data": 8})
    r = rules_lib.get_rules("dp")
    state, sh = step_lib.init_train_state(CFG, OPT, mesh, r, jax.random.key(0))
    fn = step_lib.jit_train_step(step_lib.make_train_step(CFG, OPT, grad_accum=4), mesh, r, sh)
    batch = {k: v[:12] for k, v in _batch().items()}
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by data x fsdp = 8"):
        fn(state, batch)
    with pytest.raises(ValueError, match="grad_accum=4"):
        fn(state, _batch())
    with pytest.raises(ValueError, match="missing key"):
        fn(state, {"inputs": _batch()["inputs"]})
