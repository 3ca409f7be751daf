"""One entry point for every checkpoint format: detect a folder's format, load it, save to a format, convert.

    detect(path) -> "hf" | "meta" | "llama_jax" | "workdir" (a training run's workdir: its latest checkpoint)
    load(path, fmt=None, dtype="float32") -> (ModelConfig, params)
    save(path, fmt, cfg, params, **kw)
    convert(src, dst, src_fmt, dst_fmt, dtype=None, shard_size=..., tokenizer=None, weights_only=False)

Exports to "hf" and "gguf" carry the tokenizer (`llama_jax.interop.hf_tokenizer`): `tokenizer` (a path), else the
first of `hf_tokenizer.TOKENIZER_FILES` in `src`; without one the export stops with an error that says where
it looked, unless `weights_only`. A "llama_jax" output gets the source's tokenizer as `tokenizer.model` when
there is one.

What streams: reading HF and Meta checkpoints is tensor by tensor (memory-mapped); writing HF is one layer slice
at a time into shards of `shard_size`. In between, the converted params are held in host memory once (as
device arrays on the default device), so a conversion needs about one model's worth of host memory in the
output dtype (pass dtype="bfloat16" to halve it for f32 sources). Writing llama_jax (Orbax) also holds the
whole tree.
"""

from __future__ import annotations

import os
from typing import Any

from llama_jax.data.tokenizer import Tokenizer
from llama_jax.interop import hf, hf_tokenizer, meta, native
from llama_jax.model.config import ModelConfig

FORMATS = ("hf", "meta", "llama_jax", "workdir")
WRITABLE = ("hf", "llama_jax", "gguf")
GGUF_TYPES = ("float32", "float16", "bfloat16", "q8_0")  # llama_jax.interop.gguf.OUT_TYPES
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
        from llama_jax.train import resume  # noqa: PLC0415 - pulls in orbax/grain
        _check_workdir(path)
        return resume.load_workdir(os.fspath(path), dtype=dtype)
    if fmt == "llama_jax":
        return native.load(path, dtype=dtype)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")


def save(path: str | os.PathLike, fmt: str, cfg: ModelConfig, params: Params, tokenizer: Tokenizer | None = None,
         **kwargs) -> None:
    """Writes `path` in `fmt` with the tokenizer when given (gguf takes `outtype`, hf `shard_size` / `dtype`)."""
    if fmt == "hf":
        return hf.save(path, cfg, params, tokenizer=tokenizer, **kwargs)
    if fmt == "gguf":
        from llama_jax.interop import gguf  # noqa: PLC0415 - the gguf package, only for this format
        return gguf.save(path, cfg, params, tokenizer=tokenizer, **kwargs)
    if fmt == "llama_jax":
        return native.save(path, cfg, params, tokenizer=tokenizer)
    raise ValueError(f"cannot write format {fmt!r}; writable formats are {WRITABLE}")


def find_tokenizer(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   required: bool = True) -> Tokenizer | None:
    """`tokenizer` (a file or folder) if given, else the tokenizer stored in the checkpoint folder `src`;
    None when there is none and not `required`, else FileNotFoundError naming where it looked."""
    if tokenizer is not None:
        return hf_tokenizer.read(tokenizer)
    found = hf_tokenizer.find(src)
    if found is not None:
        return hf_tokenizer.read(found)
    if required:
        raise FileNotFoundError(f"no tokenizer found in {os.fspath(src)!r} (looked for "
                                f"{', '.join(hf_tokenizer.TOKENIZER_FILES)}); pass --tokenizer=PATH, or "
                                "--weights_only to export the weights without a tokenizer")
    return None


def _check_workdir(path: str | os.PathLike) -> None:
    from llama_jax import workdir  # noqa: PLC0415
    if not workdir.is_workdir(os.fspath(path)):
        raise FileNotFoundError(f"{os.fspath(path)!r} is not a training workdir: it has no config.json and stages/ "
                                "folder")


def convert(src: str | os.PathLike, dst: str | os.PathLike, src_fmt: str | None, dst_fmt: str,
            dtype: str | None = None, shard_size=hf.DEFAULT_SHARD_SIZE, tokenizer: str | os.PathLike | None = None,
            weights_only: bool = False) -> ModelConfig:
    """Reads `src` (format auto-detected when `src_fmt` is None) and writes `dst` in `dst_fmt`.

    `dtype`: float32 / bfloat16 / float16 for every format, and q8_0 for gguf. See the module docstring for
    the tokenizer rules (`tokenizer`, `weights_only`).
    """
    if dst_fmt not in WRITABLE:
        raise ValueError(f"cannot write format {dst_fmt!r}; writable formats are {WRITABLE}")
    if dst_fmt == "gguf" and dtype not in (None, *GGUF_TYPES):
        raise ValueError(f"dtype {dtype!r} is not a GGUF type; expected one of {GGUF_TYPES}")
    if dst_fmt != "gguf" and dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r} is only for --to=gguf; {dst_fmt} takes float32, bfloat16 or float16")
    if weights_only and tokenizer is not None:
        raise ValueError("pass either a tokenizer or weights_only, not both")
    if not os.path.exists(src):
        raise FileNotFoundError(f"input checkpoint {os.fspath(src)!r} does not exist")
    if not os.path.isdir(src):
        raise NotADirectoryError(f"input checkpoint {os.fspath(src)!r} is a file; give the checkpoint's folder")
    if src_fmt == "workdir":
        _check_workdir(src)
    tok = None if weights_only else find_tokenizer(src, tokenizer, required=dst_fmt in ("hf", "gguf"))
    if dst_fmt == "gguf":
        cfg, params = load(src, src_fmt, dtype="float32")
        save(dst, "gguf", cfg, params, tokenizer=tok, outtype=dtype or "float32")
        return cfg
    cfg, params = load(src, src_fmt, dtype=dtype or "float32")
    save(dst, dst_fmt, cfg, params, tokenizer=tok, **({"shard_size": shard_size} if dst_fmt == "hf" else {}))
    return cfg
