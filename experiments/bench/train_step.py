r"""Train-step throughput: m2 (JAX, jitted) vs transformers (PyTorch) Qwen2ForCausalLM.

One run, both implementations side by side on the same config and batch:
  * m2:           `init_train_state` + `make_train_step` + `lm_loss`, AdamW from
                  `m2.train.optimizer` (global-norm clip 1.0, decay on matrices only).
  * transformers: `Qwen2ForCausalLM` + `torch.optim.AdamW` with the same
                  hyper-parameters, `clip_grad_norm_(1.0)`, two parameter groups
                  (decay on matrices only), the same full next-token loss.
Both compute the loss over all B x T positions (logits for every token).
`--attention=both` adds a second m2 runner with this backend's fused attention kernel
(`ModelConfig.attention`, m2/model/kernels.py) and prints its ratio to blocked attention.

Timing: compile/warm up first, then rounds; in each round m2 and transformers
each run `--steps` steps back to back (alternating). The machine is shared, so
before each round the script waits (up to `--max_wait` s) for a quiet second and
counts a round as clean only if other processes used under `--max_foreign` cores
while it ran (read from /proc/stat). It stops after `--repeats` clean rounds per
impl (or `--max_rounds`); the figure reported is the median clean round. Wall
time is what is reported; CPU time per step is printed beside it.

FLOPs per step (PaLM appendix B, fwd + bwd, no credit for causal masking):
    6 * N * B * T  +  12 * L * H * Dh * T * B * T
where N counts the parameters that take part in matmuls: every layer weight
(attention, MLP, norms, biases) plus the LM head; the input embedding is a
lookup and is left out (with tied embeddings the shared table counts once, as
the head). H * Dh is the total query width (= d_model for the tiny config).
MFU = achieved FLOP/s / peak, where the peak is measured in this run with a
jitted `jnp.dot` of two `--peak_n` square matrices in `--dtype`.

Allocator: on Linux CPU the script re-runs itself with glibc's
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (`--no-malloc_hugetlb` keeps the
default), which both implementations share, being one process. Both allocate
their large per-step temporaries (the [B*T, V] logits and their gradient,
activations) afresh every step, and glibc serves those with fresh mmaps; with
4 KB pages every step page-faults them in again: on a 2-core EPYC, 80k faults
and 181 CPU-ms of kernel time per m2 step (62k and 159 ms per torch step).
With transparent huge pages for malloc (THP in `madvise` mode, the common
default) that drops to 0.5k faults and 40 ms (torch: 1.6k, 108 ms). Any CPU
training run can set the same variable.

XLA CPU flags: default XLA. `--xla_cpu_flags` appends to XLA_FLAGS before jax is
imported. With jaxlib 0.10.2 the experimental oneDNN fusion
(`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot`)
aborts with "partition compile failed" on any elementwise op feeding a 2-D
matmul, which the MLP's VJP has. On a Sapphire Rapids CPU the step before that
VJP ran 3,008 tok/s with oneDNN; default XLA with it runs 3,504.

Command (2-core CPU, about 2 minutes):
    /tmp/venv/bin/python experiments/bench/train_step.py
GPU, m2 only, a ~1.5B model:
    python experiments/bench/train_step.py --preset=qwen2_5_1_5b --dtype=bfloat16 \
        --batch=4 --seq=1024 --skip_hf
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time



def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=10, help="timed steps per round and impl")
  p.add_argument("--repeats", type=int, default=5,
                 help="clean timed rounds wanted per impl; the median is reported")
  p.add_argument("--max_rounds", type=int, default=15, help="give up on clean rounds after this")
  p.add_argument("--max_foreign", type=float, default=0.15,
                 help="a round is clean when other processes used fewer cores than this")
  p.add_argument("--max_wait", type=float, default=60.0,
                 help="seconds to wait for a quiet machine before each round")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (weights and optimizer state stay float32)")
  p.add_argument("--preset", default="tiny",
                 help="m2.model.config preset name (tiny, qwen2_5_0_5b, qwen2_5_1_5b, ...)")
  p.add_argument("--remat", default="none", help="m2 remat policy")
  p.add_argument("--attention", default="blocked",
                 choices=("blocked", "pallas_gpu", "pallas_tpu", "both"),
                 help="m2's training attention (ModelConfig.attention); 'both' times blocked "
                      "and this backend's kernel side by side (on CPU: pallas_gpu, interpreted)")
  p.add_argument("--skip_hf", action="store_true", help="time m2 only")
  p.add_argument("--peak_n", type=int, default=0,
                 help="side of the square matmul that measures the peak (0: 4096 on CPU, "
                      "8192 on GPU)")
  p.add_argument("--xla_cpu_flags", default="",
                 help="appended to XLA_FLAGS when running on CPU")
  p.add_argument("--platform", default="auto", choices=("auto", "cpu", "gpu"),
                 help="auto: GPU if an NVIDIA device is visible, else CPU")
  p.add_argument("--malloc_hugetlb", action=argparse.BooleanOptionalAction, default=True,
                 help="on Linux CPU, re-run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _on_cpu(platform: str) -> bool:
  if platform != "auto":
    return platform == "cpu"
  env = os.environ.get("JAX_PLATFORMS", "")
  if env:
    return env.split(",")[0].strip() == "cpu"
  return not pathlib.Path("/dev/nvidia0").exists()


def _rerun_with_hugetlb_malloc():
  """Re-executes this script with glibc malloc's transparent-huge-page tunable."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if sys.platform != "linux" or "glibc.malloc.hugetlb" in tunables:
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables,
                                                               "glibc.malloc.hugetlb=1"])))
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


ARGS = parse_args()
ON_CPU = _on_cpu(ARGS.platform)
if ON_CPU and ARGS.malloc_hugetlb:
  _rerun_with_hugetlb_malloc()
if ON_CPU and ARGS.xla_cpu_flags.strip():
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_cpu_flags).strip()
if ON_CPU:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from m2 import parallel  # noqa: E402
from m2.model import Transformer, preset  # noqa: E402
from m2.train import optimizer as optim  # noqa: E402
from m2.train.state import init_train_state, lm_loss, make_train_step  # noqa: E402

OPT = optim.OptimizerConfig(learning_rate=3e-4, warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8,
                            weight_decay=0.1, grad_clip_norm=1.0)


# --- a shared machine --------------------------------------------------------------

def _busy_ticks() -> int:
  v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
  return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


def _own_ticks() -> int:
  f = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
  return int(f[11]) + int(f[12])


class ForeignLoad:
  """Wall time of a block and the CPU cores other processes used meanwhile (Linux)."""

  def __enter__(self):
    self._ok = os.path.exists("/proc/stat")
    self._t = time.perf_counter()
    if self._ok:
      self._busy, self._own = _busy_ticks(), _own_ticks()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self._t
    self.foreign = 0.0
    if self._ok:
      ticks = (_busy_ticks() - self._busy) - (_own_ticks() - self._own)
      self.foreign = max(ticks / os.sysconf("SC_CLK_TCK") / self.wall, 0.0)


def wait_for_quiet(max_wait: float, threshold: float) -> bool:
  """Waits (up to max_wait s) for a 1 s window in which other processes were idle."""
  end = time.time() + max_wait
  while True:
    with ForeignLoad() as load:
      time.sleep(1.0)
    if load.foreign < threshold:
      return True
    if time.time() > end:
      return False


# --- FLOPs and peak -----------------------------------------------------------------

def matmul_params(cfg) -> int:
  """Parameters that take part in matmuls: all layer weights plus the LM head."""
  return cfg.num_params() - cfg.vocab_size * cfg.embed_dim * (0 if cfg.tie_embeddings else 1) \
      - cfg.embed_dim  # final norm scale: elementwise


def step_flops(cfg, batch: int, seq: int) -> tuple[float, float]:
  dense = 6.0 * matmul_params(cfg) * batch * seq
  attn = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * seq * batch
  return dense, attn


def measure_peak(n: int, dtype, repeats: int = 7) -> float:
  """GFLOP/s of a jitted square matmul: the best of `repeats` timed calls."""
  ka, kb = jax.random.split(jax.random.PRNGKey(1))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best / 1e9


# --- data ---------------------------------------------------------------------------

def make_batch(cfg, batch: int, seq: int, seed: int):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, cfg.vocab_size, size=(batch, seq + 1), dtype=np.int32)
  return toks[:, :-1], toks[:, 1:]


# --- m2 -----------------------------------------------------------------------------

class M2Runner:

  def __init__(self, cfg, inputs, targets, seed, name="m2"):
    self.name = name
    mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx = optim.make_optimizer(OPT)
    graphdef, self.state, shardings = init_train_state(
        lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), tx, mesh)
    self.step_fn = make_train_step(graphdef, tx, lm_loss, mesh, shardings)
    b, t = inputs.shape
    batch = {
        "inputs": inputs, "targets": targets,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
        "segments": np.ones((b, t), np.int32),
        "loss_mask": np.ones((b, t), np.int32),
    }
    sharding = parallel.data_sharding(mesh)
    self.batch = {k: jax.device_put(np.ascontiguousarray(v), sharding)
                  for k, v in batch.items()}
    self.metrics = None

  def compile(self) -> float:
    t0 = time.perf_counter()
    self.run(1)
    return time.perf_counter() - t0

  def run(self, n: int) -> float:
    for _ in range(n):
      self.state, self.metrics = self.step_fn(self.state, self.batch)
    return float(self.metrics["loss"])  # blocks


# --- transformers -------------------------------------------------------------------

class HFRunner:
  name = "transformers"

  def __init__(self, cfg, inputs, targets, seed, dtype: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    self.torch = torch
    torch.manual_seed(seed)
    self.device = "cuda" if (not ON_CPU and torch.cuda.is_available()) else "cpu"
    hf_cfg = cfg.to_hf_config()
    hf_cfg.pop("architectures", None)
    hf_cfg.pop("torch_dtype", None)
    hf_cfg["initializer_range"] = 0.02
    config = Qwen2Config(**hf_cfg)
    self.model = Qwen2ForCausalLM(config).to(self.device, torch.float32).train()
    self.attn_impl = getattr(self.model.config, "_attn_implementation", "?")
    decay, no_decay = [], []
    for name, p in self.model.named_parameters():
      (no_decay if p.ndim < 2 or name.endswith("bias") else decay).append(p)
    # m2's embedding table is a matrix and so decays, as here.
    self.opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPT.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=OPT.learning_rate, betas=(OPT.b1, OPT.b2), eps=OPT.eps)
    self.inputs = torch.from_numpy(np.ascontiguousarray(inputs)).long().to(self.device)
    self.targets = torch.from_numpy(np.ascontiguousarray(targets)).long().to(self.device)
    self.autocast = dtype == "bfloat16"
    self.loss = None

  def _step(self):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      logits = self.model(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), self.targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPT.grad_clip_norm)
    self.opt.step()
    return loss

  def compile(self) -> float:
    t0 = time.perf_counter()
    self.run(1)
    return time.perf_counter() - t0

  def run(self, n: int) -> float:
    for _ in range(n):
      loss = self._step()
    if self.device == "cuda":
      self.torch.cuda.synchronize()
    return float(loss.detach())


# --- main ---------------------------------------------------------------------------

def main():
  args = ARGS
  both = args.attention == "both"
  cfg = preset(args.preset, dtype=args.dtype, remat_policy=args.remat,
               attention="blocked" if both else args.attention)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  tokens = args.batch * args.seq

  print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s), {os.cpu_count()} CPU cores)")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  print(f"config: preset={args.preset} layers={cfg.num_layers} d={cfg.embed_dim} "
        f"heads={cfg.num_heads}/{cfg.num_kv_heads} head_dim={cfg.head_dim} mlp={cfg.mlp_dim} "
        f"vocab={cfg.vocab_size} tied={cfg.tie_embeddings} dtype={cfg.dtype} "
        f"remat={cfg.remat_policy} attention={args.attention}; "
        f"batch {args.batch} x {args.seq} = {tokens} tokens/step")

  peak_n = args.peak_n or (4096 if ON_CPU else 8192)
  wait_for_quiet(args.max_wait, args.max_foreign)
  peak = measure_peak(peak_n, dtype)
  print(f"peak: jitted jnp.dot {peak_n}x{peak_n} {args.dtype}: {peak:.1f} GFLOP/s")

  inputs, targets = make_batch(cfg, args.batch, args.seq, args.seed)
  runners = [M2Runner(cfg, inputs, targets, args.seed)]
  kernel = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_gpu"
  if both:
    runners.append(M2Runner(cfg.replace(attention=kernel), inputs, targets, args.seed,
                            name=f"m2/{kernel}"))
  if not args.skip_hf:
    hf = HFRunner(cfg, inputs, targets, args.seed, args.dtype)
    print(f"transformers {__import__('transformers').__version__}, torch "
          f"{hf.torch.__version__} ({hf.torch.get_num_threads()} threads, "
          f"attn={hf.attn_impl}, device={hf.device})")
    runners.append(hf)

  first_loss = {}
  for r in runners:
    secs = r.compile()
    first_loss[r.name] = r.run(args.warmup) if args.warmup else float("nan")
    print(f"{r.name}: first step (compile) {secs:.1f} s, loss after warm-up "
          f"{first_loss[r.name]:.4f}")

  # Rounds alternate m2 / transformers. A round counts as clean when the rest of the
  # machine used less than --max_foreign cores while it ran; figures come from clean
  # rounds when every impl has one, else from all rounds (with a warning).
  rounds = {r.name: [] for r in runners}  # (wall s/step, cpu s/step, foreign cores)
  clean = lambda name: [x for x in rounds[name] if x[2] < args.max_foreign]  # noqa: E731
  for rep in range(args.max_rounds):
    if all(len(clean(r.name)) >= args.repeats for r in runners):
      break
    waited = wait_for_quiet(args.max_wait, args.max_foreign)
    for r in runners:
      with ForeignLoad() as load:
        c0 = time.process_time()
        r.run(args.steps)
        cpu = time.process_time() - c0
      rounds[r.name].append((load.wall / args.steps, cpu / args.steps, load.foreign))
    print("round %d%s: %s" % (rep, "" if waited else " (machine busy)", "  ".join(
        f"{k} {v[-1][0] * 1e3:.1f} ms/step ({v[-1][1] * 1e3:.0f} CPU-ms, others "
        f"{v[-1][2]:.2f} cores)" for k, v in rounds.items())))
  use_clean = all(clean(r.name) for r in runners)
  if not use_clean:
    print(f"WARNING: no round ran with other processes under {args.max_foreign} cores; "
          f"the figures below are from a busy machine")
  per_step = {k: [x[0] for x in (clean(k) if use_clean else v)] for k, v in rounds.items()}
  cpu_step = {k: [x[1] for x in (clean(k) if use_clean else v)] for k, v in rounds.items()}
  print(f"{'clean' if use_clean else 'all'} rounds used: "
        + ", ".join(f"{k} {len(v)}" for k, v in per_step.items()))

  dense, attn = step_flops(cfg, args.batch, args.seq)
  flops = dense + attn
  print(f"\nFLOPs/step = 6*N*tokens + 12*L*H*Dh*T^2*B = 6*{matmul_params(cfg):,}*{tokens} + "
        f"12*{cfg.num_layers}*{cfg.num_heads * cfg.head_dim}*{args.seq}^2*{args.batch} "
        f"= {dense / 1e9:.2f} + {attn / 1e9:.2f} = {flops / 1e9:.2f} GFLOP")
  rows = []
  for name, times in per_step.items():
    med = statistics.median(times)
    rows.append((name, med, min(times), statistics.median(cpu_step[name]), tokens / med,
                 flops / med / 1e9, flops / med / 1e9 / peak))
  hdr = (f"{'impl':<14}{'ms/step':>10}{'best ms':>10}{'CPU-ms':>10}{'tok/s':>10}"
         f"{'GFLOP/s':>10}{'MFU':>8}")
  print(hdr)
  print("-" * len(hdr))
  for name, med, best, cpu, tps, gfl, mfu in rows:
    print(f"{name:<14}{med * 1e3:>10.1f}{best * 1e3:>10.1f}{cpu * 1e3:>10.0f}{tps:>10.0f}"
          f"{gfl:>10.1f}{mfu * 100:>7.1f}%")
  tps = {row[0]: row[4] for row in rows}
  mfu = {row[0]: row[6] for row in rows}
  m2_tps, hf_tps, fused_tps = tps["m2"], tps.get("transformers"), tps.get(f"m2/{kernel}")
  ratio = m2_tps / hf_tps if hf_tps else None
  if ratio:
    print(f"ratio m2 / transformers: {ratio:.2f}x")
  if fused_tps:
    print(f"ratio m2 {kernel} / blocked attention: {fused_tps / m2_tps:.2f}x")
  print(f"peak (measured): {peak:.1f} GFLOP/s")
  result = {"bench": "train_step", "m2_tok_s": round(m2_tps, 1),
            "hf_tok_s": round(hf_tps, 1) if hf_tps else None,
            "ratio": round(ratio, 3) if ratio else None,
            "mfu": round(mfu["m2"], 4),
            "hf_mfu": round(mfu["transformers"], 4) if hf_tps else None,
            "attention": args.attention,
            "kernel_tok_s": round(fused_tps, 1) if fused_tps else None,
            "kernel_mfu": round(mfu[f"m2/{kernel}"], 4) if fused_tps else None,
            "peak_gflops": round(peak, 1), "preset": args.preset, "dtype": args.dtype,
            "batch": args.batch, "seq": args.seq,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
