"""Stage kind `pretrain`: next-token prediction on the stage's mixture of packed documents.

Evaluation: the loss and perplexity on the sources' validation split (`config.eval.batches` batches of
`config.eval.global_batch` rows, or the phase's global batch); at the end, `config.sample`'s prompts continued
by the stage's model (written as text metrics and into DONE.json). `long_context` and `anneal` train the same
way and differ at the end of the stage.
"""

from __future__ import annotations

import math

import jax

from llama_jax.data import pipeline
from llama_jax.train import kind as kind_lib


def eval_loss(ctx: kind_lib.StageContext, params, seq_len: int, global_batch: int, batches: int
              ) -> tuple[float, float]:
    """(mean next-token loss, tokens) of `params` over `batches` batches of the sources' validation split."""
    fn = ctx.eval_step(seq_len, global_batch)
    total = count = 0.0
    for b in pipeline.make_eval_iterator(ctx.data_cfg, ctx.tokenizer, seq_len, global_batch, num_batches=batches):
        s, n = jax.device_get(fn(params, ctx.to_device(b)))
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise ValueError(f"stage {ctx.stage.name!r}: the evaluation split has no tokens at length {seq_len}")
    return total / count, count


class Pretrain(kind_lib.StageKind):
    """Next-token prediction on the stage's mixture of packed documents."""

    name = "pretrain"

    def train_iterator(self, ctx, phase, start_documents):
        p = ctx.stage.phases[phase]
        shard, shards = ctx.data_shard or (None, None)
        return pipeline.make_train_iterator(ctx.data_cfg, ctx.tokenizer, p.seq_len, p.global_batch,
                                            ctx.stage.iterator_seed(), process_index=shard, process_count=shards,
                                            start_documents=start_documents, track_documents=True,
                                            readers_here=ctx.readers_here)

    def evaluate(self, ctx, params, phase, step):
        p = ctx.stage.phases[phase]
        loss, tokens = eval_loss(ctx, params, p.seq_len, int(ctx.config.eval.global_batch) or p.global_batch,
                                 int(ctx.config.eval.batches))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}

    def finish(self, ctx, state):
        return {"samples": text_samples(ctx, state)}


def text_samples(ctx: kind_lib.StageContext, state) -> list[str]:
    """config.sample's prompts continued by the stage's model (written as text metrics)."""
    from llama_jax.infer import sampling  # noqa: PLC0415 - only needed at the end of a stage
    s = ctx.config.sample
    prompts = list(s.prompts)
    if not prompts or int(s.max_new_tokens) <= 0:
        return []
    tok = ctx.tokenizer
    ids = [tok.encode(p, bos=True) for p in prompts]
    cfg = ctx.stage.model.replace(remat="none")
    gen = sampling.generate(cfg, state.params, ids, max_new_tokens=int(s.max_new_tokens),
                            temperature=float(s.temperature), top_p=float(s.top_p), seed=int(s.seed),
                            stop_ids=tok.stop_ids)
    texts = [p + tok.decode(t) for p, t in zip(prompts, gen.tokens)]
    for t in texts:
        ctx.writer.write_text(int(jax.device_get(state.step)), f"{ctx.stage.name}/sample", t)
    return texts


__all__ = ["Pretrain", "eval_loss", "text_samples"]
