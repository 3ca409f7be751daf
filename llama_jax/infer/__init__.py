"""llama_jax.infer."""
