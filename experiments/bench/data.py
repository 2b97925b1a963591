r"""Data pipeline throughput (packed tokens/s) against what the train step consumes.

The pipeline must never be the bottleneck: at least 3x the train step's tokens/s.
Rows:
  * tiny LM:  configs/tiny.py's midtrain pipeline (SentencePiece 8192, the full
              medical + math mix, 8 x 256) against the tiny model's train step,
              measured here on one CPU device (default XLA flags, as
              `python -m m2.main` runs it).
  * tiny SFT: configs/tiny.py's sft pipeline (chat windows, first-fit packing).
  * 1.5B LM:  configs/qwen2_5_1_5b.py's midtrain pipeline (Qwen2.5 tokenizer,
              16 x 2048) against Qwen2.5-1.5B's train step. That step does not
              fit this machine's memory (fp32 weights + Adam = 25 GB), so its
              tokens/s is estimated from FLOPs: the FLOP rate the tiny step
              achieved here, divided by 1.5B's FLOPs per token (PaLM appendix B:
              6 N + 12 L H Dh T). Large matmuls run closer to peak than tiny
              ones, so the estimate errs high, against the pipeline. For scale,
              the same model on one H100 at 40 % MFU trains ~44k tokens/s.

Pipelines are timed after a few warm-up batches (their start-up, mix weights
and first TFDS reads are not counted), over at least `--min_tokens` tokens and
`--min_seconds`. Data is prepared first (cached; the first run takes about a
minute, mostly de-identification and the tokenizer).

Command (2-core CPU, about 2 minutes when the data and tokenizers are cached):
    /tmp/venv/bin/python experiments/bench/data.py
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def time_pipeline(dataset, tokens_per_batch: int, min_tokens: int, min_seconds: float,
                  warmup: int = 3) -> tuple[float, dict]:
  """(packed tokens/s, stats) of iterating `dataset`."""
  it = iter(dataset)
  for _ in range(warmup):
    next(it)
  n, trained, real, start = 0, 0, 0, time.perf_counter()
  while n * tokens_per_batch < min_tokens or time.perf_counter() - start < min_seconds:
    b = next(it)
    trained += int(b["loss_mask"].sum())
    real += int((b["segments"] > 0).sum())
    n += 1
  dt = time.perf_counter() - start
  total = n * tokens_per_batch
  return total / dt, {"batches": n, "seconds": dt, "non_pad": real / total,
                      "trained": trained / total}


def step_flops_per_token(cfg, seq: int) -> float:
  """Training FLOPs per token: 6 x matmul params + attention (no causal credit)."""
  matmul = cfg.num_params() - cfg.vocab_size * cfg.embed_dim * (
      0 if cfg.tie_embeddings else 1) - cfg.embed_dim
  return 6.0 * matmul + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def time_train_step(model_cfg, batch: dict, steps: int) -> float:
  """Tokens/s of m2's jitted train step (AdamW) on one device, after 2 warm-up steps."""
  import jax
  from flax import nnx

  from m2 import parallel
  from m2.model import Transformer
  from m2.train.optimizer import OptimizerConfig, make_optimizer
  from m2.train.state import init_train_state, lm_loss, make_train_step

  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx = make_optimizer(OptimizerConfig())
  graphdef, state, shardings = init_train_state(
      lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)), tx, mesh)
  step = make_train_step(graphdef, tx, lm_loss, mesh, shardings)
  batch = {k: jax.device_put(np.asarray(v)) for k, v in batch.items()}
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return batch["inputs"].size * steps / (time.perf_counter() - start)


def lm_pipeline(config, *, threads: int | None = None, tokenizer: str | None = None):
  from m2 import configlib
  from m2.data import mixture, pipelines, tfds_builders
  from m2.main import MidtrainConfig

  data_cfg = configlib.build(pipelines.DataConfig, config.data, "config.data")
  if tokenizer:
    data_cfg = dataclasses.replace(data_cfg, tokenizer=tokenizer)
  stage = configlib.build(MidtrainConfig, config.midtrain, "config.midtrain")
  tok = pipelines.load_data_tokenizer(data_cfg)
  specs = [s for names in stage.domains.values() for s in names]
  docs = pipelines.prepare_data("documents", specs, data_cfg)
  mix = mixture.Mixture(stage.mix, {d: tuple(tfds_builders.source_name(s) for s in names)
                                    for d, names in stage.domains.items()})
  resolved = mix.resolve(n for n, r in docs.report["sources"].items() if r["train"])
  t = stage.train
  data = pipelines.lm_dataset(
      docs.sources_dict(), tok, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed,
      mixture=resolved, read_threads=data_cfg.read_threads if threads is None else threads,
      chars={s: r["train_chars"] for s, r in docs.report["sources"].items()})
  return data, t.batch_size * t.seq_len


def sft_pipeline(config):
  from m2 import configlib
  from m2.data import pipelines
  from m2.data.chat import ChatFormat
  from m2.main import SFTConfig

  data_cfg = configlib.build(pipelines.DataConfig, config.data, "config.data")
  stage = configlib.build(SFTConfig, config.sft, "config.sft")
  tok = pipelines.load_data_tokenizer(data_cfg)
  chats = pipelines.prepare_data("chats", stage.sources, data_cfg)
  fmt = ChatFormat(tok, thinking_mode=stage.thinking_mode, system=stage.system or None)
  t = stage.train
  data = pipelines.sft_dataset(chats.sources_dict(), fmt, batch_size=t.batch_size,
                               seq_len=t.seq_len, seed=t.seed, pack=stage.pack,
                               read_threads=data_cfg.read_threads)
  return data, t.batch_size * t.seq_len


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--min_tokens", type=int, default=1_000_000)
  parser.add_argument("--min_seconds", type=float, default=5.0)
  parser.add_argument("--train_steps", type=int, default=10)
  parser.add_argument("--threads", default="0,2", help="read_threads to try for the 1.5B row")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)

  from m2.model.config import model_config_from, preset

  tiny = load_config("tiny")
  big = load_config("qwen2_5_1_5b")
  rows, out = [], {"bench": "data"}

  # Tiny: pipeline vs measured train step (on batches of the pipeline itself).
  lm, tokens = lm_pipeline(tiny)
  lm_tps, lm_stats = time_pipeline(lm, tokens, args.min_tokens, args.min_seconds)
  sft, sft_tokens = sft_pipeline(tiny)
  sft_tps, sft_stats = time_pipeline(sft, sft_tokens, args.min_tokens, args.min_seconds)
  tiny_model = model_config_from(tiny.model)
  train_tps = time_train_step(tiny_model, next(iter(lm)), args.train_steps)
  seq = tiny.midtrain.train.seq_len
  achieved = train_tps * step_flops_per_token(tiny_model, seq)   # FLOP/s of the tiny step
  rows.append(("tiny LM (sp:8192, 8x256)", lm_tps, lm_stats["non_pad"], train_tps, "measured"))
  rows.append(("tiny SFT (sp:8192, 8x256)", sft_tps, sft_stats["non_pad"], train_tps,
               "measured"))
  out.update(tiny_lm_tok_s=round(lm_tps), tiny_sft_tok_s=round(sft_tps),
             tiny_train_tok_s=round(train_tps), tiny_lm_ratio=round(lm_tps / train_tps, 1),
             tiny_sft_ratio=round(sft_tps / train_tps, 1),
             tiny_sft_non_pad=round(sft_stats["non_pad"], 3),
             tiny_train_gflop_s=round(achieved / 1e9, 1))

  # 1.5B: pipeline vs the train step estimated from FLOPs at the tiny step's rate.
  big_model = preset("qwen2_5_1_5b")
  big_seq = big.midtrain.train.seq_len
  big_train = achieved / step_flops_per_token(big_model, big_seq)
  for threads in [int(t) for t in args.threads.split(",")]:
    data, tokens = lm_pipeline(big, threads=threads, tokenizer="qwen2.5")
    tps, stats = time_pipeline(data, tokens, args.min_tokens, args.min_seconds)
    rows.append((f"1.5B LM (qwen2.5, 16x2048, {threads} threads)", tps, stats["non_pad"],
                 big_train, "FLOPs estimate"))
    out[f"big_lm_tok_s_threads{threads}"] = round(tps)
  big_best = max(v for k, v in out.items() if k.startswith("big_lm_tok_s"))
  out.update(big_train_tok_s_est=round(big_train, 1), big_ratio=round(big_best / big_train),
             big_h100_40mfu_tok_s=round(989e12 * 0.4 / step_flops_per_token(big_model, big_seq)),
             big_vs_h100=round(big_best / (989e12 * 0.4 / step_flops_per_token(big_model,
                                                                                big_seq)), 2))

  print(f"\n{'pipeline':<40}{'pipe tok/s':>12}{'non-pad':>9}{'train tok/s':>13}{'ratio':>9}"
        f"  train figure")
  for name, tps, non_pad, train, how in rows:
    print(f"{name:<40}{tps:>12,.0f}{non_pad:>9.1%}{train:>13,.1f}{tps / train:>8,.0f}x  {how}")
  print(f"tiny train step: {achieved / 1e9:.1f} GFLOP/s achieved; 1.5B on one H100 at 40 % MFU "
        f"would need {out['big_h100_40mfu_tok_s']:,} tok/s (pipeline here: "
        f"{out['big_vs_h100']}x that)")
  out["min_ratio"] = min(out["tiny_lm_ratio"], out["tiny_sft_ratio"], out["big_ratio"])
  print(json.dumps(out))
  return 0 if out["min_ratio"] >= 3 else 1


if __name__ == "__main__":
  sys.exit(main())
