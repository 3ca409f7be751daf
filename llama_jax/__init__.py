"""llama_jax: the Llama 3 herd recipe in JAX/Flax."""
