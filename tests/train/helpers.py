"""Shared by the driver tests: the main job's experiment config, made small and fast for a test."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]


def pretrain_config(data_cache, arg, *, checkpoint_every, eval_batches, max_new_tokens, **updates):
    """`experiments/pretrain.py:ARG` on the shared data cache, synchronous checkpoints every
    `checkpoint_every` steps, no periodic eval, then `updates` ({"a.b": value}) applied."""
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "experiments/pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.data.cache_dir = data_cache
    c.checkpoint.update(every_steps=checkpoint_every, async_save=False)
    c.eval.update(every_steps=0, batches=eval_batches)
    c.sample.max_new_tokens = max_new_tokens
    for key, value in updates.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c
