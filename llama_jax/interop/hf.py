"""Hugging Face Llama checkpoints (config.json + safetensors) <-> llama_jax (ModelConfig, scanned params).

    load(path, dtype="float32", shardings=None) -> (ModelConfig, params)
    save(path, cfg, params, shard_size="5GB", dtype=None)
    config_from_hf(hf_config: dict, name=...) -> ModelConfig;  config_to_hf(cfg, dtype) -> dict

Tensor mapping (HF `nn.Linear` weights are [out, in]; ours are [in, out] with heads split out):
    model.embed_tokens.weight            [V, D]      embed/embedding               [V, D]
    model.layers.i.self_attn.q_proj      [H*Dh, D]   layers/block/attention/wq     [L, D, H, Dh]
    model.layers.i.self_attn.k_proj/v    [K*Dh, D]   layers/block/attention/wk,wv  [L, D, K, Dh]
    model.layers.i.self_attn.o_proj      [D, H*Dh]   layers/block/attention/wo     [L, H, Dh, D]
    model.layers.i.mlp.gate_proj/up_proj [F, D]      layers/block/mlp/w1, w3       [L, D, F]
    model.layers.i.mlp.down_proj         [D, F]      layers/block/mlp/w2           [L, F, D]
    model.layers.i.input_layernorm       [D]         layers/block/attention_norm/scale [L, D]
    model.layers.i.post_attention_layernorm [D]      layers/block/ffn_norm/scale   [L, D]
    model.norm.weight                    [D]         norm/scale                    [D]
    lm_head.weight                       [V, D]      lm_head                       [D, V] (absent when tied)

HF stores q/k in the rotate-half RoPE layout, which is the layout llama_jax uses, so no permutation is needed
here (Meta's interleaved layout is handled in `llama_jax.interop.meta`).

Memory: `load` streams tensor by tensor through `safetensors.safe_open` (memory-mapped); it assembles one
stacked [L, ...] array at a time on the host and hands it to the device (with `shardings`, straight to its
shards) before starting the next, so peak host memory beyond the result is about one stacked tensor. `save`
reads one layer slice at a time from the (possibly device-resident) params and writes a shard file whenever
`shard_size` bytes have accumulated, so peak host memory is about one shard.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llama_jax.interop import hf_tokenizer
from llama_jax.model.config import ModelConfig, RopeScaling

Params = Any
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 1024**3

# Our leaf under layers/block -> HF per-layer tensor name (after "model.layers.{i}.").
LAYER_TENSORS: dict[tuple[str, str], str] = {
    ("attention", "wq"): "self_attn.q_proj.weight",
    ("attention", "wk"): "self_attn.k_proj.weight",
    ("attention", "wv"): "self_attn.v_proj.weight",
    ("attention", "wo"): "self_attn.o_proj.weight",
    ("mlp", "w1"): "mlp.gate_proj.weight",
    ("mlp", "w3"): "mlp.up_proj.weight",
    ("mlp", "w2"): "mlp.down_proj.weight",
    ("attention_norm", "scale"): "input_layernorm.weight",
    ("ffn_norm", "scale"): "post_attention_layernorm.weight",
}
# Tensors HF keeps in a checkpoint that carry no parameters (buffers from old exports).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def np_dtype(dtype) -> np.dtype:
    """numpy dtype for a name such as "bfloat16" (ml_dtypes provides bfloat16 / float8 for numpy)."""
    if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):
        return np.dtype(getattr(ml_dtypes, dtype))
    return np.dtype(dtype)


# ------------------------------------------------------------------------------------------------ config


def config_from_hf(hf: dict, name: str = "hf") -> ModelConfig:
    """ModelConfig from a HF `config.json` dict (`rope_scaling` or the newer `rope_parameters` form)."""
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"config.json model_type={model_type!r}; only 'llama' checkpoints are supported")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if key in hf and hf[key] != want:
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported (Llama 3 uses {want!r})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"config.json is missing the required key {key!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(k in rope for k in ("full_attention", "sliding_attention")):
        raise ValueError(f"config.json has per-layer-type rope parameters {sorted(rope)}; not a Llama config")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        scaling = None
    elif rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in rope]
        if missing:
            raise ValueError(f"config.json llama3 rope parameters are missing {missing}")
        scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position=int(rope["original_max_position_embeddings"]))
    else:
        raise ValueError(f"config.json rope_type={rope_type!r} is not supported; expected 'llama3' or 'default'")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) == dim // n_heads and dim % n_heads == 0:
        head_dim = None
    return ModelConfig(
        name=name, vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=None if head_dim is None else int(head_dim), ffn_dim_override=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 8192)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)))


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json for `LlamaForCausalLM`; written in both the `rope_parameters` (transformers >= 5) and the
    `rope_theta` + `rope_scaling` (transformers 4.x) forms, which agree."""
    if cfg.rope_scaling is None:
        rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        rope_scaling = None
    else:
        s = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings":
                        s.original_max_position}
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": dtype, "torch_dtype": dtype,
    }
    if cfg.vocab_size == 128_256:  # the Llama 3 tokenizer's special ids
        out.update(bos_token_id=128_000, eos_token_id=[128_001, 128_008, 128_009])
    return out


# --------------------------------------------------------------------------------- per-tensor conversions


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a HF checkpoint of `cfg` holds, with its shape."""
    d, h, k, dh, f, v = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.ffn_dim,
                         cfg.vocab_size)
    per_layer = {"self_attn.q_proj.weight": (h * dh, d), "self_attn.k_proj.weight": (k * dh, d),
                 "self_attn.v_proj.weight": (k * dh, d), "self_attn.o_proj.weight": (d, h * dh),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
                 "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    out = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg.n_layers):
        out.update({f"model.layers.{i}.{n}": s for n, s in per_layer.items()})
    out["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def _to_ours(cfg: ModelConfig, key: tuple[str, str], w: np.ndarray) -> np.ndarray:
    """One layer's HF tensor -> our per-layer layout."""
    d, dh = cfg.dim, cfg.resolved_head_dim
    group, leaf = key
    if group.endswith("norm"):
        return w
    if leaf in ("wq", "wk", "wv"):
        return w.T.reshape(d, w.shape[0] // dh, dh)
    if leaf == "wo":
        return w.T.reshape(w.shape[1] // dh, dh, d)
    return w.T  # w1, w3: [F, D] -> [D, F]; w2: [D, F] -> [F, D]


def _to_hf(key: tuple[str, str], w: np.ndarray) -> np.ndarray:
    """One layer of our tensor -> HF layout (contiguous)."""
    group, leaf = key
    if group.endswith("norm"):
        return np.ascontiguousarray(w)
    if leaf in ("wq", "wk", "wv"):
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
    if leaf == "wo":
        return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
    return np.ascontiguousarray(w.T)


def _check_shape(name: str, got: tuple, want: tuple, where: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"tensor {name!r} in {where} has shape {tuple(got)} but the config expects {tuple(want)}")


def assemble(cfg: ModelConfig, get: Callable[[str], np.ndarray], dtype="float32", shardings=None,
             where: str = "checkpoint") -> Params:
    """Builds the scanned llama_jax params from a HF-named tensor source, one stacked tensor at a time.

    `get(hf_name)` returns the tensor in HF layout (any float dtype); each is shape-checked against `cfg`.
    `shardings` (optional, same tree structure as the params) places every array as soon as it is built.
    Used by `load` here and by `llama_jax.interop.meta`.
    """
    dt = np_dtype(dtype)
    want = hf_shapes(cfg)

    def fetch(name):
        w = get(name)
        _check_shape(name, w.shape, want[name], where)
        return w

    def place(path, arr):
        s = shardings
        for p in path:
            s = None if s is None else s[p]
        return jax.device_put(arr, s) if s is not None else jax.device_put(arr)

    params: dict = {"embed": {"embedding": place(("embed", "embedding"),
                                                 fetch("model.embed_tokens.weight").astype(dt))}}
    block: dict = {}
    for key, hf_leaf in LAYER_TENSORS.items():
        stacked = None
        for i in range(cfg.n_layers):
            w = _to_ours(cfg, key, fetch(f"model.layers.{i}.{hf_leaf}"))
            if stacked is None:
                stacked = np.empty((cfg.n_layers,) + w.shape, dt)
            stacked[i] = w
        block.setdefault(key[0], {})[key[1]] = place(("layers", "block") + key, stacked)
        del stacked
    params["layers"] = {"block": block}
    params["norm"] = {"scale": place(("norm", "scale"), fetch("model.norm.weight").astype(dt))}
    if not cfg.tie_embeddings:
        params["lm_head"] = place(("lm_head",), np.ascontiguousarray(fetch("lm_head.weight").T).astype(dt))
    return params


# ------------------------------------------------------------------------------------------------- load


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = os.fspath(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face checkpoint directory {path!r} does not exist")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file!r} not found: {path!r} is not a Hugging Face model folder")
    with open(cfg_file) as f:
        hf = json.load(f)
    return config_from_hf(hf, name=hf.get("_name_or_path") or os.path.basename(os.path.normpath(path)))


def weight_map(path: str | os.PathLike) -> dict[str, str]:
    """tensor name -> safetensors file (from the index, or the single `model.safetensors`)."""
    path = os.fspath(path)
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            wm = json.load(f).get("weight_map")
        if not isinstance(wm, dict):
            raise ValueError(f"{index!r} has no 'weight_map'")
        missing_files = sorted({fn for fn in wm.values() if not os.path.isfile(os.path.join(path, fn))})
        if missing_files:
            raise FileNotFoundError(f"{index!r} refers to missing shard files: {missing_files}")
        return dict(wm)
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"neither {INDEX_FILE!r} nor {SINGLE_FILE!r} found in {path!r}")
    with safe_open(single, framework="numpy") as f:
        return {name: SINGLE_FILE for name in f.keys()}


def load(path: str | os.PathLike, dtype="float32", shardings=None) -> tuple[ModelConfig, Params]:
    """Loads a HF Llama folder as (ModelConfig, scanned params in `dtype`), streaming tensor by tensor.

    Raises FileNotFoundError for missing config / weight files, and ValueError naming the tensor for a shape
    that does not match config.json, or for missing / unexpected tensor names.
    """
    path = os.fspath(path)
    cfg = read_config(path)
    dt_name = np_dtype(dtype).name
    if dt_name in ("float32", "bfloat16", "float16"):
        cfg = cfg.replace(param_dtype=dt_name)
    wm = weight_map(path)
    want = hf_shapes(cfg)
    present = {n for n in wm if not _IGNORED.fullmatch(n)}
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")  # some tied exports also store the (identical) head
    missing = sorted(set(want) - present)
    unexpected = sorted(present - set(want))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match its config.json: missing tensors {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}; unexpected tensors {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def get(name):
            fn = wm[name]
            if fn not in handles:
                handles[fn] = stack.enter_context(safe_open(os.path.join(path, fn), framework="numpy"))
            shape = tuple(handles[fn].get_slice(name).get_shape())
            _check_shape(name, shape, want[name], os.path.join(path, fn))
            return handles[fn].get_tensor(name)

        params = assemble(cfg, get, dtype, shardings, where=path)
    return cfg, params


# ------------------------------------------------------------------------------------------------- save


def iter_hf_tensors(cfg: ModelConfig, params: Params, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) in HF order, one layer slice at a time (device arrays are fetched lazily)."""
    def host(x):
        a = np.asarray(jax.device_get(x))
        return a.astype(np_dtype(dtype)) if dtype is not None else a

    yield "model.embed_tokens.weight", host(params["embed"]["embedding"])
    block = params["layers"]["block"]
    for i in range(cfg.n_layers):
        for key, hf_leaf in LAYER_TENSORS.items():
            yield f"model.layers.{i}.{hf_leaf}", _to_hf(key, host(block[key[0]][key[1]][i]))
    yield "model.norm.weight", host(params["norm"]["scale"])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(host(params["lm_head"]).T)


def parse_size(size) -> int:
    """Bytes of a shard size such as 5GB, 500MB or 1000000 (an int is taken as is); ValueError unless positive."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"shard_size {size!r} is not a byte count like 5GB, 500MB or 1000000")
        n = int(float(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"shard_size {size!r} is not positive")
    return n


def _check_params(cfg: ModelConfig, params: Params) -> None:
    if "layers" not in params or "block" not in params["layers"]:
        raise ValueError("params must be the scanned tree (layers/block/...); use model.stack_layers first")
    if cfg.tie_embeddings == ("lm_head" in params):
        raise ValueError(f"cfg.tie_embeddings={cfg.tie_embeddings} but params "
                         f"{'have' if 'lm_head' in params else 'lack'} an 'lm_head'")


def save(path: str | os.PathLike, cfg: ModelConfig, params: Params, shard_size=DEFAULT_SHARD_SIZE,
         dtype=None, overwrite: bool = False, tokenizer=None) -> None:
    """Writes a HF Llama folder (config.json, safetensors shards of at most `shard_size` bytes, and
    `model.safetensors.index.json` when there is more than one shard) that transformers loads.

    With `tokenizer` (a `llama_jax.data.tokenizer.Tokenizer`) the folder also gets tokenizer.json,
    tokenizer_config.json (with the chat template) and generation_config.json (`llama_jax.interop.hf_tokenizer`),
    and config.json its BOS / stop ids.

    `dtype` (e.g. "bfloat16") casts on the way out; default keeps the params' dtype. The folder is assembled
    in a staging sibling and renamed into place (`staging`), so an interrupted or failed save (a full disk)
    leaves nothing half-written.
    """
    path = os.path.abspath(os.fspath(path))
    _check_params(cfg, params)
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists and is not empty; pass overwrite=True to replace it")
    limit = parse_size(shard_size)
    if tokenizer is not None and tokenizer.n_words > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_words} ids but model {cfg.name!r} has a vocabulary of "
                         f"{cfg.vocab_size}")
    with staging(path) as tmp:
        names_per_shard: list[list[str]] = []
        current: dict[str, np.ndarray] = {}
        current_bytes, total, out_dtype = 0, 0, None

        def flush():
            nonlocal current, current_bytes
            if current:
                save_file(current, os.path.join(tmp, f"shard-{len(names_per_shard):05d}.tmp"),
                          metadata={"format": "pt"})
                names_per_shard.append(list(current))
                current, current_bytes = {}, 0

        for name, arr in iter_hf_tensors(cfg, params, dtype):
            out_dtype = out_dtype or arr.dtype.name
            if current and current_bytes + arr.nbytes > limit:
                flush()
            current[name] = arr
            current_bytes += arr.nbytes
            total += arr.nbytes
        flush()
        n = len(names_per_shard)
        weight_map_out = {}
        for i, names in enumerate(names_per_shard):
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(tmp, f"shard-{i:05d}.tmp"), os.path.join(tmp, final))
            weight_map_out.update({name: final for name in names})
        if n > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map_out}, f, indent=2)
        hf_config = config_to_hf(cfg, out_dtype or "float32")
        if tokenizer is not None:
            hf_tokenizer.save(tmp, tokenizer, model_max_length=cfg.max_seq_len)
            hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=list(tokenizer.stop_ids))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(hf_config, f, indent=2)


# A save assembles its output in `<path>.tmp-XXXX` holding an exclusive flock on `.lock` inside it; the kernel
# drops the lock when the process dies, so a staging folder whose lock can be taken is left over from an
# interrupted save (kill -9, power loss) and is removed by the next save to the same path.
STAGING_SUFFIX = ".tmp-"
_STAGING_LOCK = ".lock"
_UNLOCKED_GRACE_S = 60.0  # a staging folder without a lock file is another save's only in its first instant


def _lock_staging(tmp: str) -> int:
    fd = os.open(os.path.join(tmp, _STAGING_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@contextlib.contextmanager
def staging(path: str | os.PathLike, file: bool = False) -> Iterator[str]:
    """Yields a new staging folder `<path>.tmp-XXXX` beside `path` (first removing what interrupted saves to
    `path` left) for the caller to write its output into. When the block ends, the folder is renamed to `path`,
    or with `file` its file `basename(path)` is; an existing `path` is replaced (callers check `overwrite`).

    On any error the staging folder is removed, so nothing half-written is left, and an OSError of the system
    (a full disk, a quota, an I/O error) is raised again as an OSError that names `path` and says so.
    """
    path = os.path.abspath(os.fspath(path))
    tmp, lock = None, None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        remove_stale_staging(path)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + STAGING_SUFFIX, dir=os.path.dirname(path))
        lock = _lock_staging(tmp)
        yield tmp
        if file:
            os.replace(os.path.join(tmp, os.path.basename(path)), path)
            shutil.rmtree(tmp)
        else:
            if os.path.exists(path):
                shutil.rmtree(path)
            os.remove(os.path.join(tmp, _STAGING_LOCK))
            os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        code = e.errno if isinstance(e, OSError) else None
        if isinstance(e, OSError) and code is None and len(e.args) == 1 and isinstance(e.args[0], int):
            code = e.args[0]  # OSError(errno.ENOSPC)
        if code is not None:  # a system error, not one of our own messages (which carry no errno)
            raise OSError(code, f"could not write {path} ({os.strerror(code)}); nothing was written") from e
        raise
    finally:
        if lock is not None:
            os.close(lock)


def remove_stale_staging(path: str | os.PathLike) -> list[str]:
    """Removes the staging folders (`<path>.tmp-*`) that interrupted saves to `path` left behind; folders of a
    save still running (its lock held) are kept. Returns the removed folders."""
    path = os.path.abspath(os.fspath(path))
    parent, prefix = os.path.dirname(path), os.path.basename(path) + STAGING_SUFFIX
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        tmp = os.path.join(parent, name)
        if not name.startswith(prefix) or not os.path.isdir(tmp) or os.path.islink(tmp):
            continue
        lock_path = os.path.join(tmp, _STAGING_LOCK)
        if not os.path.exists(lock_path):
            if time.time() - os.path.getmtime(tmp) < _UNLOCKED_GRACE_S:
                continue
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:  # its save just finished or cleaned up
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a save in progress
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            finally:
                os.close(fd)
        removed.append(tmp)
    return removed
