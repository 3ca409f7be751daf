"""GGUF export: read back with the `gguf` package's reader, tensors equal (Q8_0 within its quantization error),
llama.cpp metadata, and a forward pass written from llama.cpp's conventions equal to llama_jax's."""

import math
import os
import subprocess
import sys

import gguf
import ml_dtypes
import numpy as np
import pytest

from llama_jax import model
from llama_jax.data.tokenizer import hf_token_to_bytes
from llama_jax.interop import checkpoints, gguf as gguf_export, hf_tokenizer, native
from tests.interop.helpers import SCALING, random_params, random_tokens, tiny_cfg

CFG = tiny_cfg(vocab_size=1280, max_seq_len=128)  # the fixture tokenizer's 1280 ids
SEQ = 96  # > original_max_position (32): the 3.1 frequency scaling (rope_freqs) matters
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def read(path):
    """(metadata {key: value}, tensors {name: float32 array in numpy [out, in] order}, types {name: type})."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32) for t in reader.tensors}
    return meta, tensors, {t.name: t.tensor_type.name for t in reader.tensors}


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's `LlamaModel.permute`: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(cfg, params):
    """Every GGUF tensor, built here from the llama_jax tree independently of the exporter."""
    p = {k: np.asarray(v, np.float32) for k, v in params["layers"]["block"]["attention"].items()}
    m = {k: np.asarray(v, np.float32) for k, v in params["layers"]["block"]["mlp"].items()}
    b = params["layers"]["block"]
    out = {"token_embd.weight": np.asarray(params["embed"]["embedding"]),
           "output_norm.weight": np.asarray(params["norm"]["scale"])}
    if not cfg.tie_embeddings:
        out["output.weight"] = np.asarray(params["lm_head"]).T
    for i in range(cfg.n_layers):
        q = p["wq"][i].reshape(cfg.dim, -1).T
        k = p["wk"][i].reshape(cfg.dim, -1).T
        out.update({
            f"blk.{i}.attn_q.weight": llama_cpp_permute(q, cfg.n_heads),
            f"blk.{i}.attn_k.weight": llama_cpp_permute(k, cfg.n_kv_heads),
            f"blk.{i}.attn_v.weight": p["wv"][i].reshape(cfg.dim, -1).T,
            f"blk.{i}.attn_output.weight": p["wo"][i].reshape(-1, cfg.dim).T,
            f"blk.{i}.ffn_gate.weight": m["w1"][i].T, f"blk.{i}.ffn_up.weight": m["w3"][i].T,
            f"blk.{i}.ffn_down.weight": m["w2"][i].T,
            f"blk.{i}.attn_norm.weight": np.asarray(b["attention_norm"]["scale"][i]),
            f"blk.{i}.ffn_norm.weight": np.asarray(b["ffn_norm"]["scale"][i])})
    return out


def meta_rope_freqs(cfg):
    """Meta's llama-models `apply_scaling`, as the divisor llama.cpp applies (freq / scaled freq)."""
    s, dh = cfg.rope_scaling, cfg.resolved_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2) / dh))
    low, high = s.original_max_position / s.low_freq_factor, s.original_max_position / s.high_freq_factor
    scaled = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high:
            scaled.append(f)
        elif wavelen > low:
            scaled.append(f / s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            scaled.append((1 - smooth) * f / s.factor + smooth * f)
    return freqs / np.asarray(scaled)


def llama_cpp_reference_logits(meta, t, tokens, use_rope_freqs=True):
    """Llama forward written from llama.cpp's graph: RMSNorm, "normal" (interleaved pair) RoPE with
    theta = pos * base^(-2i/n_rot) / rope_freqs[i], GQA with q head h reading kv head h // (H / K)."""
    n_head, n_kv = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    eps, base = float(meta["llama.attention.layer_norm_rms_epsilon"]), float(meta["llama.rope.freq_base"])
    n_rot, n_layer = int(meta["llama.rope.dimension_count"]), int(meta["llama.block_count"])
    ff = t["rope_freqs.weight"] if use_rope_freqs and "rope_freqs.weight" in t else np.ones(n_rot // 2)
    seq = len(tokens)
    theta = np.arange(seq)[:, None] * base ** (-2 * np.arange(n_rot // 2) / n_rot)[None] / ff[None]
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

    def rope(x):  # [S, heads, n_rot]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = t["token_embd.weight"][tokens].astype(np.float64)
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    for i in range(n_layer):
        w = lambda n: t[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, w("attn_norm"))
        q = rope((h @ w("attn_q").T).reshape(seq, n_head, -1))
        k = rope((h @ w("attn_k").T).reshape(seq, n_kv, -1))
        v = (h @ w("attn_v").T).reshape(seq, n_kv, -1)
        kv_of = np.arange(n_head) // (n_head // n_kv)
        scores = np.einsum("thd,shd->hts", q, k[:, kv_of]) / math.sqrt(q.shape[-1]) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", probs, v[:, kv_of]).reshape(seq, -1) @ w("attn_output").T
        h = norm(x, w("ffn_norm"))
        gate = h @ w("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    head = t.get("output.weight", t["token_embd.weight"])
    return norm(x, t["output_norm.weight"]) @ head.T


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=5)


@pytest.mark.parametrize("outtype", ["float32", "float16", "bfloat16", "q8_0"])
def test_tensors_read_back_equal(tmp_path, params, bpe_tokenizer, outtype):
    gguf_export.save(tmp_path / "m.gguf", CFG, params, tokenizer=bpe_tokenizer, outtype=outtype)
    meta, got, types = read(tmp_path / "m.gguf")
    want = expected_tensors(CFG, params)
    np.testing.assert_allclose(got.pop("rope_freqs.weight"), meta_rope_freqs(CFG), rtol=1e-6)
    assert sorted(got) == sorted(want)
    assert meta["general.file_type"] == {"float32": 0, "float16": 1, "bfloat16": 32, "q8_0": 7}[outtype]
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        if w.ndim == 1:  # norms stay float32
            assert types[name] == "F32"
            np.testing.assert_array_equal(got[name], w)
        elif outtype == "float32":
            np.testing.assert_array_equal(got[name], w)
        elif outtype == "float16":
            np.testing.assert_array_equal(got[name], w.astype(np.float16).astype(np.float32))
        elif outtype == "bfloat16":
            np.testing.assert_array_equal(got[name], w.astype(ml_dtypes.bfloat16).astype(np.float32))
        else:  # Q8_0: blocks of 32 along a row, int8 times an f16 scale amax / 127
            assert types[name] == "Q8_0"
            blocks = w.reshape(-1, 32)
            step = np.abs(blocks).max(-1, keepdims=True) / 127
            err = np.abs(got[name].reshape(-1, 32) - blocks)
            assert (err <= 0.57 * step).all(), name
            assert err.max() > 0  # really quantized


def test_metadata_and_tokenizer(tmp_path, params, bpe_tokenizer):
    gguf_export.save(tmp_path / "m.gguf", CFG, params, tokenizer=bpe_tokenizer, outtype="q8_0")
    meta, _, _ = read(tmp_path / "m.gguf")
    expect = {"general.architecture": "llama", "llama.vocab_size": 1280, "llama.context_length": 128,
              "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": CFG.ffn_dim,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
              "llama.attention.key_length": 16, "llama.attention.value_length": 16,
              "llama.rope.dimension_count": 16, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
              "tokenizer.ggml.bos_token_id": 1024, "tokenizer.ggml.eos_token_id": 1025,
              "tokenizer.ggml.eom_token_id": 1032, "tokenizer.ggml.eot_token_id": 1033,
              "tokenizer.ggml.padding_token_id": 1028, "tokenizer.ggml.add_bos_token": True,
              "tokenizer.chat_template": hf_tokenizer.CHAT_TEMPLATE}
    assert {k: meta[k] for k in expect} == expect
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(CFG.norm_eps)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 1280 and tokens[1024:] == list(bpe_tokenizer.special_tokens)
    ranks = bpe_tokenizer.model._mergeable_ranks
    assert [hf_token_to_bytes(t) for t in tokens[:1024]] == sorted(ranks, key=ranks.get)
    assert set(meta["tokenizer.ggml.token_type"][1024:]) == {3} and set(meta["tokenizer.ggml.token_type"][:1024]) == {1}
    _, merges = hf_tokenizer.vocab_and_merges(ranks)
    assert meta["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in merges]


@pytest.mark.parametrize("tie,scaling", [(False, SCALING), (True, None)])
def test_llama_cpp_convention_forward_equals_llama_jax(tmp_path, tie, scaling):
    cfg = CFG.replace(tie_embeddings=tie, rope_scaling=scaling)
    params = random_params(cfg, seed=6)
    gguf_export.save(tmp_path / "m.gguf", cfg, params)  # weights only: no tokenizer keys
    meta, t, _ = read(tmp_path / "m.gguf")
    assert "tokenizer.ggml.tokens" not in meta
    assert ("output.weight" in t) == (not tie) and ("rope_freqs.weight" in t) == (scaling is not None)
    tokens = random_tokens(cfg, (SEQ,), seed=7)
    ours = np.asarray(model.forward(cfg, params, tokens[None]))[0]
    ref = llama_cpp_reference_logits(meta, t, tokens)
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    if scaling is not None:  # the rope_freqs tensor is what carries the 3.1 scaling
        assert np.abs(llama_cpp_reference_logits(meta, t, tokens, use_rope_freqs=False) - ours).max() > 1e-3


def test_convert_cli_to_gguf_and_bad_input(tmp_path, params, bpe_tokenizer_path):
    native.save(tmp_path / "lj", CFG, params)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer found in .*lj.*--weights_only"):
        checkpoints.convert(tmp_path / "lj", tmp_path / "none.gguf", None, "gguf", dtype="q8_0")
    assert not os.path.exists(tmp_path / "none.gguf")
    with pytest.raises(ValueError, match="q8_0.*only for --to=gguf"):
        checkpoints.convert(tmp_path / "lj", tmp_path / "hf", None, "hf", dtype="q8_0", weights_only=True)
    with pytest.raises(ValueError, match="GGUF type 'int4'"):
        gguf_export.save(tmp_path / "x.gguf", CFG, params, outtype="int4")
    subprocess.run([sys.executable, "-m", "llama_jax.convert", "--from=llama_jax", "--to=gguf", "--dtype=q8_0",
                    f"--input={tmp_path / 'lj'}", f"--output={tmp_path / 'm.gguf'}",
                    f"--tokenizer={bpe_tokenizer_path}"], check=True, env=ENV, capture_output=True)
    meta, t, types = read(tmp_path / "m.gguf")
    assert meta["general.file_type"] == 7 and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert len(meta["tokenizer.ggml.tokens"]) == 1280
    assert sorted(os.listdir(tmp_path)) == ["lj", "m.gguf"]  # no temporary left behind
    assert checkpoints.GGUF_TYPES == tuple(gguf_export.OUT_TYPES)
    with pytest.raises(FileExistsError, match="exists"):
        gguf_export.save(tmp_path / "m.gguf", CFG, params)


def test_llama_cpp_logits_parity(tmp_path, params, bpe_tokenizer):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: PyPI has only its source distribution, whose "
        "llama.cpp build did not finish within 10 minutes on a 2-core machine; install it to run this check")
    gguf_export.save(tmp_path / "m.gguf", CFG, params, tokenizer=bpe_tokenizer)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, verbose=False,
                          n_threads=2)
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
    assert tokens == bpe_tokenizer.encode(text, bos=True)
    llm.eval(tokens)
    theirs = np.asarray(llm.scores[: len(tokens)])
    ours = np.asarray(model.forward(CFG, params, np.asarray([tokens])))[0]
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)
