"""The IsoFLOP sweep runner: every run of a sweep experiment trained as its own one-stage experiment.

An experiment with a `sweep` block (`experiments/scaling_laws.py`) lists each run as an ordinary pretrain stage.
Runs are independent (each from scratch, with its own model shape), so the runner does not chain them as the
driver chains stages: it gives each stage its own workdir `<workdir>/runs/<name>/` and calls the driver's public
entry (`llama_jax.train.driver.run_experiment`) on a one-stage copy of the experiment, the same experiment that
`python -m llama_jax.main --config=experiments/scaling_laws.py:VARIANT,run=NAME` runs.

* Resumable: a run the driver finished (its DONE.json) and recorded is skipped; an interrupted run resumes
  from its checkpoints; a restarted sweep retries runs that failed before, and re-scores finished runs whose
  multiple-choice settings (`sweep.mc`) changed.
* A failed run (an exception, or a non-finite held-out loss) is reported and recorded with `status: "failed"`
  and its error; the sweep goes on, and the fit leaves it out.
* One progress line per run (start and end) on stderr, with the sweep's elapsed time and its ETA by FLOPs.
* `<workdir>/runs.jsonl`: one JSON object per run, rewritten atomically after each: the plan (`flops` = the
  budget, `flops_spent`, `params`, `tokens`, shape, batch, LR) plus `loss` (held-out NLL per token at the end),
  `mc_nll` / `mc_acc` (`llama_jax.scaling.downstream`), `wall_s` and `status`. `<workdir>/sweep.json` holds the
  sweep block (forecast target, multiple-choice settings). The embedded corpus and tokenizer are built once in
  `<workdir>/data_cache` (unless `data.cache_dir` is set) and shared by the runs; `sweep.tokenizer_ranks`
  (unless `tokenizer` is set) trains the embedded BPE tokenizer with that many ranks (+ 256 specials).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from typing import Any, Callable

import ml_collections
from absl import logging

RUNS_FILE = "runs.jsonl"
SWEEP_FILE = "sweep.json"


def runs_path(workdir: str) -> str:
    return os.path.join(workdir, RUNS_FILE)


def read_runs(workdir: str, numbers: tuple[str, ...] = ()) -> list[dict]:
    """The records of `<workdir>/runs.jsonl` ([] if there is none yet). A line that is not a JSON object, or a
    run not marked failed (`status` "ok" or none) that lacks one of the keys `numbers` as a number, is a
    ValueError naming the file and the line."""
    path = runs_path(workdir)
    if not os.path.exists(path):
        return []
    records = []
    with open(path, "rb") as f:  # bytes: json.loads decodes them, so bad UTF-8 is reported with its line too
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            if record.get("status", "ok") == "ok":
                bad = [k for k in numbers if isinstance(record.get(k), bool)
                       or not isinstance(record.get(k), (int, float))]
                if bad:
                    raise ValueError(f"{path}, line {number}: run {record.get('name', '?')!r} needs a number for "
                                     f"each of {bad}")
            records.append(record)
    return records


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_runs(workdir: str, records: list[dict]) -> None:
    _write_atomic(runs_path(workdir), "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def run_config(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The one-stage experiment of run `name` (no sweep block): what the driver trains."""
    sub = copy.deepcopy(c)
    with sub.unlocked():
        if "sweep" in sub:
            del sub["sweep"]
        stages = [st for st in sub.stages if st["name"] == name]
        if not stages:
            raise ValueError(f"unknown run {name!r}; runs: {[st['name'] for st in c.stages]}")
        sub.stages = stages
    return sub


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:500]


def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_sweep(c: ml_collections.ConfigDict, workdir: str, train: Callable[[Any, str], dict] | None = None,
              stream=None) -> list[dict]:
    """Runs (or resumes) every run of the sweep experiment `c` in `workdir`; returns the run records.

    `train(config, workdir) -> {stage name: final metrics}` is the driver's entry (default
    `llama_jax.train.driver.run_experiment` with the stage kinds of `llama_jax.stages`).
    """
    import jax  # noqa: PLC0415

    from llama_jax.data import corpus, pipeline  # noqa: PLC0415
    from llama_jax.scaling import downstream  # noqa: PLC0415
    from llama_jax import workdir as workdir_lib  # noqa: PLC0415
    from llama_jax.stages import KINDS  # noqa: PLC0415
    from llama_jax.train import driver, resume  # noqa: PLC0415

    if "sweep" not in c:
        raise ValueError("the experiment has no sweep block (config.sweep); run it with llama_jax.main instead")
    train = train or (lambda config, run_dir: driver.run_experiment(config, run_dir, KINDS))
    stream = stream or sys.stderr
    workdir = os.path.abspath(workdir)
    os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
    c = copy.deepcopy(c)
    with c.unlocked():
        c.data.cache_dir = c.data.cache_dir or os.path.join(workdir, "data_cache")
        ranks = int(c.sweep.get("tokenizer_ranks", 0))
        if ranks and not c.tokenizer:  # a smaller embedded tokenizer, so the output layer does not dominate N
            corpus.default_tokenizer(c.data.cache_dir, vocab_size=ranks)
            c.tokenizer = os.path.join(corpus.corpus_dir(c.data.cache_dir), f"tokenizer-{ranks}.model")
    plans = {r["name"]: (r.to_dict() if hasattr(r, "to_dict") else dict(r)) for r in c.sweep.runs}
    names = [st["name"] for st in c.stages]
    if set(plans) != set(names):
        raise ValueError(f"config.sweep.runs {sorted(plans)} do not match the stages {sorted(names)}")
    lead = jax.process_index() == 0
    if lead:
        _write_atomic(os.path.join(workdir, SWEEP_FILE), json.dumps(c.sweep.to_dict(), indent=1, sort_keys=True))
    records = {r["name"]: r for r in read_runs(workdir) if r.get("name") in plans}

    tokenizer = driver.load_tokenizer(c, workdir)
    items_cache: list = []

    def mc_items():
        if not items_cache:
            mc = c.sweep.mc
            texts = []
            for spec in pipeline.parse_sources(c.data.to_dict()):
                docs = pipeline.source_documents(spec, spec.eval_split, c.data.cache_dir, 0, 1)
                texts += [docs[j] for j in range(len(docs))]
            items_cache.extend(downstream.build_items(texts, tokenizer, int(mc.n_items), int(mc.context_tokens),
                                                      int(mc.choice_tokens), int(mc.seed)))
        return items_cache

    total_flops = sum(p["flops_spent"] for p in plans.values())
    t_start, flops_run, flops_done = time.perf_counter(), 0.0, 0.0
    for i, name in enumerate(names, 1):
        plan = plans[name]
        run_dir = os.path.join(workdir, "runs", name)
        head = f"[isoflop {i}/{len(names)}] {name}"
        done_file = os.path.join(run_dir, "stages", name, "DONE.json")
        old = records.get(name)
        mc_settings = c.sweep.mc.to_dict()
        if (old is not None and old.get("status") == "ok" and old.get("mc") == mc_settings
                and os.path.exists(done_file)):
            flops_done += plan["flops_spent"]
            print(f"{head}: finished before (loss {old['loss']:.4f}); skipped", file=stream, flush=True)
            continue
        print(f"{head}: {plan['flops']:.3g} FLOPs, N {_si(plan['params'])}, D {_si(plan['tokens'])} tokens "
              f"({plan['steps']} steps x {plan['global_batch']} x {plan['seq_len']}), lr {plan['peak_lr']:.2e}",
              file=stream, flush=True)
        t0 = time.perf_counter()
        trained_before = os.path.exists(done_file)  # only re-scored: not counted in the training rate
        rec = dict(plan, mc=mc_settings)
        try:
            final = train(run_config(c, name), run_dir)[name]
            loss = float(final.get("eval_loss", math.nan))
            if not math.isfinite(loss):
                raise FloatingPointError(f"held-out loss is {loss}")
            cfg, params = resume.load_workdir(run_dir, stage=name)
            rec.update(loss=loss, tokens_trained=int(final["tokens"]),
                       **downstream.score(cfg, params, mc_items(), tokenizer.bos_id))
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a failed run is recorded and left out of the fit, not fatal
            rec.update(status="failed", error=_one_line(e))
            logging.warning("sweep run %r failed: %s", name, rec["error"])
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        records[name] = rec
        if lead:
            write_runs(workdir, [records[n] for n in names if n in records])
        flops_run += 0.0 if trained_before else plan["flops_spent"]
        flops_done += plan["flops_spent"]
        elapsed = time.perf_counter() - t_start
        eta = (total_flops - flops_done) * elapsed / flops_run if flops_run else math.nan
        n_ok = sum(r.get("status") == "ok" for r in records.values())
        n_failed = sum(r.get("status") == "failed" for r in records.values())
        outcome = (f"loss {rec['loss']:.4f}, mc acc {rec['mc_acc']:.3f}" if rec["status"] == "ok"
                   else f"FAILED: {rec['error']}")
        print(f"{head} done in {_duration(rec['wall_s'])}: {outcome} | {n_ok} ok, {n_failed} failed; "
              f"elapsed {_duration(elapsed)}, eta {_duration(eta)}", file=stream, flush=True)
    out = [records[n] for n in names if n in records]
    failed = [r["name"] for r in out if r.get("status") != "ok"]
    print(f"[isoflop] {len(out) - len(failed)}/{len(names)} runs finished"
          + (f"; failed (left out of the fit): {', '.join(failed)}" if failed else "")
          + f"; records in {runs_path(workdir)}", file=stream, flush=True)
    return out
