"""llama_jax.posttrain."""
