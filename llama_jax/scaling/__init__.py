"""llama_jax.scaling."""
