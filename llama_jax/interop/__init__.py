"""llama_jax.interop."""
