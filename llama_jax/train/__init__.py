"""llama_jax.train."""
