"""llama_jax.data."""
