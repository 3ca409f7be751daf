"""Training throughput on the "tiny-bench" workload: llama_jax vs a plain JAX/Flax step vs Hugging Face PyTorch.

Workload (fixed): `model.config.get("tiny-bench")` (vocab 32000, d_model 256, 4 layers, 8 heads / 2 KV heads,
FFN 704, RoPE θ 500000, untied), sequence 512, global batch 8 (4,096 tokens per step), float32, AdamW
(β 0.9/0.95, weight decay 0.1, global-norm clipping 1.0). Every row is one document (segment ids all 1) so that
all variants do exactly the same work; random token ids.

Variants, each in its own subprocess (so memory is per variant and XLA flags can differ):
  llama_jax            `train.step.make_train_step` + `jit_train_step` (sharded jit, donated state) with the
                       shipped defaults: remat none, attention "auto" (= "xla_blocked" on CPU), the loss chunk
                       the platform default resolves to (128 positions on CPU: the fused chunked cross-entropy),
                       fused Q/K/V and gate/up projections, 1 device.
  llama_jax-full-logits  the same with full [B, L, V] float32 logits (`loss_chunk=0`).
  llama_jax-unfused-proj the same with five separate projection matmuls (`fuse_projections=False`).
  llama_jax-lean       the shipped step with "xla_chunked" attention (LEAN below): the least memory.
  llama_jax-2dev       the shipped step on a 2-device data-parallel mesh (2 simulated CPU devices, 2 cores).
  xla+onednn, xla-no-ynn, xla+concurrency-scheduler
                       the shipped step with one XLA:CPU flag each: oneDNN kernels on, the YNNPACK dot fusions
                       off (plain Eigen dots), the concurrency-optimized thunk scheduler on.
  flax-naive           what a user would write: a Linen model with a Python loop over layers, GQA by repeating
                       K/V heads, a [T, T] causal mask, full float32 logits, optax.adamw, plain `jax.jit`.
  hf-torch             transformers `LlamaForCausalLM` (same config, float32, sdpa attention) with torch AdamW
                       and clip_grad_norm_, eager mode, torch threads = cores (skipped if torch is absent).

Measured: tokens/s = 4096 / median step time over --steps timed steps after --warmup steps (each step waited
for: `block_until_ready` on JAX, synchronous on CPU torch); MFU = tokens/s × `ModelConfig.flops_per_token(512)`
/ measured peak, the peak being the best float32 matmul rate of a jitted 2048³ matmul on this machine (own
subprocess, same default flags); peak memory = the process's peak resident set (VmHWM) during the timed steps
(reset via /proc/self/clear_refs after warm-up, so compilation is excluded) minus the resident set after the
imports, i.e. parameters + optimizer state + activations + runtime buffers of one step. For JAX variants the
compiled step's XLA temp buffer size is shown too.

    python benchmarks/train_throughput.py [--steps 10] [--warmup 3] [--variants a,b,...] [--write]

`--write` replaces the "## Train throughput (tiny-bench)" section of benchmarks/README.md (other sections are
left untouched; the file is created if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

SEQ, BATCH = 512, 8
TOKENS = SEQ * BATCH
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
SECTION = "## Train throughput (tiny-bench)"

# Settings tried on the 2-core CPU (see the README section): none of the XLA:CPU flags tried helped
# (`--xla_cpu_experimental_xnn_fusion_type=dot` was ~2x slower). "-lean" is the memory-lean configuration.
LEAN = {"remat": "none", "attention": "xla_chunked", "loss_chunk": 128}

# The shipped defaults: what `experiments/pretrain.py` gives a stage without flags (loss_chunk -1 resolves to the
# platform's default, `llama_jax.train.loss.resolve_chunk`; fused Q/K/V and gate/up projections; attention "auto").
SHIPPED = {"kind": "llama_jax", "devices": 1, "remat": "none", "attention": "auto", "loss_chunk": -1,
           "fuse_projections": True, "xla_flags": ""}

VARIANTS = {
    "llama_jax": dict(SHIPPED),
    "llama_jax-full-logits": dict(SHIPPED, loss_chunk=0),
    "llama_jax-unfused-proj": dict(SHIPPED, fuse_projections=False),
    "llama_jax-lean": dict(SHIPPED, **LEAN),
    "llama_jax-2dev": dict(SHIPPED, devices=2),
    # XLA:CPU options a careful user might turn on (numerics-preserving ones only; fast-math is not tried)
    "xla+onednn": dict(SHIPPED, xla_flags="--xla_cpu_use_onednn=true"),
    "xla-no-ynn": dict(SHIPPED, xla_flags="--xla_cpu_experimental_ynn_fusion_type="),
    "xla+concurrency-scheduler": dict(SHIPPED, xla_flags="--xla_cpu_enable_concurrency_optimized_scheduler=true"),
    "flax-naive": {"kind": "flax_naive", "devices": 1, "xla_flags": ""},
    "hf-torch": {"kind": "hf_torch"},
}


# ------------------------------------------------------------------------------------------ measurements


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _batch_np(vocab: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(BATCH, SEQ + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
            "loss_mask": np.ones((BATCH, SEQ), np.int32)}


def _time_steps(step_once, warmup: int, steps: int, base_rss_kib: int):
    for _ in range(warmup):
        step_once()
    exact_peak = _reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_once()
        times.append(time.perf_counter() - t0)
    peak = _rss_kib("VmHWM") if exact_peak else _rss_kib("VmRSS")
    return {"step_s": statistics.median(times), "step_s_all": times,
            "peak_mib": (peak - base_rss_kib) / 1024.0, "peak_exact": exact_peak}


def child_peak(args) -> dict:
    import jax

    from llama_jax.train import metrics
    return {"peak_flops": metrics.measure_matmul_peak("float32", size=2048, repeats=8),
            "device": str(jax.devices()[0].device_kind)}


def child_llama_jax(v: dict, args) -> dict:
    import jax
    import numpy as np
    from llama_jax.model import config
    from llama_jax.sharding import mesh as mesh_lib
    from llama_jax.sharding import rules as rules_lib
    from llama_jax.data import batch as batch_lib
    from llama_jax.train import step as step_lib
    from llama_jax.train.optim import OptimConfig

    base = _rss_kib()
    from llama_jax.train import loss as loss_lib

    cfg = config.get("tiny-bench", remat=v["remat"], attention=v["attention"],
                     fuse_projections=v["fuse_projections"])
    ocfg = OptimConfig(peak_lr=3e-4, warmup_steps=10, total_steps=1000)
    mesh = mesh_lib.make_mesh({"data": -1}, devices=jax.devices()[:v["devices"]])
    rules = rules_lib.get_rules("dp")
    state, shardings = step_lib.init_train_state(cfg, ocfg, mesh, rules, jax.random.key(0))
    step = step_lib.jit_train_step(step_lib.make_train_step(cfg, ocfg, loss_chunk=loss_lib.resolve_chunk(v["loss_chunk"])), mesh, rules,
                                   shardings)
    batch = batch_lib.make_global_batch(_batch_np(cfg.vocab_size), mesh)
    temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    holder = {"state": state}

    def once():
        holder["state"], metrics = step(holder["state"], batch)
        holder["loss"] = float(jax.block_until_ready(metrics["loss"]))

    out = _time_steps(once, args.warmup, args.steps, base)
    out.update(temp_mib=temp / 2 ** 20, loss=holder["loss"], flops_per_token=cfg.flops_per_token(SEQ),
               devices=len(mesh.devices.flat))
    assert np.isfinite(holder["loss"])
    return out


def child_flax_naive(v: dict, args) -> dict:
    """The baseline: a straightforward Flax Linen Llama and optax step, no llama_jax code."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from llama_jax.model import config

    base = _rss_kib()
    c = config.get("tiny-bench")
    hd = c.dim // c.n_heads

    def rope(x, pos):
        inv = 1.0 / (c.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
        ang = pos[..., None].astype(jnp.float32) * inv
        cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
        x1, x2 = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    class RMSNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            s = self.param("scale", nn.initializers.ones, (x.shape[-1],))
            return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + c.norm_eps) * s

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, pos):
            b, t, _ = x.shape
            init = nn.initializers.normal(0.02)
            h = RMSNorm()(x)
            q = nn.Dense(c.n_heads * hd, use_bias=False, kernel_init=init)(h).reshape(b, t, c.n_heads, hd)
            k = nn.Dense(c.n_kv_heads * hd, use_bias=False, kernel_init=init)(h).reshape(b, t, c.n_kv_heads, hd)
            vv = nn.Dense(c.n_kv_heads * hd, use_bias=False, kernel_init=init)(h).reshape(b, t, c.n_kv_heads, hd)
            q, k = rope(q, pos), rope(k, pos)
            k = jnp.repeat(k, c.n_rep, axis=2)  # repeat_kv
            vv = jnp.repeat(vv, c.n_rep, axis=2)
            scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
            o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), vv).reshape(b, t, -1)
            x = x + nn.Dense(c.dim, use_bias=False, kernel_init=init)(o)
            h = RMSNorm()(x)
            g = nn.Dense(c.ffn_dim, use_bias=False, kernel_init=init)(h)
            u = nn.Dense(c.ffn_dim, use_bias=False, kernel_init=init)(h)
            return x + nn.Dense(c.dim, use_bias=False, kernel_init=init)(nn.silu(g) * u)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, tokens, pos):
            x = nn.Embed(c.vocab_size, c.dim, embedding_init=nn.initializers.normal(0.02))(tokens)
            for _ in range(c.n_layers):
                x = Layer()(x, pos)
            return nn.Dense(c.vocab_size, use_bias=False, kernel_init=nn.initializers.normal(0.02))(RMSNorm()(x))

    model = Model()
    bnp = _batch_np(c.vocab_size)
    tokens, targets, pos = (jnp.asarray(bnp[k]) for k in ("inputs", "targets", "positions"))
    params = model.init(jax.random.key(0), tokens[:1], pos[:1])["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, tokens, pos)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train_step(p, o):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    temp = train_step.lower(params, opt_state).compile().memory_analysis().temp_size_in_bytes
    holder = {"p": params, "o": opt_state}

    def once():
        holder["p"], holder["o"], loss = train_step(holder["p"], holder["o"])
        holder["loss"] = float(jax.block_until_ready(loss))

    out = _time_steps(once, args.warmup, args.steps, base)
    out.update(temp_mib=temp / 2 ** 20, loss=holder["loss"], flops_per_token=c.flops_per_token(SEQ), devices=1)
    return out


def child_hf_torch(v: dict, args) -> dict:
    import torch
    import transformers
    from llama_jax.model import config

    base = _rss_kib()
    torch.set_num_threads(os.cpu_count() or 1)
    c = config.get("tiny-bench")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=SEQ, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, torch_dtype="float32")
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    bnp = _batch_np(c.vocab_size)
    inputs = torch.from_numpy(bnp["inputs"]).long()
    labels = torch.from_numpy(bnp["targets"]).long()
    holder = {}

    def once():
        out = model(input_ids=inputs)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = float(loss.detach())

    out = _time_steps(once, args.warmup, args.steps, base)
    out.update(temp_mib=None, loss=holder["loss"], flops_per_token=c.flops_per_token(SEQ), devices=1,
               versions=f"torch {torch.__version__}, transformers {transformers.__version__}")
    return out


# ----------------------------------------------------------------------------------------------- driver


def run_child(name: str, args) -> dict | None:
    v = VARIANTS.get(name, {"kind": name})
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    flags = v.get("xla_flags", "")
    if v.get("devices", 1) > 1:
        flags += f" --xla_force_host_platform_device_count={v['devices']}"
    env["XLA_FLAGS"] = flags.strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{name}] failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def fmt_table(results: dict, peak: dict) -> str:
    rows = ["| variant | devices | step ms (median) | tokens/s | MFU | peak RSS Δ MiB | XLA temp MiB "
            "| vs flax-naive tok/s | vs hf-torch tok/s | vs hf-torch mem |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    ref_naive = results.get("flax-naive")
    ref_hf = results.get("hf-torch")
    for name, r in results.items():
        if r is None:
            continue
        tps = TOKENS / r["step_s"]
        mfu = tps * r["flops_per_token"] / peak["peak_flops"]

        def ratio(ref, key="tps"):
            if ref is None:
                return "–"
            if key == "tps":
                return f"{tps / (TOKENS / ref['step_s']):.2f}x"
            return f"{r['peak_mib'] / ref['peak_mib']:.2f}x"
        temp = "–" if r.get("temp_mib") is None else f"{r['temp_mib']:.0f}"
        rows.append(f"| {name} | {r['devices']} | {r['step_s'] * 1e3:.0f} | {tps:,.0f} | {mfu:.1%} | "
                    f"{r['peak_mib']:.0f} | {temp} | {ratio(ref_naive)} | {ratio(ref_hf)} | "
                    f"{ratio(ref_hf, 'mem')} |")
    return "\n".join(rows)


def machine_line(peak: dict, results: dict) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import jax
    import flax
    versions = f"jax {jax.__version__}, flax {flax.__version__}"
    hf = results.get("hf-torch")
    if hf and hf.get("versions"):
        versions += ", " + hf["versions"]
    return (f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {versions}. "
            f"Measured float32 matmul peak (jitted 2048³): {peak['peak_flops'] / 1e9:.1f} GFLOP/s.")


NOTES = """\
`python benchmarks/train_throughput.py --steps 5 --warmup 2 --write`. Each variant runs in its own process;
tokens/s = 4,096 / median step time; MFU uses `ModelConfig.flops_per_token(512)` (≈66 MFLOP/token, 75% of it
the 32000-wide output head) against the measured matmul peak above; "peak RSS Δ" is the peak resident set
during the timed steps (compilation excluded) minus the resident set after imports; "XLA temp" is the
compiled step's scratch buffer size. Run on an otherwise idle machine: under load, the figures (and
especially PyTorch's) move by 2-4x, so compare rows of one run only.

- `llama_jax` is what a stage gets without flags: the fused chunked cross-entropy (128 positions per chunk on
  CPU, its gradient formed in the forward pass, no logits computed twice), Q/K/V and gate/up each as one matmul,
  "xla_blocked" attention, remat none, 1 device. Each other llama_jax row changes one thing (see the docstring).
- XLA:CPU options: oneDNN (`--xla_cpu_use_onednn=true`) and the concurrency-optimized scheduler change the step
  time by less than run-to-run noise, so they stay off; turning the YNNPACK dot fusions off (plain Eigen dots)
  is slower, so they stay on (XLA's default). Fast-math flags change numerics and were not tried.
- Baselines: `flax-naive` (Python loop over Linen layers, repeat_kv, full logits, optax, plain `jax.jit`) and
  Hugging Face `LlamaForCausalLM` (sdpa attention, eager, torch AdamW + clipping, 2 threads). The JAX
  variants' loss differs from the baselines' at the last step only because llama_jax's schedule warms up.
"""


def write_readme(text: str) -> None:
    old = open(README).read() if os.path.exists(README) else ""
    pattern = re.compile(r"^" + re.escape(SECTION) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    block = SECTION + "\n\n" + text.strip() + "\n\n"
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old)
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    with open(README, "w") as f:
        f.write(new.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "peak":
            res = child_peak(args)
        else:
            v = dict(VARIANTS[args.child], **json.loads(args.options or "{}"))
            res = {"llama_jax": child_llama_jax, "flax_naive": child_flax_naive,
                   "hf_torch": child_hf_torch}[v["kind"]](v, args)
        print("RESULT " + json.dumps(res))
        return

    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    peak = run_child("peak", args)
    results = {}
    for name in names:
        if name == "hf-torch":
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError:
                print("[hf-torch] skipped: torch / transformers not importable", file=sys.stderr)
                continue
        results[name] = run_child(name, args)
        r = results[name]
        if r:
            print(f"[{name}] step {r['step_s'] * 1e3:.0f} ms, peak RSS Δ {r['peak_mib']:.0f} MiB, "
                  f"loss {r['loss']:.3f}", file=sys.stderr)
    table = fmt_table(results, peak)
    text = machine_line(peak, results) + "\n\n" + table + "\n\n" + NOTES
    print(text)
    if args.write:
        write_readme(text)


if __name__ == "__main__":
    main()
