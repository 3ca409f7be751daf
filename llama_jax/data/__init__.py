"""llama_jax.data: tokenizer (``tokenizer``), embedded default corpus (``corpus``), grain input pipeline
(``pipeline``)."""
