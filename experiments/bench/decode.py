r"""Decode throughput: the m2 Sampler vs transformers `generate`, speculative vs plain.

One run, three parts:
  1. m2 vs transformers: the same tiny Qwen2 weights (4 layers, d 256, 4/2
     heads, head_dim 64, mlp 1024, vocab 8192; random init) in m2 and in
     `Qwen2ForCausalLM` (written with `m2.model.hf.save_hf_checkpoint`, read
     with `from_pretrained`). 32-token prompts, exactly 128 new tokens, greedy,
     KV cache on, batch 1 and 16. tokens/s = batch * 128 / wall time of the
     whole call (prefill included) for `Sampler.generate` and for
     `model.generate`. Greedy outputs are compared token for token.
     `--cache_length=2048` gives each m2 row 2048 cache slots, as a rollout
     allocates for a ~2k-token `max_new_tokens` cap that its replies stop far
     short of (transformers' cache grows with the text).
  2. Speculative vs plain decoding (m2 both), greedy, 128 new tokens, for each
     target of `--targets` (LAYERSxDIM; default 8x512, then the tiny shape
     4x256 of part 1): the tiny preset's family (heads of 64, half as many kv
     heads, mlp 4 x DIM) with the byte tokenizer's vocabulary padded to 320,
     and a small 1-layer draft, trained for --train_steps steps on the same
     shipped corpus (MTS-Dialog + ACI-Bench training dialogues,
     de-identified, byte tokenizer; `m2.data.pipelines.lm_dataset` +
     `m2.train.loop.train`), so that the draft agrees with the target often;
     and an EAGLE head (`m2.sampling.eagle`, one layer of the draft's width
     over the target's features) distilled from the target's own
     continuations of other corpus windows at the temperature part 2 decodes
     at, 0 (`export.draft.train_eagle_head`; `--eagle_temperature`;
     `--skip_eagle` leaves it out; on the tiny target, a head distilled at
     temperature 1 drafts this greedy text at 2.2 tokens a round, against
     4.7). Prompts are 32-byte windows of the corpus. Reports each drafter's
     speed-up, acceptance rate and tokens per round, and checks that the
     speculative output equals the plain greedy output. JSON keys of later
     targets end in `_t{LAYERSxDIM}`.
     Why two targets: speculative decoding pays when a target step costs
     many draft steps and verifying k + 1 tokens costs about one step, as for
     the 32B target and its one-layer EAGLE head. The 8x512 target (123 MB of
     weights, read from memory at each step) is in that regime. The tiny
     target's 16 MB sit in this CPU's cache: there an EAGLE draft step costs
     about a fifth of a target step, and XLA:CPU's small-M matmuls make the
     5-token verify cost about two, so a round costs about three plain steps.
  3. Multi-turn continuation, on the first target: a second turn appended to
     the cached conversation vs the same turn recomputed from the whole
     history.

Timing: compile first, then two untimed rounds (the first calls after a compile
often run ~2x slower here), then `--repeats` rounds; in each round every
contender runs once, back to back (alternating, so noise from other work on
the machine hits all). The figure reported is the median round. transformers
gets the faster of 1 thread and all cores (picked on a short run per batch);
part 1 also reports the ratio of process CPU time, which waiting for a busy
core does not inflate, and the run records the load average.

XLA CPU flags: none by default. The experimental oneDNN flags
(`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot`)
made batch-1 decoding about 2.5x slower here (small matmuls, one token at a
time); `--xla_cpu_flags=...` appends flags to XLA_FLAGS; the run prints what
it used.

Command (2-core EPYC: about 14 minutes the first time, when it trains the
targets, draft and EAGLE heads into --workdir (~7 min); about 7 minutes after
that):
    /tmp/venv/bin/python experiments/bench/decode.py
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", default="1,16", help="batch sizes of part 1")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--cache_length", type=int, default=0,
                 help="part 1: cache slots per row, as a rollout allocates for its "
                      "max_new_tokens (0: prompt + new tokens)")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds; the median is reported")
  p.add_argument("--parts", default="1,2,3", help="which parts to run")
  p.add_argument("--skip_hf", action="store_true", help="time m2 only in part 1")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "m2_bench_decode"),
                 help="trained target and draft (reused when present)")
  p.add_argument("--train_steps", type=int, default=150)
  p.add_argument("--train_batch", type=int, default=8)
  p.add_argument("--targets", default="8x512,4x256",
                 help="part 2 targets, LAYERSxDIM each (heads of 64, half as many kv heads, "
                      "mlp 4x); part 3 uses the first")
  p.add_argument("--draft_dim", type=int, default=128, help="draft d_model (1 layer)")
  p.add_argument("--num_draft", type=int, default=4, help="k, draft tokens per round")
  p.add_argument("--spec_batches", default="1,16", help="batch sizes of part 2")
  p.add_argument("--skip_eagle", action="store_true", help="part 2 without the EAGLE head")
  p.add_argument("--eagle_temperature", type=float, default=0.0,
                 help="temperature of the target samples the EAGLE head is distilled on")
  p.add_argument("--xla_cpu_flags", default="", help="appended to XLA_FLAGS on CPU")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


ARGS = parse_args()
ON_CPU = not pathlib.Path("/dev/nvidia0").exists() or os.environ.get(
    "JAX_PLATFORMS", "").startswith("cpu")
if ON_CPU and ARGS.xla_cpu_flags.strip():
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_cpu_flags).strip()

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from m2.model import ModelConfig, Transformer, preset  # noqa: E402
from m2.sampling import (ModelDrafter, Sampler, SamplingParams,  # noqa: E402
                         SpeculativeSampler)


def timed_rounds(contenders: dict, repeats: int, cpu: dict | None = None, warmup: int = 2
                 ) -> dict[str, list[float]]:
  """Runs every contender once per round, back to back, after `warmup` untimed rounds;
  returns wall seconds per timed round.

  `cpu`, when given, receives the process CPU seconds of each run: on a
  shared machine wall time includes waiting for a core, CPU time does not.
  """
  times = {name: [] for name in contenders}
  for name in contenders:
    if cpu is not None:
      cpu[name] = []
  for _ in range(warmup):  # untimed: the first calls after a compile often run ~2x slower
    for fn in contenders.values():
      fn()
  for _ in range(repeats):
    for name, fn in contenders.items():
      t0, c0 = time.perf_counter(), time.process_time()
      fn()
      times[name].append(time.perf_counter() - t0)
      if cpu is not None:
        cpu[name].append(time.process_time() - c0)
  return times


# --- part 1: m2 vs transformers -------------------------------------------------------

class HFRunner:

  def __init__(self, cfg: ModelConfig, model: Transformer, folder: str):
    import torch
    from transformers import Qwen2ForCausalLM

    from m2.model.hf import save_hf_checkpoint

    self.torch = torch
    save_hf_checkpoint(cfg, model, folder)
    self.device = "cuda" if (not ON_CPU and torch.cuda.is_available()) else "cpu"
    self.model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).to(
        self.device).eval()
    self.model.generation_config.eos_token_id = None  # always exactly new_tokens
    self.model.generation_config.pad_token_id = 0

  def pick_threads(self, prompts: np.ndarray) -> int:
    """Gives transformers its faster torch thread count for this batch: 1 or all cores.

    Several threads win on an idle machine; on a busy one each op's threads
    wait for each other at every barrier (40x slower here under load).
    """
    torch = self.torch
    if self.device != "cpu":
      return torch.get_num_threads()
    best = None
    for n in sorted({1, os.cpu_count() or 1}):
      torch.set_num_threads(n)
      self.generate(prompts, 4)
      t0 = time.perf_counter()
      self.generate(prompts, 16)
      took = time.perf_counter() - t0
      if best is None or took < best[1]:
        best = (n, took)
    torch.set_num_threads(best[0])
    return best[0]

  def generate(self, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    torch = self.torch
    ids = torch.from_numpy(prompts).long().to(self.device)
    with torch.inference_mode():
      out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, use_cache=True)
    if self.device == "cuda":
      torch.cuda.synchronize()
    return out[:, prompts.shape[1]:].cpu().numpy()


def part1(args, rows: list, result: dict):
  cfg = preset("tiny")
  model = Transformer(cfg, rngs=nnx.Rngs(args.seed))
  params = nnx.state(model)
  sampler = Sampler(model)
  greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
  hf = None
  if not args.skip_hf:
    folder = tempfile.mkdtemp(prefix="m2_decode_hf_")
    hf = HFRunner(cfg, model, folder)
    print(f"transformers {__import__('transformers').__version__}, torch "
          f"{hf.torch.__version__} ({hf.torch.get_num_threads()} threads, device={hf.device})")
  rng = np.random.default_rng(args.seed)
  for batch in map(int, args.batches.split(",")):
    prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len), dtype=np.int32)
    m2_run = lambda: sampler.generate(params, prompts.tolist(), greedy,  # noqa: E731
                                      cache_length=args.cache_length or None)
    t0 = time.perf_counter()
    out = m2_run()
    compile_s = time.perf_counter() - t0
    contenders = {"m2": m2_run}
    agree = threads = None
    if hf is not None:
      threads = hf.pick_threads(prompts)
      hf_tokens = hf.generate(prompts, args.new_tokens)
      agree = float((hf_tokens == out.tokens).all(axis=1).mean())
      contenders["transformers"] = lambda: hf.generate(prompts, args.new_tokens)  # noqa: E731
    cpu: dict = {}
    times = timed_rounds(contenders, args.repeats, cpu)
    tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
    ratio = tps["m2"] / tps["transformers"] if hf is not None else None
    cpu_ratio = (statistics.median(cpu["transformers"]) / statistics.median(cpu["m2"])
                 if hf is not None else None)
    print(f"batch {batch}: m2 compile+first call {compile_s:.1f} s; " + "  ".join(
        f"{k} {statistics.median(v) * 1e3:.0f} ms (cpu {statistics.median(cpu[k]) * 1e3:.0f} ms)"
        for k, v in times.items())
          + (f"; torch threads {threads}; greedy rows identical to transformers: {agree:.0%}"
             if agree is not None else ""))
    rows.append((f"greedy b{batch}", "m2", tps["m2"], ratio))
    if hf is not None:
      rows.append((f"greedy b{batch}", f"transformers ({threads} thr)", tps["transformers"],
                   None))
    result[f"m2_tok_s_b{batch}"] = round(tps["m2"], 1)
    result[f"hf_tok_s_b{batch}"] = round(tps["transformers"], 1) if hf else None
    result[f"ratio_b{batch}"] = round(ratio, 3) if ratio else None
    result[f"cpu_time_ratio_b{batch}"] = round(cpu_ratio, 3) if cpu_ratio else None
    result[f"hf_threads_b{batch}"] = threads
    result[f"hf_agree_b{batch}"] = agree


# --- part 2: speculative vs plain -------------------------------------------------------

CORPUS = ("mts_dialog", "aci_bench")


def corpus() -> dict[str, list[str]]:
  """Training dialogues of the corpus as text, through the de-identification gate."""
  from m2.data import deid, loaders

  docs = {}
  for name in CORPUS:
    records = deid.gate(loaders.load_source(name, splits=("train",)).records).records
    docs[name] = ["\n".join(f"{t.role.capitalize()}: {t.text}" for t in r.turns)
                  + (f"\n\n{r.note}" if r.note else "") for r in records]
  return docs


def target_config(shape: str, vocab_size: int) -> ModelConfig:
  """A part 2/3 target, shape "LAYERSxDIM": the tiny preset's family (4x256 is its
  shape), with the byte tokenizer's vocabulary padded to a multiple of 64 (an
  8192-row LM head would cost most of the training time and most of the draft's
  weights)."""
  try:
    layers, dim = map(int, shape.lower().split("x"))
  except ValueError:
    raise SystemExit(f"--targets: {shape!r} is not LAYERSxDIM, e.g. 8x512") from None
  if dim % 128:
    raise SystemExit(f"--targets: {shape!r}: DIM must be a multiple of 128 (heads of 64, "
                     f"half as many kv heads)")
  heads = dim // 64
  return preset("tiny").replace(vocab_size=-(-vocab_size // 64) * 64, num_layers=layers,
                                embed_dim=dim, num_heads=heads, num_kv_heads=heads // 2,
                                mlp_dim=4 * dim)


def train_pair(args, shape: str):
  """Target and draft (1 layer) trained on the same corpus; cached in workdir."""
  from m2.data.pipelines import lm_dataset
  from m2.data.tokenizers import ByteTokenizer
  from m2.train.checkpoint import Checkpointer
  from m2.train.loop import MeshConfig, TrainConfig, restore_params, train
  from m2.train.optimizer import OptimizerConfig

  tok = ByteTokenizer()
  docs = corpus()
  texts = [t for source in docs.values() for t in source]
  steps = args.train_steps
  train_cfg = TrainConfig(steps=steps, batch_size=args.train_batch, seq_len=128, log_every=50,
                          save_every=steps, keep_checkpoints=1, seed=args.seed,
                          optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=20,
                                                    decay_steps=steps - 20, end_lr_ratio=0.1))
  mesh_cfg = MeshConfig(shape=(1, 1, 1))
  target_cfg = target_config(shape, tok.vocab_size)
  draft_cfg = target_cfg.replace(num_layers=1, embed_dim=args.draft_dim,
                                 mlp_dim=4 * args.draft_dim, num_heads=2, num_kv_heads=1)
  models = {}
  for name, cfg in (("target", target_cfg), ("draft", draft_cfg)):
    workdir = os.path.join(args.workdir, f"{name}_bytes_v{cfg.vocab_size}_d{cfg.embed_dim}"
                                         f"_l{cfg.num_layers}_s{steps}_b{args.train_batch}"
                                         f"_seed{args.seed}")
    t0 = time.perf_counter()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    finished = ckpt.latest_step() == steps
    ckpt.close()
    if finished:  # a finished run: its weights only (the data iterator is not needed)
      params = restore_params(workdir, cfg, train_cfg, mesh_cfg)
      how = "loaded"
    else:
      data = lm_dataset(docs, tok, batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len,
                        seed=args.seed)
      params = train(cfg, train_cfg, mesh_cfg, data, workdir).state.params
      how = "trained"
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    print(f"{name}: {cfg.num_layers} layer(s), d {cfg.embed_dim}; {how} ({steps} steps) in "
          f"{time.perf_counter() - t0:.0f} s; final train loss {rows[-1]['loss']:.3f} "
          f"nats/byte ({workdir})")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0))))
    models[name] = nnx.merge(graphdef, jax.device_get(params))
  return tok, texts, models["target"], models["draft"]


def train_eagle(args, tok, texts, target):
  """An EAGLE head distilled from the target's own continuations of corpus windows
  (at --eagle_temperature) (`export.draft.train_eagle_head`); cached in workdir."""
  from export import draft as D

  cfg = D.DraftConfig(kind="eagle", prompts=256, prompt_len=args.prompt_len, new_tokens=96,
                      temperature=args.eagle_temperature, steps=args.train_steps * 2,
                      seed=args.seed, eagle_width=args.draft_dim)
  workdir = os.path.join(args.workdir, f"eagle1_t{cfg.temperature:g}_w{args.draft_dim}"
                                       f"_s{cfg.steps}_from_target_d{target.cfg.embed_dim}"
                                       f"_l{target.cfg.num_layers}_s{args.train_steps}"
                                       f"_seed{args.seed}")
  rng = np.random.default_rng(args.seed + 3)
  docs = [tok.encode(t) for t in texts if len(t.encode()) > 4 * args.prompt_len]
  prompts = []
  for d in rng.choice(len(docs), cfg.prompts, replace=False):
    start = int(rng.integers(0, len(docs[d]) - args.prompt_len))
    prompts.append(docs[d][start:start + args.prompt_len])
  t0 = time.perf_counter()
  samples, prompt_len = D.target_samples(target, nnx.state(target), prompts, cfg.new_tokens,
                                         temperature=cfg.temperature, seed=cfg.seed)
  params, report = D.train_eagle_head(target, samples, prompt_len, workdir, cfg)
  print(f"eagle head: 1 layer, d {args.draft_dim}, on the target's features; "
        f"{cfg.prompts} samples at T={cfg.temperature:g} + {cfg.steps} steps in "
        f"{time.perf_counter() - t0:.0f} s; "
        f"final token NLL {report['final'].get('token_nll', float('nan')):.3f} ({workdir})")
  return D.eagle_drafter(target.cfg, params)


def part2(args, tok, texts, target, drafters: dict, rows: list, result: dict, label: str,
          key_suffix: str):
  """drafters: name -> (Drafter, its params); each races plain decoding."""
  k = args.num_draft
  greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
  plain = Sampler(target)
  specs = {name: (SpeculativeSampler(target, d, num_draft_tokens=k), p)
           for name, (d, p) in drafters.items()}
  tp = nnx.state(target)
  rng = np.random.default_rng(args.seed + 1)
  docs = [t for t in texts if len(t.encode()) > 4 * args.prompt_len]
  for batch in map(int, args.spec_batches.split(",")):
    prompts = []
    for d in rng.choice(len(docs), batch, replace=False):
      ids = tok.encode(docs[d])
      start = int(rng.integers(0, len(ids) - args.prompt_len))
      prompts.append(ids[start:start + args.prompt_len])
    ref = plain.generate(tp, prompts, greedy)
    outs = {name: spec.generate(tp, prompts, greedy, draft_params=p)
            for name, (spec, p) in specs.items()}
    contenders = {"plain": lambda: plain.generate(tp, prompts, greedy)}  # noqa: B023
    for name, (spec, p) in specs.items():
      contenders[name] = (lambda spec=spec, p=p:  # noqa: B023
                          spec.generate(tp, prompts, greedy, draft_params=p))
    med = {name: statistics.median(v) for name, v in timed_rounds(contenders,
                                                                  args.repeats).items()}
    n = batch * args.new_tokens
    rows.append((f"{label} b{batch}", "m2 plain", n / med["plain"], None))
    print(f"target {label}, batch {batch}: plain {med['plain'] * 1e3:.0f} ms")
    for name, out in outs.items():
      same = bool((ref.tokens == out.tokens).all())
      speedup = med["plain"] / med[name]
      st = out.stats
      print(f"  {name} (k={k}) {med[name] * 1e3:.0f} ms: {speedup:.2f}x; acceptance "
            f"{st['acceptance_rate']:.1%}, {st['tokens_per_round']:.2f} tokens/round, "
            f"{st['rounds']} rounds, {st['compactions']} compactions; identical to plain "
            f"greedy: {same}")
      rows.append((f"{label} b{batch}", f"m2 {name} k={k}", n / med[name], speedup))
      spec = "spec" if name == "draft" else f"spec_{name}"
      end = f"_b{batch}{key_suffix}"
      result[f"{spec}_speedup{end}"] = round(speedup, 3)
      result[f"{spec}_acceptance{end}"] = round(st["acceptance_rate"], 4)
      result[f"{spec}_tokens_per_round{end}"] = round(st["tokens_per_round"], 3)
      result[f"{spec}_identical{end}"] = same
    if batch == 1:
      out = outs["draft"]
      print(f"  sample: {tok.decode(prompts[0])!r} -> {tok.decode(out.token_lists()[0])!r}")


def part3(args, tok, texts, target, rows: list, result: dict):
  """Second turn: append to the cached conversation vs recompute the whole history."""
  batch, first_len, turn_len, new = 16, 256, 64, 64
  sampler = Sampler(target)
  params = nnx.state(target)
  rng = np.random.default_rng(args.seed + 2)
  docs = [tok.encode(t) for t in texts if len(t.encode()) > 2 * (first_len + turn_len)]
  picks = rng.choice(len(docs), batch, replace=False)
  firsts = [docs[i][:first_len] for i in picks]
  turns = [docs[i][first_len:first_len + turn_len] for i in picks]
  sp = SamplingParams(temperature=0.0, max_new_tokens=new)
  cache_length = 1024

  def first_turn():
    return sampler.generate(params, firsts, sp, cache_length=cache_length)

  histories = None

  def recompute():
    return sampler.generate(params, histories, sp, cache_length=cache_length)

  out1 = first_turn()
  histories = [f + g + t for f, g, t in zip(firsts, out1.token_lists(), turns)]
  cont = sampler.generate(params, turns, sp, state=out1.state)
  ref = recompute()
  same = cont.token_lists() == ref.token_lists()
  cont_s, recompute_s = [], []
  for _ in range(args.repeats):
    state = first_turn().state
    t0 = time.perf_counter()
    sampler.generate(params, turns, sp, state=state)
    cont_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    recompute()
    recompute_s.append(time.perf_counter() - t0)
  c, r = statistics.median(cont_s), statistics.median(recompute_s)
  print(f"second turn, batch {batch}: history {first_len}+{new}+{turn_len} tokens, {new} new: "
        f"continue {c * 1e3:.0f} ms (prefill {cont.stats['prefill_tokens'] // batch} tokens/row)"
        f" vs recompute {r * 1e3:.0f} ms (prefill {len(histories[0])} tokens/row): "
        f"{r / c:.2f}x; identical: {same}")
  rows.append((f"2nd turn b{batch}", "m2 continue", batch * new / c, r / c))
  rows.append((f"2nd turn b{batch}", "m2 recompute", batch * new / r, None))
  result["continue_speedup_b16"] = round(r / c, 3)
  result["continue_identical"] = same


def main():
  args = ARGS
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} "
        f"device(s), {os.cpu_count()} CPU cores)")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  # Other work on the machine slows both sides of every comparison; say how much there was.
  load_start = os.getloadavg()[0]
  print(f"load average (1 min) at start: {load_start:.1f} on {os.cpu_count()} cores")
  cfg = preset("tiny")
  print(f"model: layers={cfg.num_layers} d={cfg.embed_dim} heads={cfg.num_heads}/"
        f"{cfg.num_kv_heads} head_dim={cfg.head_dim} mlp={cfg.mlp_dim} vocab={cfg.vocab_size} "
        f"fp32; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy"
        + (f"; part 1: {args.cache_length}-slot caches" if args.cache_length else ""))
  rows: list = []
  result: dict = {"bench": "decode"}
  parts = set(args.parts.split(","))
  if "1" in parts:
    part1(args, rows, result)
  shapes = args.targets.split(",")
  for i, shape in enumerate(shapes if "2" in parts else shapes[:1] if "3" in parts else []):
    tok, texts, target, draft = train_pair(args, shape)
    if "2" in parts:
      drafters = {"draft": (ModelDrafter(draft), nnx.state(draft))}
      if not args.skip_eagle:
        drafters["eagle"] = train_eagle(args, tok, texts, target)
      # JSON keys of the first target carry no suffix.
      part2(args, tok, texts, target, drafters, rows, result, shape,
            f"_t{shape}" if i else "")
    if "3" in parts and i == 0:
      part3(args, tok, texts, target, rows, result)

  hdr = f"{'case':<16}{'impl':<24}{'tok/s':>10}{'ratio':>8}"
  print("\n" + hdr)
  print("-" * len(hdr))
  for case, impl, tps, ratio in rows:
    print(f"{case:<16}{impl:<24}{tps:>10.0f}{(f'{ratio:.2f}x' if ratio else ''):>8}")
  result.update(load_avg_start=round(load_start, 1), load_avg_end=round(os.getloadavg()[0], 1),
                cpu_cores=os.cpu_count(), platform=jax.devices()[0].platform,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                cache_length=args.cache_length or None,
                num_draft=args.num_draft, draft_dim=args.draft_dim)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
