"""Meta's consolidated checkpoints (`params.json` + `consolidated.NN.pth`) -> llama_jax.

    load(path, dtype="float32", shardings=None, max_seq_len=None) -> (ModelConfig, params)
    config_from_params(params_json: dict, name=...) -> ModelConfig

Model-parallel shards are merged along the axis each layer was split on in Meta's reference model
(fairscale layers): column-parallel `wq`, `wk`, `wv`, `w1`, `w3` and `output` on dim 0; row-parallel `wo`,
`w2` on dim 1; `tok_embeddings` on dim 0 for Llama 3 (`VocabParallelEmbedding`) and dim 1 for Llama 2
(`ParallelEmbedding`); the split axis of the embedding is read off the shard shapes. Norm gains are
replicated (shard 0 is used). Meta's RoPE rotates adjacent channel pairs (2i, 2i+1); llama_jax uses the
rotate-half layout (i, i + Dh/2), so the rows of every head of `wq` and `wk` are permuted once here
(the permutation of transformers' `convert_llama_weights_to_hf.py`).

Shards are read without torch by `llama_jax.interop.pth.load`: a restricted unpickler that builds tensors only
(any other pickled global is refused, so no code from the file runs) over a memory map of the shard, so tensors
are paged in from disk only when a layer is assembled and peak host memory is about one stacked [L, ...] tensor
(see `llama_jax.interop.hf.assemble`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import numpy as np

from llama_jax.interop import hf, pth
from llama_jax.model.config import ModelConfig, RopeScaling

Params = Any
PARAMS_FILE = "params.json"
# Meta's `apply_scaling` constants for `use_scaled_rope` (llama-models reference model).
META_ROPE_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

# HF per-layer name -> (Meta per-layer name, concat axis or None for replicated)
_LAYER_NAMES = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def config_from_params(p: dict, name: str = "meta", vocab_size: int | None = None,
                       max_seq_len: int | None = None) -> ModelConfig:
    """ModelConfig from Meta's params.json (FFN width by Meta's rule from ffn_dim_multiplier / multiple_of).

    `use_scaled_rope` selects Llama 3.1 scaling; optional `rope_scaling_factor` / `rope_high_freq_factor` keys
    (newer llama-models releases) override Meta's defaults of 8 and 4.
    """
    for key in ("dim", "n_layers", "n_heads"):
        if key not in p:
            raise ValueError(f"params.json is missing the required key {key!r}")
    vocab = int(p.get("vocab_size", -1))
    if vocab <= 0:
        if vocab_size is None:
            raise ValueError("params.json has no positive vocab_size and none was read from tok_embeddings")
        vocab = vocab_size
    scaling = None
    if p.get("use_scaled_rope", False):
        scaling = RopeScaling(factor=float(p.get("rope_scaling_factor") or META_ROPE_SCALING.factor),
                              low_freq_factor=META_ROPE_SCALING.low_freq_factor,
                              high_freq_factor=float(p.get("rope_high_freq_factor")
                                                     or META_ROPE_SCALING.high_freq_factor),
                              original_max_position=META_ROPE_SCALING.original_max_position)
    if max_seq_len is None:
        max_seq_len = 131_072 if scaling is not None else 8192
    return ModelConfig(
        name=name, vocab_size=vocab, dim=int(p["dim"]), n_layers=int(p["n_layers"]), n_heads=int(p["n_heads"]),
        n_kv_heads=int(p.get("n_kv_heads") or p["n_heads"]),
        ffn_dim_multiplier=float(p.get("ffn_dim_multiplier") or 1.0), multiple_of=int(p.get("multiple_of", 256)),
        norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", 10_000.0)),
        rope_scaling=scaling, max_seq_len=max_seq_len)


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a [n_heads*Dh, D] q/k weight from Meta's pair order (0,1),(2,3).. to rotate-half order:
    within each head, row 2i -> i and row 2i+1 -> Dh/2 + i."""
    rows, d = w.shape
    dh = rows // n_heads
    return w.reshape(n_heads, dh // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def rotate_half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_rotate_half`."""
    rows, d = w.shape
    dh = rows // n_heads
    return w.reshape(n_heads, 2, dh // 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def shard_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"no consolidated.NN.pth files in {path!r}")
    numbers = [int(re.search(r"consolidated\.(\d+)\.pth$", f).group(1)) for f in files]
    if numbers != list(range(len(files))):
        raise FileNotFoundError(f"model-parallel shards in {path!r} are not numbered 00..{len(files) - 1:02d}: "
                                f"{[os.path.basename(f) for f in files]}")
    return files


def load(path: str | os.PathLike, dtype="float32", shardings=None,
         max_seq_len: int | None = None) -> tuple[ModelConfig, Params]:
    """Loads a Meta consolidated checkpoint folder as (ModelConfig, scanned params in `dtype`)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Meta checkpoint directory {path!r} does not exist")
    pfile = os.path.join(path, PARAMS_FILE)
    if not os.path.isfile(pfile):
        raise FileNotFoundError(f"{pfile!r} not found: {path!r} is not a Meta consolidated checkpoint")
    with open(pfile) as f:
        pj = json.load(f)
    files = shard_files(path)
    shards = [pth.load(fn) for fn in files]
    for fn, sd in zip(files, shards):
        if not isinstance(sd, dict) or not all(isinstance(v, np.ndarray) for v in sd.values()):
            raise ValueError(f"{fn!r} is not a state dict of tensors")
    n = len(shards)
    if "tok_embeddings.weight" not in shards[0]:
        raise ValueError(f"{files[0]!r} has no 'tok_embeddings.weight'")
    emb0 = tuple(shards[0]["tok_embeddings.weight"].shape)
    dim = int(pj["dim"])
    # Vocab-parallel (Llama 3) shards are [V/n, D]; dim-parallel (Llama 2) are [V, D/n].
    emb_axis = 0 if emb0[1] == dim else 1
    vocab = emb0[0] * n if emb_axis == 0 else emb0[0]
    cfg = config_from_params(pj, name=os.path.basename(os.path.normpath(path)), vocab_size=vocab,
                             max_seq_len=max_seq_len)
    dt_name = hf.np_dtype(dtype).name
    if dt_name in ("float32", "bfloat16", "float16"):
        cfg = cfg.replace(param_dtype=dt_name)

    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{meta}" for i in range(cfg.n_layers) for meta, _ in _LAYER_NAMES.values()}
    for fn, sd in zip(files, shards):
        names = {k for k in sd if not k.endswith("rope.freqs")}
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        if missing or unexpected:
            raise ValueError(f"{fn!r} does not match params.json: missing tensors {missing[:8]}; "
                             f"unexpected tensors {unexpected[:8]}")

    def merged(meta_name: str, axis: int | None) -> np.ndarray:
        parts = [sd[meta_name] for sd in (shards[:1] if axis is None else shards)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)

    def get(hf_name: str) -> np.ndarray:
        if hf_name == "model.embed_tokens.weight":
            return merged("tok_embeddings.weight", emb_axis)
        if hf_name == "model.norm.weight":
            return merged("norm.weight", None)
        if hf_name == "lm_head.weight":
            return merged("output.weight", 0)
        m = _LAYER_RE.fullmatch(hf_name)
        meta_leaf, axis = _LAYER_NAMES[m.group(2)]
        w = merged(f"layers.{m.group(1)}.{meta_leaf}", axis)
        if meta_leaf == "attention.wq.weight":
            w = interleaved_to_rotate_half(w, cfg.n_heads)
        elif meta_leaf == "attention.wk.weight":
            w = interleaved_to_rotate_half(w, cfg.n_kv_heads)
        return w

    params = hf.assemble(cfg, get, dtype, shardings, where=path)
    del shards
    return cfg, params
