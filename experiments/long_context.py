"""Long-context extension with gates, then annealing with checkpoint averaging (Llama 3 sections 3.4.2-3.4.3).

Variants (`--config=experiments/long_context.py:VARIANT[,key=value,...]`):

* `tiny` — the `tiny` model (max length 2048, 3.1 RoPE scaling with original length 256) on the embedded
  corpus: `pretrain` at 256 tokens, `long_context` stages at 512 -> 1024 -> 2048 with tokens per batch constant
  (16 x 256 = 8 x 512 = 4 x 1024 = 2 x 2048), then `anneal` at 2048 (LR linear to 0; prose raised from 0.3 to
  0.7 of the mix and the last 3 checkpoints averaged into the final model: both choices at this size).
      python -m llama_jax.main --config=experiments/long_context.py:tiny --workdir=/tmp/llama_long
  Each long_context stage gates on the validation loss at 256 tokens (within `tol` of the 256-token pretrained
  model every stage extends) and on passkey accuracy at every length from 256 up to its own (>= `needle` at each;
  a 1.8M-parameter model trained for minutes does not solve the passkey task, so the tiny default threshold is
  0.0 and the heat maps record the measured accuracy).
  Knobs: steps (pretrain steps; each later stage runs steps/4), lr, tol, needle, context (mesh.context: 1, 2 or 4
  work on 8 simulated CPU devices), passkey (share of passkey documents), documents (distinct passkey documents
  per source), short_chars (> 0: the pretraining stage's passkey filler is 0 to short_chars characters, several
  documents to a row: the copying that retrieval needs forms much faster with them).
  Hardware: a CPU; results in benchmarks/README.md.
* `probe` — the paper's data-value probe (section 3.1.3) at tiny size: a half-trained model (pretrain on code,
  `steps` of a 2 x `steps` schedule) annealed twice, without and with prose as the new source at `weight` of
  the mix (the paper: 30%); `llama_jax.stages.anneal.data_value_report` on the results compares the
  held-out loss (code + prose) of the two averaged models. Knobs: steps (200), lr, weight. CPU.
      python -m llama_jax.main --config=experiments/long_context.py:probe,steps=40 --workdir=/tmp/llama_probe
* `paper` — Llama 3.1 8B: the 8K pretraining is `experiments/pretrain.py:llama3.1-8b` (give its checkpoints as
  `--config.init_from`; a long_context stage cannot start from scratch); here six long_context stages
  8K -> 16K -> 32K -> 64K -> 96K -> 128K -> 128K and about 800B tokens (as the paper: six stages, ~800B tokens;
  the lengths, ~133B tokens per stage, 4M tokens per batch (batch 256 x 16K ... 32 x 128K; 40 x 96K), the
  learning rate 3e-5 and the second 128K stage are choices), context parallelism 8 x FSDP, blockwise attention,
  full remat, the chunked loss. Each stage is gated on the paper's two criteria, short-context performance fully
  recovered and needle-in-a-haystack solved perfectly at its length: here the 8K validation loss within 0.02
  nats of the 8K model the extension started from (the measure and tolerance are choices) and passkey accuracy
  1.0 at every length from 8K up to the stage's (the shorter lengths are a choice). Then `anneal` over
  the final 40M tokens at 128K with the LR linear to 0 and the annealing checkpoints averaged (as the paper,
  section 3.4.3); averaging the last 5 is a choice, and the stage saves every 2 of its 10 steps so that the 5
  exist. The paper upsamples very-high-quality sources in the anneal (without shares): here the user's
  `high_quality` source at 0.3 of the anneal's mix (`ANNEAL_MIX`, a choice). Hardware: 64 H100s (context 8 x
  FSDP 8, one row per device per micro-batch: choices the planner says fit 80 GiB); not run here.
  Data: the paper's mix by name (`experiment.PAPER_MIX`, §3.1.2) plus `high_quality`, and Meta's tokenizer:
  `--config.tokenizer=PATH --config.data.paths.general_knowledge=PATH` (and `math_reasoning`, `code`,
  `multilingual`, `high_quality`); the run stops, naming what is missing, until all are given.
"""

from llama_jax import experiment as E

_TINY_KNOBS = ("steps", "lr", "tol", "needle", "context", "passkey", "documents", "short_chars")


def _tiny_sources(code: float, prose: float, passkey: float, length: int, documents: int = 2048,
                  max_chars: int = 0) -> list[dict]:
    """The embedded corpus (code, prose) scaled to 1 - passkey, plus `documents` distinct synthetic passkey
    documents of about a quarter to four fifths of `length` tokens (about 2.5 characters per token with the
    embedded tokenizer), or, with `max_chars`, filler of 0 to `max_chars` characters (short documents, several
    to a row: more retrievals per step), whole in a row (`packing="whole"`: a question split from its needle
    would teach guessing, not retrieval), left out of evaluation so that the short-context validation loss
    compares the same data at every stage."""
    out = [dict(name="stdlib_code", kind="corpus", path="code", weight=code * (1 - passkey)),
           dict(name="stdlib_prose", kind="corpus", path="prose", weight=prose * (1 - passkey))]
    if passkey > 0:
        out.append(dict(name="passkey", kind="passkey", weight=passkey, eval_split="none", packing="whole",
                        options=dict(documents=documents, min_chars=0 if max_chars else int(0.6 * length),
                                     max_chars=max_chars or int(1.9 * length))))
    return out


def _tiny(a):
    c = E.base_config()
    c.data.sources = _tiny_sources(0.7, 0.3, a.passkey, 256, a.documents, a.short_chars)
    c.model.preset = "tiny"
    c.model.attention = "auto"
    c.sharding_rules = "dp"
    c.mesh.update(data=-1, context=a.context)
    c.sample.max_new_tokens = 0
    c.eval.update(every_steps=0, batches=2)
    c.checkpoint.update(every_steps=max(a.steps // 16, 1), keep=4, async_save=False)
    later = max(a.steps // 4, 4)
    tokens_per_batch = 16 * 256
    stages = [E.stage("pretrain", [E.phase(256, 16)], E.optim(a.lr, 30, final_lr_ratio=0.1), steps=a.steps)]
    gates = dict(short_seq_len=256, short_tolerance=a.tol, needle_threshold=a.needle, needle_trials=4,
                 needle_depths=[0.0, 0.25, 0.5, 0.75, 1.0], needle_lengths=[256, 512, 1024, 2048])
    for length in (512, 1024, 2048):
        stages.append(E.stage(f"long_{length}", [E.phase(length, tokens_per_batch // length)],
                              E.optim(a.lr / 3, 5, final_lr_ratio=0.1), steps=later, kind="long_context",
                              options=dict(gates, needle_lengths=[n for n in gates["needle_lengths"] if n <= length]),
                              data=dict(sources=_tiny_sources(0.7, 0.3, a.passkey, length, a.documents))))
    stages.append(E.stage("anneal", [E.phase(2048, 2)], E.optim(a.lr / 3, 0, decay="linear", final_lr_ratio=0.0),
                          steps=later, kind="anneal", options=dict(average_last=3),
                          data=dict(sources=_tiny_sources(0.3, 0.7, a.passkey, 2048, a.documents))))
    c.stages = stages
    return c


# The anneal's mixture: the paper upsamples very-high-quality data sources (§3.4.3) without giving shares; a
# user-mapped `high_quality` source at 30% of the mix and the pretraining mix scaled to 70% is a choice (the share
# of the paper's data-value probe, §3.1.3).
ANNEAL_MIX = dict({name: round(0.7 * weight, 4) for name, weight in E.PAPER_MIX.items()}, high_quality=0.3)


def _paper():
    c = E.base_config()
    c.data.sources = E.named_sources(E.PAPER_MIX)  # §3.1.2; the user maps each to files (data.paths)
    E.require_files(c, ANNEAL_MIX)  # every source of either mix, and Meta's tokenizer.model (config.tokenizer)
    c.model.preset = "llama3.1-8b"
    c.model.update(dtype="bfloat16", remat="full", attention="auto")
    c.mesh.update(data=1, fsdp=-1, context=8)
    c.plan_devices = 64  # 64 H100s: context 8 x FSDP 8 (a choice; the paper gives the 405B mesh only)
    c.sharding_rules = "fsdp"
    c.checkpoint.update(every_steps=500, keep_every=5000)
    c.eval.every_steps = 1000
    tokens_per_batch = 4 * 2 ** 20
    gates = dict(short_seq_len=8192, short_tolerance=0.02, needle_threshold=1.0, needle_trials=8)
    stages = []
    lengths = (16_384, 32_768, 65_536, 98_304, 131_072)
    needle_at = (8192,) + lengths  # the needle gate checks every length up to the stage's
    fsdp = 8  # rows split over the 8 FSDP groups; gradients accumulated one row per device at a time
    for length in lengths:
        rows = tokens_per_batch // length // fsdp * fsdp  # 96K: 40 rows (3.9M tokens), the others exactly 4M
        stages.append(E.stage(f"long_{length // 1024}k", [E.phase(length, rows)],
                              E.optim(3e-5, 100, final_lr_ratio=1.0), tokens=int(133e9), kind="long_context",
                              loss_chunk=4096, grad_accum=rows // fsdp,
                              options=dict(gates, needle_lengths=[n for n in needle_at if n <= length])))
    # the sixth stage: 128K again (a choice: the paper gives six stages, not their lengths); a stage ends after its
    # tokens and its gates must pass then (the paper trains a stage until they pass)
    stages.append(E.stage("long_128k_b", [E.phase(131_072, 32)], E.optim(3e-5, 0, final_lr_ratio=1.0),
                          tokens=int(135e9), kind="long_context", loss_chunk=4096, grad_accum=32 // fsdp,
                          options=dict(gates, needle_lengths=list(needle_at))))
    # 40M tokens = 10 steps of 4M; the anneal saves its own checkpoints (every 2 steps, 5 kept: `stages.anneal`)
    stages.append(E.stage("anneal", [E.phase(131_072, 32)], E.optim(3e-5, 0, decay="linear", final_lr_ratio=0.0),
                          tokens=int(40e6), kind="anneal", loss_chunk=4096, grad_accum=32 // fsdp,
                          options=dict(average_last=5),
                          data=dict(sources=E.named_sources(ANNEAL_MIX))))
    c.stages = stages
    return c


_PROBE_KNOBS = ("steps", "lr", "weight")


def _probe(a):
    """The data-value probe at tiny size: pretrain on code for `steps` steps of a 2 x `steps` schedule (a
    half-trained model), then anneal it twice for steps/2 steps (LR linear to 0): on code alone and with prose
    (the "new data") at `weight` of the mix; both evaluated on held-out code + prose."""
    c = E.base_config()
    code = dict(name="stdlib_code", kind="corpus", path="code", weight=1.0)
    prose = dict(name="stdlib_prose", kind="corpus", path="prose")
    c.data.sources = [code]
    c.model.preset = "tiny"
    c.sharding_rules = "dp"
    c.sample.max_new_tokens = 0
    c.eval.update(every_steps=0, batches=4)
    c.checkpoint.update(every_steps=max(a.steps // 8, 1), keep=4, async_save=False)
    phases = [E.phase(256, 16)]
    c.stages = [E.stage("pretrain", phases, E.optim(a.lr, 30, schedule_steps=2 * a.steps), steps=a.steps)]
    c.stages += E.data_value_probe(
        "pretrain", [code], prose, a.weight, phases, E.optim(a.lr / 2, 0, decay="linear", final_lr_ratio=0.0),
        steps=max(a.steps // 2, 2), average_last=2)
    return c


def get_config(arg: str | None = None):
    a = E.parse_arg(arg, variant="tiny", steps=200, lr=3e-3, tol=0.5, needle=0.0, context=1, passkey=0.2,
                    weight=0.3, documents=2048, short_chars=0)
    E.check_knobs(arg, a.variant, {"tiny": _TINY_KNOBS, "probe": _PROBE_KNOBS}.get(a.variant, ()))
    if a.variant == "probe":
        return _probe(a)
    if a.variant == "tiny":
        return _tiny(a)
    if a.variant == "paper":
        return _paper()
    raise ValueError(f"unknown variant {a.variant!r} of experiments/long_context.py; known: tiny, probe, paper")
