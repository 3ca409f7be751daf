"""The tiny experiment config the post-training stage tests run their stages in."""
import os

from llama_jax import experiment
from llama_jax.posttrain import data as data_lib


def config(tok_path, tmp_path, stages, max_seq_len: int = 128):
    """A 1-layer model on arithmetic text (written once into `tmp_path`), no checkpoints, eval or samples
    unless a test asks; `stages` as given."""
    text = str(tmp_path / "text.jsonl")
    if not os.path.exists(text):
        data_lib.write_jsonl(text, [{"text": f"What is {a} + {b}? {a} + {b} = {a + b}"}
                                    for a in range(12) for b in range(12)])
    c = experiment.base_config()
    c.tokenizer = tok_path
    c.model.update(dict(vocab_size=640, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=max_seq_len))
    c.data.sources = [dict(name="text", kind="jsonl", path=text, weight=1.0, split="all", eval_split="all")]
    c.checkpoint.update(dict(every_steps=0, async_save=False))
    c.eval.update(dict(every_steps=0, batches=0))
    c.sample.max_new_tokens = 0
    c.log_every_steps = 0
    c.stages = stages
    return c
