"""Presets: FFN-width rule, exact parameter counts from eval_shape, errors."""

import jax
import numpy as np
import pytest

from llama_jax import model
from llama_jax.model import config


@pytest.mark.parametrize("name,ffn", [("llama3.1-8b", 14336), ("llama3.1-70b", 28672), ("llama3.1-405b", 53248),
                                      ("llama3.2-1b", 8192), ("llama3.2-3b", 8192)])
def test_ffn_width_rule(name, ffn):
    assert config.get(name).ffn_dim == ffn


@pytest.mark.parametrize("name,billions", [("llama3.1-8b", 8.03), ("llama3.1-70b", 70.55),
                                           ("llama3.1-405b", 405.85), ("llama3.2-1b", 1.24),
                                           ("llama3.2-3b", 3.21)])
def test_param_counts_match_paper_without_allocation(name, billions):
    cfg = config.get(name)
    shapes = model.param_shapes(cfg)  # jax.eval_shape: nothing is allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == cfg.param_count()
    assert round(n / 1e9, 2) == billions


def test_tied_presets_have_no_head():
    assert "lm_head" not in model.param_shapes(config.get("llama3.2-1b"))
    assert "lm_head" in model.param_shapes(config.get("llama3.1-8b"))


def test_llama3_rope_settings():
    cfg = config.get("llama3.1-8b")
    assert cfg.rope_theta == 500_000 and cfg.rope_scaling.factor == 8 and cfg.norm_eps == 1e-5
    assert config.get("llama3.2-1b").rope_scaling.factor == 32
    assert cfg.vocab_size == 128_256 and cfg.n_kv_heads == 8 and cfg.resolved_head_dim == 128


def test_flops_per_token_formula():
    cfg = config.get("llama3.1-405b")
    # 6·N (non-embedding matmuls + head) + 6·L·H·Dh·T; at 405B the head is 128256·16384 and the embedding
    # gather is free, so 6·(N_total − V·D) plus the attention term.
    n_matmul = cfg.param_count() - cfg.vocab_size * cfg.dim - cfg.n_layers * 2 * cfg.dim - cfg.dim
    expected = 6 * n_matmul + 6 * cfg.n_layers * cfg.n_heads * 128 * 8192
    assert cfg.flops_per_token(8192) == pytest.approx(expected)
    # 15.6T tokens at 8K gives about 3.8e25 FLOPs (paper §1) within 10%.
    assert cfg.flops_per_token(8192) * 15.6e12 == pytest.approx(3.8e25, rel=0.1)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
        config.get("llama9")


def test_bad_fields_are_named():
    with pytest.raises(ValueError, match="n_kv_heads"):
        config.get("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        config.get("tiny", remat="sometimes")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        config.get("tiny", hidden=3)
