"""Post-training stage kinds: `sft`, `reward`, `rejection_sampling`, `dpo` (registered with the shared driver).

Each reads its settings from the stage's `options` (`experiment.stage(..., options={...})`),
validated by `options` when the experiment is resolved (unknown keys, missing data, bad values are errors).
A data setting is a jsonl path, or `stage:<name>/<file>`: a file an earlier stage of the same run wrote
(rejection sampling writes `sft.jsonl`, `preferences.jsonl`, `stats.json`), so a round's data comes from the
previous round's model. Every kind may report held-out task accuracy (`eval_prompts` + `verifier`: the mean
verifier score of greedy answers) at each evaluation and at its end; `sft` also reports it for the model it
starts from (`start_task_accuracy`).

Batch layouts (the batch contract, one sequence or packed dialogs per row):
- `sft`: dialogs packed greedily into rows (`segment_ids` keep them apart), loss on assistant turns only,
  next-token cross-entropy (the driver's default loss).
- `reward`: rows chosen, rejected, edited of each record side by side (an all-padding edited row when a record
  has none); the loss is `reward.ranking_loss` of the scalar head on each row's last token.
- `dpo`: rows chosen, rejected of each pair side by side, plus `ref_logps` ([B, L] float32 per-token log-probs of
  the frozen reference model, computed once when the stage's data is built); loss per pair
  `dpo.pair_losses` (formatting tokens masked out of both log-probs, NLL term on chosen, β 0.1, coefficient 0.2).
  The reference is the model the stage starts from (the previous stage's final parameters, or init_from).
- `rejection_sampling`: no training: exactly one step at learning rate 0 (warm-up from 0), so the stage's
  checkpoint is the model it started from; `finish` samples, scores, selects and writes the data.
Records are laid out so that the loss finds each record's rows without knowing how the batch was assembled
(`_Collate`): each of its strided grad_accum micro-batches, and the concatenation of the logical data shards'
rows, keep every record's rows adjacent. m = records per step per data shard must be a multiple of grad_accum.

Data sharding: every train iterator reads the driver's logical data shard `ctx.data_shard` (shard k of S
reads records k::S, `global_batch / S` rows per step; `llama_jax.data.hosts`), so the global batch depends
on S (fixed when the stage starts, `data.host_shards`), not on the process count, and a stage restarts on
any process count that divides S, exactly as pretraining does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from llama_jax import experiment
from llama_jax import workdir as workdir_lib
from llama_jax.model import transformer
from llama_jax.posttrain import data as data_lib
from llama_jax.posttrain import dpo as dpo_lib
from llama_jax.posttrain import rejection
from llama_jax.posttrain import reward as reward_lib
from llama_jax.train import kinds
from llama_jax.train import loss as loss_lib

# Every post-training kind: held-out task evaluation, and `start_from` (an earlier stage whose final parameters
# the stage starts from instead of the previous stage's; e.g. rejection sampling from the policy after a reward
# model stage).
_TASK = dict(eval_prompts="", verifier="", eval_max_new_tokens=16, start_from="")
STAGE_PREFIX = "stage:"


# ------------------------------------------------------------------------------------------ shared parts


def _check_options(kind: str, stage: str, raw: Mapping[str, Any], defaults: Mapping[str, Any],
                   required: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"stage {stage!r} ({kind}): unknown option(s) {unknown}; known: {sorted(defaults)}")
    out = dict(defaults)
    for key, value in raw.items():
        default = defaults[key]
        try:
            out[key] = type(default)(value) if not isinstance(default, bool) else bool(value)
        except (TypeError, ValueError):
            raise ValueError(f"stage {stage!r} ({kind}): options.{key}={value!r} is not a "
                             f"{type(default).__name__}") from None
    for key in required:
        if not out[key]:
            raise ValueError(f"stage {stage!r} ({kind}): options.{key} is required")
    for key, value in out.items():
        if isinstance(value, str) and value and key in ("dialogs", "preferences", "eval_dialogs",
                                                        "eval_preferences", "prompts", "eval_prompts"):
            for one in value.split(",") if key == "dialogs" else [value]:
                if not one.startswith(STAGE_PREFIX) and not os.path.isfile(one):
                    raise FileNotFoundError(f"stage {stage!r} ({kind}): options.{key} {one!r} does not exist")
    if "truncation" in out and out["truncation"] not in data_lib.TRUNCATION:
        raise ValueError(f"stage {stage!r} ({kind}): options.truncation={out['truncation']!r}; expected one of "
                         f"{data_lib.TRUNCATION}")
    if bool(out.get("eval_prompts")) != bool(out.get("verifier")) and "scorer" not in out:
        raise ValueError(f"stage {stage!r} ({kind}): options.eval_prompts and options.verifier go together")
    return out


def stage_references(options: Mapping[str, Any]) -> list[str]:
    """The earlier stages a kind's options read (`stage:<name>[/<file>]` values, comma-separated lists too)."""
    out = []
    for value in options.values():
        if isinstance(value, str):
            for one in value.split(","):
                if one.startswith(STAGE_PREFIX):
                    out.append(one[len(STAGE_PREFIX):].partition("/")[0])
    return out


class _PosttrainKind(kinds.StageKind):
    """A post-training kind: its `stage:` options must name earlier stages (checked by `experiment.resolve`)."""

    def stage_references(self, options: Mapping[str, Any]) -> list[str]:
        return stage_references(options)


def _opts(ctx) -> dict[str, Any]:
    return experiment.thaw(ctx.stage.options)


def _workdir(ctx) -> str:
    return ctx.writer.workdir


def resolve_path(ctx, spec: str) -> str:
    """A data setting: a path, or `stage:<name>/<file>` written by an earlier stage of this run."""
    if not spec.startswith(STAGE_PREFIX):
        return spec
    stage, _, name = spec[len(STAGE_PREFIX):].partition("/")
    if not stage or not name:
        raise ValueError(f"stage {ctx.stage.name!r}: {spec!r} must be 'stage:<name>/<file>'")
    path = workdir_lib.stage_output_path(_workdir(ctx), stage, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage {ctx.stage.name!r}: {spec!r} ({path}) does not exist; stage {stage!r} "
                                "must run before it and write it")
    return path


def data_shard(ctx) -> tuple[int, int]:
    """(shard, shard count) of the logical data shard a train iterator reads (`llama_jax.data.hosts`; the driver
    sets `ctx.data_shard`), or this process of all processes outside the driver."""
    return ctx.data_shard or (jax.process_index(), jax.process_count())


def _local_rows(ctx, phase: int, roles: int) -> tuple[int, int]:
    """(rows of this data shard per step, rows per role) for the phase, checked against the layout."""
    p = ctx.stage.phases[phase]
    _, shards = data_shard(ctx)
    if p.global_batch % shards:
        raise ValueError(f"stage {ctx.stage.name!r} ({ctx.stage.kind}): global batch {p.global_batch} is not "
                         f"divisible by the {shards} data shards")
    local = p.global_batch // shards
    if local % roles or (local // roles) % ctx.stage.grad_accum:
        raise ValueError(f"stage {ctx.stage.name!r} ({ctx.stage.kind}): {local} rows per data shard must hold "
                         f"{roles} roles x a multiple of grad_accum={ctx.stage.grad_accum} (global batch "
                         f"{p.global_batch}, {shards} data shards)")
    return local, local // roles


def _iterator(ctx, elements: list, batch: int, seed: int, collate=None):
    """A checkpointable (grain) iterator over this data shard's `elements` (shard k of S reads elements k::S),
    shuffled, repeated, batched, then `collate`d."""
    shard, shards = data_shard(ctx)
    elements = elements[shard::shards]
    if not elements:
        raise ValueError(f"stage {ctx.stage.name!r} ({ctx.stage.kind}): no training examples for data shard "
                         f"{shard} of {shards}")
    ds = grain.MapDataset.source(elements).shuffle(seed=seed).repeat().batch(batch, drop_remainder=True)
    if collate is not None:
        ds = ds.map(collate)
    # the rows are in memory already: read them on this thread (prefetch threads only cost start-up time)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def _split_roles(x, roles: int):
    """[B, ...] in the `_Collate` layout -> [roles] arrays of [B / roles, ...] (row i of each = one record).

    The layout makes every record's rows adjacent in groups of `roles`, in any batch, any of its strided
    gradient-accumulation micro-batches and whatever the number of data shards concatenated into it."""
    y = x.reshape((-1, roles) + x.shape[1:])
    return [y[:, r] for r in range(roles)]


class _Collate:
    """{role: {key: [m, L]}} -> {key: [m x roles, L]}: rows ordered (group, role, j) for record g * n + j, with
    n = grad_accum; the driver's micro-batch i takes rows i::n, i.e. records g * n + i, one row per role, record
    by record (`_split_roles`), and a batch of several data shards is their rows concatenated."""

    def __init__(self, roles, grad_accum: int = 1):
        self.roles, self.grad_accum = tuple(roles), int(grad_accum)

    def __call__(self, batch):
        keys = batch[self.roles[0]].keys()
        out = {}
        for k in keys:
            x = np.stack([batch[r][k] for r in self.roles])  # [R, m, ...]
            n, rest = self.grad_accum, x.shape[2:]
            x = x.reshape((len(self.roles), -1, n) + rest).swapaxes(0, 1)  # [m/n, R, n, ...]
            out[k] = x.reshape((-1,) + rest)
        return out


def start_params(ctx):
    """The parameters the stage starts from (its init source), on the default device."""
    origin, _, where = ctx.stage.init_source.partition(":")
    if origin == "previous":
        return workdir_lib.load(_workdir(ctx), stage=where)[1]
    if origin == "init_from":
        from llama_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                transformer.param_shapes(ctx.stage.model))
        return ckpt_lib.load_params(where, abstract)[0]
    raise ValueError(f"stage {ctx.stage.name!r} ({ctx.stage.kind}) needs a starting model: it cannot be the first "
                     "stage of a run trained from scratch (set init_from or put a training stage before it)")


_CACHE: dict[tuple, Any] = {}


def _cached(ctx, key: str, build):
    k = (_workdir(ctx), ctx.stage.name, key)
    if k not in _CACHE:
        _CACHE[k] = build()
    return _CACHE[k]


def _task_eval(ctx, params, o) -> dict[str, float]:
    if not o.get("eval_prompts") or not o.get("verifier"):
        return {}
    records, _ = data_lib.read_jsonl(resolve_path(ctx, o["eval_prompts"]), "prompt")
    verifier = rejection.load_verifier(o["verifier"])
    acc = rejection.task_accuracy(ctx.stage.model, params, ctx.tokenizer, records, verifier,
                                  int(o["eval_max_new_tokens"]))
    return {"task_accuracy": acc}


def _report(ctx, report: data_lib.ReadReport, dropped: int) -> dict:
    out = dict(report.to_json(), too_long=dropped)
    if report.skipped or dropped:
        ctx.writer.write_text(0, f"{ctx.stage.name}/data", json.dumps(out))
    return out


def _seq_logps(cfg, params, batch):
    """[B] summed masked log-probs and [B] counted tokens, plus [B, L] per-token log-probs."""
    logits, _ = transformer.apply(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    lp = loss_lib.token_logprobs(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(lp * mask, axis=1), jnp.sum(mask, axis=1), lp


def _host_batches(rows: list[dict], batch: int):
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        pad = [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch - len(chunk))
        yield len(chunk), {k: np.stack([r[k] for r in chunk + pad]) for k in chunk[0]}


# ------------------------------------------------------------------------------------------------- sft


class SFT(_PosttrainKind):
    """Supervised fine-tuning on dialogs: loss on assistant turns only, dialogs packed with document masks.

    Paper settings (Llama 3 §4.1.3) are the defaults of `posttrain.recipe.sft_stage` (LR 1e-5); settings here:
    dialogs (required; several files separated by commas are mixed), eval_dialogs, truncation ("drop" | "error"), task evaluation.
    """

    name = "sft"
    DEFAULTS = dict(dialogs="", eval_dialogs="", truncation="drop", **_TASK)

    def options(self, stage, raw, total_steps):
        return _check_options(self.name, stage, raw, self.DEFAULTS, ("dialogs",))

    def rows(self, ctx, path: str, seq_len: int, seed: int | None) -> tuple[list[dict], dict]:
        o = _opts(ctx)
        records, report = [], None
        for spec in path.split(","):  # several files: mixed (e.g. rejection-sampled + earlier SFT data)
            got, rep = data_lib.read_jsonl(resolve_path(ctx, spec), "dialog")
            records += got
            report = rep if report is None else data_lib.ReadReport(
                f"{report.path},{rep.path}", report.total + rep.total, report.kept + rep.kept,
                report.malformed + rep.malformed, report.examples + rep.examples)
        if seed is not None:
            records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
        seqs = [data_lib.encode_sft(ctx.tokenizer, r["messages"], seq_len, o["truncation"]) for r in records]
        kept = [s for s in seqs if s is not None]
        if not kept:
            raise ValueError(f"stage {ctx.stage.name!r}: every dialog of {path!r} is longer than the sequence "
                             f"length {seq_len}")
        return data_lib.pack_rows(kept, seq_len), _report(ctx, report, len(seqs) - len(kept))

    def train_iterator(self, ctx, phase, start_documents):
        p = ctx.stage.phases[phase]
        rows, _ = self.rows(ctx, _opts(ctx)["dialogs"], p.seq_len, ctx.stage.iterator_seed())
        local, _ = _local_rows(ctx, phase, 1)
        return _iterator(ctx, rows, local, ctx.stage.iterator_seed() + phase)

    def evaluate(self, ctx, params, phase, step):
        o = _opts(ctx)
        out = {}
        if o["eval_dialogs"]:
            p = ctx.stage.phases[phase]
            rows, _ = self.rows(ctx, o["eval_dialogs"], p.seq_len, None)
            fn = ctx.eval_step(p.seq_len, p.global_batch)
            total = count = 0.0
            for _, b in _host_batches(rows, p.global_batch):
                s, n = jax.device_get(fn(params, ctx.to_device(b)))
                total, count = total + float(s), count + float(n)
            out["loss"] = total / max(count, 1.0)
        out.update(_task_eval(ctx, params, o))
        return out

    def finish(self, ctx, state):
        o = _opts(ctx)
        reports = [data_lib.read_jsonl(resolve_path(ctx, spec), "dialog")[1].to_json()
                   for spec in o["dialogs"].split(",")]
        out = {"data": reports[0] if len(reports) == 1 else reports}
        start = _task_eval(ctx, start_params(ctx), o) if ctx.stage.init_source != "scratch" else {}
        if start:
            out["start_task_accuracy"] = start["task_accuracy"]
        return out


# ---------------------------------------------------------------------------------------------- reward


class _PreferenceKind(_PosttrainKind):
    """A kind trained on preference records: each step's rows are the records' `ROLES`, role-major."""

    ROLES: tuple[str, ...] = ()

    def examples(self, ctx, path: str, seq_len: int) -> list[dict]:
        raise NotImplementedError

    def train_iterator(self, ctx, phase, start_documents):
        p = ctx.stage.phases[phase]
        _, m = _local_rows(ctx, phase, len(self.ROLES))
        spec = _opts(ctx)["preferences"]
        examples = _cached(ctx, f"train:{spec}:{p.seq_len}", lambda: self.examples(ctx, spec, p.seq_len))
        return _iterator(ctx, examples, m, ctx.stage.iterator_seed() + phase,
                         _Collate(self.ROLES, ctx.stage.grad_accum))


class Reward(_PreferenceKind):
    """Reward model: the backbone's scalar head on the last token, pairwise ranking loss (edited > chosen >
    rejected). Settings: preferences (required), eval_preferences, truncation, task evaluation."""

    name = "reward"
    ROLES = ("chosen", "rejected", "edited")
    DEFAULTS = dict(preferences="", eval_preferences="", truncation="drop", **_TASK)

    def options(self, stage, raw, total_steps):
        return _check_options(self.name, stage, raw, self.DEFAULTS, ("preferences",))

    def examples(self, ctx, path: str, seq_len: int) -> list[dict]:
        o = _opts(ctx)
        records, report = data_lib.read_jsonl(resolve_path(ctx, path), "preference")
        out, dropped = [], 0
        for r in records:
            enc = data_lib.encode_preference(ctx.tokenizer, r, seq_len - 1, o["truncation"])
            if enc is None:
                dropped += 1
                continue
            out.append({role: data_lib.single_row(
                {"inputs": enc[role]["tokens"], "targets": np.zeros_like(enc[role]["tokens"]),
                 "loss_mask": np.zeros_like(enc[role]["tokens"])} if role in enc else None, seq_len)
                for role in self.ROLES})
        _report(ctx, report, dropped)
        if not out:
            raise ValueError(f"stage {ctx.stage.name!r}: no preference record of {path!r} fits the sequence "
                             f"length {seq_len}")
        return out

    def loss_fn(self, ctx):
        cfg, head = ctx.stage.model, reward_lib.reward_head_id(ctx.tokenizer)

        def loss(params, batch):
            r = reward_lib.rewards(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"], head)
            rc, rr, re = _split_roles(r, 3)
            has_edited = jnp.any(_split_roles(batch["segment_ids"], 3)[2] > 0, axis=1)
            return reward_lib.ranking_loss(rc, rr, re, has_edited)
        return loss

    def evaluate(self, ctx, params, phase, step):
        o = _opts(ctx)
        p = ctx.stage.phases[phase]
        examples = self.examples(ctx, o["eval_preferences"] or o["preferences"], p.seq_len)[:256]
        head = reward_lib.reward_head_id(ctx.tokenizer)
        fn = _cached(ctx, "reward_fn", lambda: jax.jit(
            lambda prm, b: reward_lib.rewards(ctx.stage.model, prm, b["inputs"], b["positions"], b["segment_ids"],
                                              head)))
        scores = {}
        for role in ("chosen", "rejected"):
            rows = [e[role] for e in examples]
            scores[role] = np.concatenate([np.asarray(fn(params, b))[:n] for n, b in _host_batches(rows, 32)])
        total, count = reward_lib.ranking_loss(scores["chosen"], scores["rejected"])
        out = {"ranking_loss": float(total) / float(count),
               "ranking_accuracy": float(reward_lib.ranking_accuracy(scores["chosen"], scores["rejected"])),
               "reward_margin": float(np.mean(scores["chosen"] - scores["rejected"]))}
        out.update(_task_eval(ctx, params, o))
        return out


# ------------------------------------------------------------------------------------------------- dpo


class DPO(_PreferenceKind):
    """Llama 3's DPO: frozen reference, formatting tokens masked, NLL on chosen (0.2), β 0.1.

    Settings: preferences (required), eval_preferences, beta, nll_coef, truncation, task evaluation.
    """

    name = "dpo"
    ROLES = ("chosen", "rejected")
    DEFAULTS = dict(preferences="", eval_preferences="", beta=dpo_lib.BETA, nll_coef=dpo_lib.NLL_COEF,
                    truncation="drop", **_TASK)

    def options(self, stage, raw, total_steps):
        out = _check_options(self.name, stage, raw, self.DEFAULTS, ("preferences",))
        if out["beta"] <= 0 or out["nll_coef"] < 0:
            raise ValueError(f"stage {stage!r} (dpo): beta={out['beta']} must be > 0 and nll_coef="
                             f"{out['nll_coef']} >= 0")
        return out

    def _reference_fn(self, ctx):
        return _cached(ctx, "ref_fn", lambda: jax.jit(lambda prm, b: _seq_logps(ctx.stage.model, prm, b)))

    def examples(self, ctx, path: str, seq_len: int) -> list[dict]:
        """Pairs of rows with the frozen reference model's per-token log-probs (`ref_logps`)."""
        o = _opts(ctx)
        records, report = data_lib.read_jsonl(resolve_path(ctx, path), "preference")
        pairs, dropped = [], 0
        for r in records:
            enc = data_lib.encode_preference(ctx.tokenizer, r, seq_len, o["truncation"])
            if enc is None:
                dropped += 1
                continue
            pairs.append({role: data_lib.single_row(enc[role], seq_len) for role in self.ROLES})
        _report(ctx, report, dropped)
        if not pairs:
            raise ValueError(f"stage {ctx.stage.name!r}: no preference record of {path!r} fits the sequence "
                             f"length {seq_len}")
        reference = _cached(ctx, "reference", lambda: start_params(ctx))
        fn = self._reference_fn(ctx)
        rows = [pair[role] for pair in pairs for role in self.ROLES]
        ref = []
        for n, b in _host_batches(rows, 32):
            ref.append(np.asarray(fn(reference, b)[2])[:n])
        ref = np.concatenate(ref).astype(np.float32)
        for i, row in enumerate(rows):
            row["ref_logps"] = ref[i] * (row["loss_mask"] > 0)
        return pairs

    def loss_fn(self, ctx):
        cfg, o = ctx.stage.model, _opts(ctx)
        beta, nll_coef = float(o["beta"]), float(o["nll_coef"])

        def loss(params, batch):
            logps, counts, _ = _seq_logps(cfg, params, batch)
            ref = jnp.sum(batch["ref_logps"] * batch["loss_mask"].astype(jnp.float32), axis=1)
            (pc, pr), (rc, rr), (nc, _) = (_split_roles(x, 2) for x in (logps, ref, counts))
            pair_mean, _ = dpo_lib.dpo_loss(pc, pr, rc, rr, beta)
            pairs = pc.shape[0]
            nll = -pc / jnp.maximum(nc, 1.0)  # per-token NLL of each chosen response
            return pair_mean * pairs + nll_coef * jnp.sum(nll), jnp.float32(pairs)
        return loss

    def evaluate(self, ctx, params, phase, step):
        o = _opts(ctx)
        p = ctx.stage.phases[phase]
        spec = o["eval_preferences"] or o["preferences"]
        pairs = _cached(ctx, f"eval:{spec}:{p.seq_len}", lambda: self.examples(ctx, spec, p.seq_len)[:256])
        fn = self._reference_fn(ctx)
        logps = {}
        for role in self.ROLES:
            rows = [pair[role] for pair in pairs]
            pol, ref = [], []
            for n, b in _host_batches(rows, 32):
                ref_b = b.pop("ref_logps")
                pol.append(np.asarray(fn(params, b)[0])[:n])
                ref.append(np.sum(ref_b, axis=1)[:n])
            logps[role] = (np.concatenate(pol), np.concatenate(ref))
        loss, m = dpo_lib.dpo_loss(logps["chosen"][0], logps["rejected"][0], logps["chosen"][1],
                                   logps["rejected"][1], float(o["beta"]))
        out = {"dpo_loss": float(loss), "reward_accuracy": float(m["reward_accuracy"]),
               "chosen_reward": float(np.mean(m["chosen_rewards"])),
               "rejected_reward": float(np.mean(m["rejected_rewards"])),
               "reward_margin": float(np.mean(m["chosen_rewards"] - m["rejected_rewards"]))}
        out.update(_task_eval(ctx, params, o))
        return out


# ------------------------------------------------------------------------------------ rejection sampling


class RejectionSampling(_PosttrainKind):
    """K samples per prompt, scored by a verifier or a reward model, the best kept as SFT data.

    Settings: prompts (required), k (paper 10-30), scorer ("verifier" | "reward"), verifier
    ("package.module:function"), reward_model (`stage:<name>` of this run or another workdir), sampler ("" = the
    model the stage starts from, or another workdir: a teacher), temperature, top_p, max_new_tokens, min_score
    (a best sample below it is not kept), batch_size (sequences per sampler call), task evaluation (with
    eval_verifier, or the scoring verifier when it is empty).
    Writes `sft.jsonl`, `preferences.jsonl` (best vs worst) and `stats.json` in the stage's directory.
    """

    name = "rejection_sampling"
    DEFAULTS = dict(prompts="", k=10, scorer="verifier", verifier="", reward_model="", sampler="",
                    temperature=1.0, top_p=1.0, max_new_tokens=32, min_score=float("-inf"), batch_size=64,
                    eval_prompts="", eval_verifier="", eval_max_new_tokens=16, start_from="")

    def options(self, stage, raw, total_steps):
        out = _check_options(self.name, stage, raw, self.DEFAULTS, ("prompts",))
        if total_steps != 1:
            raise ValueError(f"stage {stage!r} (rejection_sampling) trains nothing: give it steps=1 "
                             f"(got {total_steps} steps)")
        if out["k"] < 1 or out["max_new_tokens"] < 1 or out["batch_size"] < 1:
            raise ValueError(f"stage {stage!r} (rejection_sampling): k, max_new_tokens and batch_size must be >= 1")
        if out["scorer"] == "verifier" and not out["verifier"]:
            raise ValueError(f"stage {stage!r} (rejection_sampling): scorer 'verifier' needs options.verifier")
        if out["scorer"] == "reward" and not out["reward_model"]:
            raise ValueError(f"stage {stage!r} (rejection_sampling): scorer 'reward' needs options.reward_model")
        if out["scorer"] not in ("verifier", "reward"):
            raise ValueError(f"stage {stage!r} (rejection_sampling): scorer {out['scorer']!r}; expected 'verifier' "
                             "or 'reward'")
        return out

    def train_iterator(self, ctx, phase, start_documents):
        return _no_training_iterator(ctx, phase, self.name)

    def loss_fn(self, ctx):
        return lambda params, batch: (jnp.float32(0.0), jnp.float32(1.0))

    def evaluate(self, ctx, params, phase, step):
        o = _opts(ctx)
        verifier = o["eval_verifier"] or o["verifier"]
        return _task_eval(ctx, params, dict(o, verifier=verifier if o["eval_prompts"] else ""))

    def _scorer_model(self, ctx, sampler_cfg):
        spec = _opts(ctx)["reward_model"]
        if spec.startswith(STAGE_PREFIX):
            cfg, params = workdir_lib.load(_workdir(ctx), stage=spec[len(STAGE_PREFIX):])
        else:
            cfg, params = workdir_lib.load(spec)
        reward_lib.check_vocabulary(cfg, sampler_cfg, spec)
        return cfg, params

    def finish(self, ctx, state):
        o = _opts(ctx)
        records, report = data_lib.read_jsonl(resolve_path(ctx, o["prompts"]), "prompt")
        if o["sampler"]:
            cfg, params = workdir_lib.load(o["sampler"])
            reward_lib.check_vocabulary(cfg, ctx.stage.model, o["sampler"])
        else:
            cfg, params = ctx.stage.model, state.params
        responses = rejection.sample_responses(cfg, params, ctx.tokenizer, [r["prompt"] for r in records],
                                               int(o["k"]), int(o["max_new_tokens"]), float(o["temperature"]),
                                               float(o["top_p"]), seed=ctx.stage.iterator_seed(),
                                               batch_size=int(o["batch_size"]))
        if o["scorer"] == "verifier":
            scores = rejection.score_with_verifier(records, responses, rejection.load_verifier(o["verifier"]))
        else:
            rm_cfg, rm_params = self._scorer_model(ctx, cfg)
            scores = rejection.score_with_reward_model(rm_cfg, rm_params, ctx.tokenizer, records, responses,
                                                       int(o["batch_size"]))
        dialogs, pairs, stats = rejection.select(records, responses, scores, float(o["min_score"]))
        stats = dict(stats, sampler=o["sampler"] or "this stage's model", scorer=o["scorer"],
                     prompts_file=report.to_json())
        workdir = _workdir(ctx)
        if jax.process_index() == 0:
            data_lib.write_jsonl(workdir_lib.stage_output_path(workdir, ctx.stage.name, "sft.jsonl"), dialogs)
            data_lib.write_jsonl(workdir_lib.stage_output_path(workdir, ctx.stage.name, "preferences.jsonl"), pairs)
            workdir_lib.write_json_atomic(workdir_lib.stage_output_path(workdir, ctx.stage.name, "stats.json"), stats)
        logging.info("stage %r: kept %d of %d prompts (%d pairs); mean score %s", ctx.stage.name, stats["kept"],
                     stats["prompts"], stats["pairs"], stats["score_mean"])
        return {"rejection_sampling": stats}


# ----------------------------------------------------------------------------------------- averaging


def _no_training_iterator(ctx, phase: int, what: str):
    """The one step of a stage that trains nothing: learning rate 0 (warm-up from 0), one padding row."""
    optim = ctx.stage.optim
    if optim.warmup_steps < 1 or optim.init_lr != 0.0:
        raise ValueError(f"stage {ctx.stage.name!r} ({what}) must not change the model: its one step needs a "
                         "learning rate of 0 (warmup_steps >= 1 from init_lr 0)")
    p = ctx.stage.phases[phase]
    local, _ = _local_rows(ctx, phase, 1)
    return _iterator(ctx, [data_lib.single_row(None, p.seq_len)], local, 0)


def checkpoint_source(ctx, spec: str) -> str:
    """An averaging source: `stage:<name>` (an earlier stage of this run), another run's workdir (its last stage
    with a checkpoint) or a stage's checkpoint directory -> the checkpoint directory to read."""
    from llama_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415
    if spec.startswith(STAGE_PREFIX):
        name = spec[len(STAGE_PREFIX):]
        directory = workdir_lib.checkpoints_dir(_workdir(ctx), name)
    elif os.path.isfile(workdir_lib.config_path(spec)):
        config = workdir_lib.read_config(spec)
        names = [s["name"] for s in config.stages
                 if ckpt_lib.list_steps(workdir_lib.checkpoints_dir(spec, s["name"]))]
        if not names:
            raise FileNotFoundError(f"stage {ctx.stage.name!r} (average): workdir {spec!r} has no stage checkpoint")
        directory = workdir_lib.checkpoints_dir(spec, names[-1])
    else:
        directory = spec
    if not ckpt_lib.list_steps(directory):
        raise FileNotFoundError(f"stage {ctx.stage.name!r} (average): source {spec!r} has no checkpoint "
                                f"({directory})")
    return directory


class Average(_PosttrainKind):
    """Model averaging (Llama 3 §4.1.5) as a stage: the stage starts from Σ_i w_i p_i of its sources' newest
    parameters (`initial_params`; weights normalized, uniform by default) and trains nothing (one step at
    learning rate 0), so its checkpoint is the average and the next stage starts from it.

    Settings: sources (required, comma-separated: `stage:<name>` of this run, another run's workdir, or a
    stage's checkpoint directory), weights ("" = uniform, else one per source, comma-separated, >= 0),
    task evaluation. `finish` records the sources, their steps and the normalized weights.
    """

    name = "average"
    DEFAULTS = dict(sources="", weights="", eval_prompts="", verifier="", eval_max_new_tokens=16)

    def options(self, stage, raw, total_steps):
        out = _check_options(self.name, stage, raw, self.DEFAULTS, ("sources",))
        if total_steps != 1:
            raise ValueError(f"stage {stage!r} (average) trains nothing: give it steps=1 (got {total_steps} steps)")
        sources = [x.strip() for x in out["sources"].split(",")]
        if any(not x for x in sources):
            raise ValueError(f"stage {stage!r} (average): options.sources={out['sources']!r} has an empty entry")
        try:
            weights = [float(w) for w in out["weights"].split(",")] if out["weights"] else None
            from llama_jax.posttrain import averaging  # noqa: PLC0415
            averaging.normalized_weights(weights, len(sources))
        except ValueError as e:
            raise ValueError(f"stage {stage!r} (average): options.weights={out['weights']!r}: {e}") from None
        for x in sources:
            if not x.startswith(STAGE_PREFIX) and not os.path.isdir(x):
                raise FileNotFoundError(f"stage {stage!r} (average): source {x!r} does not exist")
        return out

    def _sources(self, ctx) -> tuple[list[str], list[float] | None]:
        o = _opts(ctx)
        sources = [x.strip() for x in o["sources"].split(",")]
        return sources, [float(w) for w in o["weights"].split(",")] if o["weights"] else None

    def initial_params(self, ctx, abstract_params):
        from llama_jax.posttrain import averaging  # noqa: PLC0415
        sources, weights = self._sources(ctx)
        directories = [checkpoint_source(ctx, s) for s in sources]
        try:
            params = averaging.average_checkpoints(directories, abstract_params, weights)
        except Exception as e:  # noqa: BLE001 - name the stage; restore errors name the tensor
            raise ValueError(f"stage {ctx.stage.name!r} (average): the sources {sources} cannot be averaged onto "
                             f"this stage's model {ctx.stage.model.name!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
        norm = averaging.normalized_weights(weights, len(sources))
        return params, "the average of " + ", ".join(f"{w:.4g} x {s}" for s, w in zip(sources, norm))

    def train_iterator(self, ctx, phase, start_documents):
        return _no_training_iterator(ctx, phase, self.name)

    def loss_fn(self, ctx):
        return lambda params, batch: (jnp.float32(0.0), jnp.float32(1.0))

    def evaluate(self, ctx, params, phase, step):
        return _task_eval(ctx, params, _opts(ctx))

    def finish(self, ctx, state):
        from llama_jax.posttrain import averaging  # noqa: PLC0415
        from llama_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415
        sources, weights = self._sources(ctx)
        return {"average": {"sources": sources, "weights": averaging.normalized_weights(weights, len(sources)),
                            "steps": [ckpt_lib.list_steps(checkpoint_source(ctx, s))[-1] for s in sources]}}


for _kind in (SFT(), Reward(), DPO(), RejectionSampling(), Average()):
    kinds.register(_kind)

__all__ = ["Average", "DPO", "RejectionSampling", "Reward", "SFT", "checkpoint_source", "resolve_path",
           "stage_references", "start_params"]
