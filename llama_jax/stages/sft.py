"""Stage kind `sft`: supervised fine-tuning on dialogs, loss on assistant turns only, dialogs packed into rows
with document masks (`segment_ids` keep them apart), next-token cross-entropy (the driver's default loss).

Paper settings (Llama 3 §4.1.3) are the defaults of `posttrain.recipe.sft_stage` (LR 1e-5). Options
(`stages.options.SFTOptions`): dialogs (several files are mixed, e.g. rejection-sampled + earlier SFT data),
eval_dialogs, truncation ("drop" | "error"), task evaluation. `finish` also reports the held-out task accuracy
of the model the stage started from (`start_task_accuracy`).
"""

from __future__ import annotations

import jax
import numpy as np

from llama_jax.posttrain import data as data_lib
from llama_jax.stages import common
from llama_jax.stages import options as options_lib
from llama_jax.train import kind as kind_lib


class SFT(kind_lib.StageKind):
    name = "sft"
    Options = options_lib.SFTOptions

    def batch_granule(self, stage) -> int:
        return common.granule(stage, 1)

    def check_data(self, stage) -> None:
        options = stage.options
        common.check_files(stage, (options.dialogs, "dialog"), (options.eval_dialogs, "dialog"), (options.eval_prompts, "prompt"))

    def read(self, ctx) -> tuple[list[dict], data_lib.ReadReport]:
        """Every dialog of the stage's files, with one read report over them."""
        records, report = [], None
        for spec in ctx.stage.options.dialogs:
            got, rep = common.read_records(ctx, spec, "dialog")
            records += got
            report = rep if report is None else data_lib.ReadReport(
                f"{report.path},{rep.path}", report.total + rep.total, report.kept + rep.kept,
                report.malformed + rep.malformed, report.examples + rep.examples)
        return records, report

    def rows(self, ctx, records: list[dict], seq_len: int, seed: int | None) -> tuple[list[dict], int]:
        """(packed rows, dialogs dropped as longer than seq_len) of `records`, shuffled by `seed` first."""
        if seed is not None:
            records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
        seqs = [data_lib.encode_sft(ctx.tokenizer, r["messages"], seq_len, ctx.stage.options.truncation)
                for r in records]
        kept = [s for s in seqs if s is not None]
        if not kept:
            files = ",".join(str(d) for d in ctx.stage.options.dialogs)
            raise ValueError(f"stage {ctx.stage.name!r}: every dialog of {files!r} is longer than the sequence "
                             f"length {seq_len}")
        return data_lib.pack_rows(kept, seq_len), len(seqs) - len(kept)

    def _train_rows(self, ctx, seq_len: int) -> list[dict]:
        records, report = self.read(ctx)
        rows, dropped = self.rows(ctx, records, seq_len, ctx.stage.iterator_seed())
        ctx.cache["data"] = common.report(ctx, report, dropped)  # DONE.json's `data`
        return rows

    def train_iterator(self, ctx, phase, start_documents):
        p = ctx.stage.phases[phase]
        rows = ctx.cached(("train", p.seq_len), lambda: self._train_rows(ctx, p.seq_len))  # once for all shards
        local, _ = common.local_rows(ctx, phase, 1)
        return common.example_iterator(ctx, rows, local, ctx.stage.iterator_seed() + phase)

    def evaluate(self, ctx, params, phase, step):
        options = ctx.stage.options
        out = {}
        if options.eval_dialogs:
            p = ctx.stage.phases[phase]
            records, _ = common.read_records(ctx, options.eval_dialogs, "dialog")
            rows, _ = self.rows(ctx, records, p.seq_len, None)
            fn = ctx.eval_step(p.seq_len, p.global_batch)
            total = count = 0.0
            for _, b in common.host_batches(rows, p.global_batch):
                s, n = jax.device_get(fn(params, ctx.to_device(b)))
                total, count = total + float(s), count + float(n)
            out["loss"] = total / max(count, 1.0)
        out.update(common.task_eval(ctx, params, options.eval_prompts, options.verifier, options.eval_max_new_tokens))
        return out

    def finish(self, ctx, state):
        options = ctx.stage.options
        if "data" not in ctx.cache:  # resumed at its end: the train data was not read in this process
            records, report = self.read(ctx)
            ctx.cache["data"] = common.report(ctx, report, self.rows(ctx, records, ctx.stage.phases[-1].seq_len,
                                                                     None)[1])
        out = {"data": ctx.cache["data"]}
        if ctx.stage.init_source != "scratch" and options.eval_prompts:
            start = common.task_eval(ctx, common.start_params(ctx), options.eval_prompts, options.verifier,
                                     options.eval_max_new_tokens, record=common.START_SCORES)
            out["start_task_accuracy"] = start["task_accuracy"]
        return out


__all__ = ["SFT"]
