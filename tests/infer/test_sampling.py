"""Cached decoding equals the full forward pass; generation semantics (greedy, sampling, stops, padding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import model
from llama_jax.infer import sampling
from llama_jax.sharding import mesh as mesh_lib
from tests.interop.helpers import random_params, tiny_cfg

CFG = tiny_cfg(vocab_size=512)
PROMPTS = [[5, 17, 300, 42, 9], list(range(100, 137)), [7]]  # 37 tokens > original_max_position 32


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=2)


_forward = jax.jit(lambda p, t: model.forward(CFG, p, t))


def full_logits(params, seq, length=64):
    """Uncached logits of one sequence (right-padded to a fixed length: causal, so the pad changes nothing)."""
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(seq)] = seq
    return np.asarray(_forward(params, padded)[0, :len(seq)])


def greedy_uncached(params, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(full_logits(params, seq)[-1])))
    return seq[len(prompt):]


def test_cached_decode_logits_equal_full_forward_left_padded(params):
    """Prefill a left-padded batch into the cache, then feed each sequence's continuation one token at a time;
    at every step the logits equal the uncached forward of that sequence alone."""
    rng = np.random.default_rng(0)
    steps = 6
    conts = [rng.integers(0, CFG.vocab_size, steps).tolist() for _ in PROMPTS]
    p_len = 40
    tokens, positions, segments = sampling.left_pad(PROMPTS, p_len)
    cache = model.init_cache(CFG, len(PROMPTS), p_len + steps)
    apply = jax.jit(lambda p, t, pos, seg, c: model.apply(CFG, p, t, pos, seg, c))
    logits, cache = apply(params, tokens, positions, segments, cache)
    full = [full_logits(params, p + c) for p, c in zip(PROMPTS, conts)]
    for b, p in enumerate(PROMPTS):
        np.testing.assert_allclose(logits[b, p_len - len(p):], full[b][:len(p)], atol=1e-4)
    for t in range(steps):
        step_tok = np.array([[c[t]] for c in conts])
        pos = np.array([[len(p) + t] for p in PROMPTS])
        logits, cache = apply(params, step_tok, pos, np.ones_like(step_tok), cache)
        for b, p in enumerate(PROMPTS):
            np.testing.assert_allclose(logits[b, 0], full[b][len(p) + t], atol=1e-4)
    assert int(cache["index"]) == p_len + steps


def test_chunked_prefill_with_offset_equals_full_forward(params):
    """A prompt written in two chunks (the second at cache offset 16) gives the full forward's logits."""
    seq = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 40))
    cache = model.init_cache(CFG, 2, 48)
    apply = jax.jit(lambda p, t, c: model.apply(CFG, p, t, cache=c))
    first, cache = apply(params, seq[:, :16], cache)
    second, cache = apply(params, seq[:, 16:], cache)
    full = _forward(params, seq)
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=1e-4)


def test_greedy_generation_equals_uncached_greedy(params):
    gen = sampling.generate(CFG, params, PROMPTS, max_new_tokens=8)
    for prompt, out in zip(PROMPTS, gen.tokens):
        assert out == greedy_uncached(params, prompt, 8)
    assert gen.finish_reasons == ["length"] * 3 and gen.generated_tokens == 24
    assert gen.prompt_tokens == sum(map(len, PROMPTS)) and gen.decode_tokens_per_s > 0
    # Batching does not change a sequence's result.
    alone = sampling.generate(CFG, params, [PROMPTS[1]], max_new_tokens=8)
    assert alone.tokens[0] == gen.tokens[1]


def test_stop_ids_end_each_sequence(params):
    greedy = sampling.generate(CFG, params, PROMPTS, max_new_tokens=8).tokens
    stop = greedy[0][3]
    gen = sampling.generate(CFG, params, PROMPTS, max_new_tokens=8, stop_ids=[stop, 511])
    assert gen.tokens[0] == greedy[0][:3] and gen.finish_reasons[0] == "stop"
    for b in (1, 2):
        expect = greedy[b][:greedy[b].index(stop)] if stop in greedy[b] else greedy[b]
        assert gen.tokens[b] == expect


def test_sampling_seeds_and_limits(params):
    kw = dict(max_new_tokens=8, temperature=1.0)
    a = sampling.generate(CFG, params, PROMPTS, seed=3, **kw).tokens
    assert a == sampling.generate(CFG, params, PROMPTS, seed=3, **kw).tokens
    assert a != sampling.generate(CFG, params, PROMPTS, seed=4, **kw).tokens
    greedy = sampling.generate(CFG, params, PROMPTS, max_new_tokens=8).tokens
    assert sampling.generate(CFG, params, PROMPTS, seed=3, top_k=1, **kw).tokens == greedy
    assert sampling.generate(CFG, params, PROMPTS, seed=3, top_p=1e-6, **kw).tokens == greedy


def test_sample_logits_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    top_k = sampling.sample_logits(logits, keys, temperature=1.0, top_k=2)
    assert set(np.unique(top_k)) == {0, 1}
    top_p = sampling.sample_logits(logits, keys, temperature=1.0, top_p=0.85)  # keeps 0.5, 0.3, 0.15
    assert set(np.unique(top_p)) == {0, 1, 2}
    full = np.bincount(np.asarray(sampling.sample_logits(logits, keys, temperature=1.0)), minlength=4) / 2000
    np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_sharded_params_pass_through(params):
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "context": 1, "tensor": 4})
    specs = jax.tree.map(lambda _: PartitionSpec(), params)
    specs["layers"]["block"]["mlp"] = {"w1": PartitionSpec(None, None, "tensor"),
                                       "w3": PartitionSpec(None, None, "tensor"),
                                       "w2": PartitionSpec(None, "tensor", None)}
    specs["embed"]["embedding"] = PartitionSpec("fsdp", None)
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    gen = sampling.generate(CFG, sharded, PROMPTS, max_new_tokens=6)
    assert gen.tokens == sampling.generate(CFG, params, PROMPTS, max_new_tokens=6).tokens


def test_bad_requests_are_named(params):
    with pytest.raises(ValueError, match="token id 512"):
        sampling.generate(CFG, params, [[1, 512]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len 256"):
        sampling.generate(CFG, params, [[1] * 200], max_new_tokens=100)
    with pytest.raises(ValueError, match="quantize"):
        sampling.generate(CFG, params, [[1]], quantize="int4")
