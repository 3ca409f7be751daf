"""llama_jax's own checkpoint format: an Orbax checkpoint of the (scanned) params plus the model config.

    DIR/model_config.json    the ModelConfig fields (RopeScaling as a nested dict)
    DIR/params/              Orbax StandardCheckpointer directory of the params pytree
    DIR/tokenizer.model      the tokenizer (Meta format), when saved with one

    save(path, cfg, params, tokenizer=None)
    load(path, cfg=None, dtype=None, shardings=None) -> (cfg, params)

`load` also takes a bare Orbax directory (no model_config.json beside it; pass `cfg`): either a params tree
itself, or a tree holding the params under a top-level "params" key (e.g. a train state), from which only the
params are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax import model
from llama_jax.interop import hf, hf_tokenizer
from llama_jax.interop.hf import np_dtype
from llama_jax.model.config import ModelConfig, RopeScaling

Params = Any
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"model config has unknown field(s) {unknown}")
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelConfig(**d)


def read_config(path: str | os.PathLike) -> ModelConfig:
    with open(os.path.join(os.fspath(path), CONFIG_FILE)) as f:
        return config_from_dict(json.load(f))


def is_native(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def save(path: str | os.PathLike, cfg: ModelConfig, params: Params, tokenizer=None) -> None:
    """Writes the folder `path` (which must not exist or be empty): `params/` (Orbax), `model_config.json` and,
    with `tokenizer` (a `llama_jax.data.tokenizer.Tokenizer`), `tokenizer.model`. The folder is assembled in a
    staging sibling and renamed into place (`llama_jax.interop.hf.staging`), so an interrupted or failed save
    (a full disk) leaves nothing half-written and can simply be run again."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path!r} exists and is not an empty folder")
    if "layers" not in params:
        raise ValueError("params must be the scanned tree (layers/block/...)")
    with hf.staging(path) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, hf_tokenizer.META_TOKENIZER))


def _abstract_target(cfg: ModelConfig, dtype, shardings):
    shapes = model.param_shapes(cfg)
    dt = None if dtype is None else np_dtype(dtype)
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt or s.dtype), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dt or s.dtype, sharding=sh), shapes, shardings)


def _check_shapes(cfg: ModelConfig, target, params, where: str) -> None:
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(target)}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want.keys() != got.keys():
        raise ValueError(f"Orbax checkpoint {where!r} does not match model config {cfg.name!r}: missing "
                         f"{sorted(want.keys() - got.keys())}, unexpected {sorted(got.keys() - want.keys())}")
    for name, shape in want.items():
        if tuple(got[name]) != tuple(shape):
            raise ValueError(f"tensor {name} in {where!r} has shape {tuple(got[name])} but model config "
                             f"{cfg.name!r} expects {tuple(shape)}")


def load(path: str | os.PathLike, cfg: ModelConfig | None = None, dtype=None,
         shardings=None) -> tuple[ModelConfig, Params]:
    """Restores (cfg, params). Without `shardings` arrays are restored on the host and put on the default
    device; with `shardings` (a pytree like the params) each array is restored directly into its shards."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"llama_jax checkpoint directory {path!r} does not exist")
    if is_native(path):
        stored = read_config(path)
        cfg = stored if cfg is None else cfg
        ckpt_dir = os.path.join(path, PARAMS_DIR)
    else:
        if cfg is None:
            raise FileNotFoundError(f"{os.path.join(path, CONFIG_FILE)!r} not found; pass cfg to load the bare "
                                    f"Orbax directory {path!r}")
        ckpt_dir = path
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"Orbax params directory {ckpt_dir!r} does not exist")
    target = _abstract_target(cfg, dtype, shardings)
    with ocp.PyTreeCheckpointer() as ckptr:
        stored_tree = ckptr.metadata(ckpt_dir).item_metadata.tree
        nested = isinstance(stored_tree, dict) and "params" in stored_tree and "embed" not in stored_tree
        item = {"params": target} if nested else target
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        try:
            restored = ckptr.restore(ckpt_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=nested))
        except (ValueError, KeyError) as e:
            raise ValueError(f"Orbax checkpoint {ckpt_dir!r} does not match model config {cfg.name!r}: {e}") from e
    params = restored["params"] if nested else restored
    _check_shapes(cfg, target, params, ckpt_dir)
    if shardings is None:
        params = jax.tree.map(lambda a: jax.device_put(np.asarray(a)), params)
    return cfg, params
