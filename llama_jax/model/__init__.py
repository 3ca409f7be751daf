"""The Llama 3 model: config presets and pure functions over parameter pytrees.

`config` (presets, ModelConfig) imports no JAX; the functions of `transformer` are loaded when first used, so an
experiment config that only names a preset stays light.
"""

from llama_jax.model import config
from llama_jax.model.config import ModelConfig, get

_TRANSFORMER = ("apply", "forward", "init", "init_cache", "param_logical_specs", "param_shapes", "stack_layers",
                "unstack_layers", "validate_tokens")


def __getattr__(name):
    if name in _TRANSFORMER:
        from llama_jax.model import transformer  # noqa: PLC0415
        return getattr(transformer, name)
    raise AttributeError(f"module 'llama_jax.model' has no attribute {name!r}")


__all__ = ["ModelConfig", "apply", "config", "forward", "get", "init", "init_cache", "param_logical_specs",
           "param_shapes", "stack_layers", "unstack_layers", "validate_tokens"]
