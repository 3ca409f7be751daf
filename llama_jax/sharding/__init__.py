"""llama_jax.sharding."""
