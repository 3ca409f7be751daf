"""The Llama 3 model: config presets and pure functions over parameter pytrees."""

from llama_jax.model import config
from llama_jax.model.config import ModelConfig, get
from llama_jax.model.transformer import (apply, forward, init, init_cache, param_logical_specs, param_shapes,
                                         stack_layers, unstack_layers, validate_tokens)

__all__ = ["ModelConfig", "apply", "config", "forward", "get", "init", "init_cache", "param_logical_specs",
           "param_shapes", "stack_layers", "unstack_layers", "validate_tokens"]
