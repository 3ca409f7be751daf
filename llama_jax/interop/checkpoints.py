"""One entry point for every checkpoint format: detect a folder's format, load it, save to a format, convert.

    detect(path) -> "hf" | "meta" | "llama_jax" | "workdir" (a training run's workdir: its latest checkpoint)
    load(path, fmt=None, dtype="float32") -> (ModelConfig, params)
    save(path, fmt, cfg, params, **kw)
    convert(src, dst, src_fmt, dst_fmt, dtype=None, shard_size=...)

What streams: reading HF and Meta checkpoints is tensor by tensor (memory-mapped); writing HF is one layer slice
at a time into shards of `shard_size`. In between, the converted params are held in host memory once (as
device arrays on the default device), so a conversion needs about one model's worth of host memory in the
output dtype (pass dtype="bfloat16" to halve it for f32 sources). Writing llama_jax (Orbax) also holds the
whole tree.
"""

from __future__ import annotations

import os
from typing import Any

from llama_jax.interop import hf, meta, native
from llama_jax.model.config import ModelConfig

FORMATS = ("hf", "meta", "llama_jax", "workdir")
Params = Any


def detect(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if native.is_native(path):
        return "llama_jax"
    from llama_jax import workdir  # noqa: PLC0415
    if workdir.is_workdir(path):
        return "workdir"
    if os.path.isfile(os.path.join(path, hf.CONFIG_FILE)):
        return "hf"
    if os.path.isfile(os.path.join(path, meta.PARAMS_FILE)):
        return "meta"
    raise ValueError(f"cannot tell the format of {path!r}: no {native.CONFIG_FILE}, {hf.CONFIG_FILE} or "
                     f"{meta.PARAMS_FILE} in it")


def load(path: str | os.PathLike, fmt: str | None = None, dtype="float32") -> tuple[ModelConfig, Params]:
    fmt = fmt or detect(path)
    if fmt == "hf":
        return hf.load(path, dtype=dtype)
    if fmt == "meta":
        return meta.load(path, dtype=dtype)
    if fmt == "workdir" or (fmt == "llama_jax" and detect(path) == "workdir"):
        from llama_jax import workdir  # noqa: PLC0415 - pulls in orbax/grain
        return workdir.load(os.fspath(path), dtype=dtype)
    if fmt == "llama_jax":
        return native.load(path, dtype=dtype)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")


def save(path: str | os.PathLike, fmt: str, cfg: ModelConfig, params: Params, **kwargs) -> None:
    if fmt == "hf":
        return hf.save(path, cfg, params, **kwargs)
    if fmt == "llama_jax":
        return native.save(path, cfg, params)
    raise ValueError(f"cannot write format {fmt!r}; writable formats are 'hf' and 'llama_jax'")


def convert(src: str | os.PathLike, dst: str | os.PathLike, src_fmt: str | None, dst_fmt: str,
            dtype: str | None = None, shard_size=hf.DEFAULT_SHARD_SIZE) -> ModelConfig:
    """Reads `src` (format auto-detected when `src_fmt` is None) and writes `dst` in `dst_fmt`."""
    if dst_fmt not in ("hf", "llama_jax"):
        raise ValueError(f"cannot write format {dst_fmt!r}; writable formats are 'hf' and 'llama_jax'")
    cfg, params = load(src, src_fmt, dtype=dtype or "float32")
    save(dst, dst_fmt, cfg, params, **({"shard_size": shard_size} if dst_fmt == "hf" else {}))
    return cfg
