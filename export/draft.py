r"""A small draft model for speculative decoding, distilled from the target.

  python -m export.draft --workdir=runs/tiny --out=exports/tiny-draft --layers=1 --steps=300

1. The target (an m2 run's checkpoint) writes greedy continuations of medical
   prompts (de-identified MTS-Dialog train documents) with m2's `Sampler`.
2. A draft with the target's tokenizer, width and head layout but 1-2 layers
   starts from the target's embeddings, final norm, LM head and first layers,
   and is trained with m2's train loop on those samples: sequence-level
   knowledge distillation (Kim & Rush 2016, arXiv 1606.07947), the loss on the
   target's tokens only.
3. It is exported like the target (`export.to_hf.write_hf_folder`).
4. `evaluate` measures, on held-out prompts (MTS-Dialog test1), the mean
   tokens per speculative round at k draft tokens with m2's
   `SpeculativeSampler` and the wall-clock speed-up over plain decoding, and
   the same speed-up for transformers' assisted generation
   (`generate(..., assistant_model=draft)`) on CPU.

`--kind=eagle` trains an EAGLE head instead (`m2.sampling.eagle`; Li et al. 2024):
one layer over (the target's feature at t-1, the token at t), regressing the
target's feature at t (smooth L1) plus `eagle_cls_weight` x the cross entropy
of the target's token through the target's LM head, on the same samples and
the target's features. The folder holds `model.safetensors` in EAGLE's own
checkpoint names (`fc.weight`, `layers.0.*`; no embedding or LM head: it reads
the target's) and `eagle_config.json` (the target's config);
`read_eagle_folder` + `eagle_drafter` load it for `SpeculativeSampler`. For a
Qwen2 target at full width it also writes the `config.json` of vLLM's EAGLE-1
drafter (`EagleLlamaForCausalLM`, a one-layer Llama with qkv bias), so
`vllm serve TARGET --speculative-config '{"method": "eagle", "model": FOLDER,
"num_speculative_tokens": 4}'` can use it. That layout is checked against
transformers' Qwen2 decoder layer, not against vLLM itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DraftConfig:
  kind: str = "model"         # "model": a small Transformer; "eagle": an EAGLE head
  layers: int = 1
  prompts: int = 256          # distillation prompts
  prompt_len: int = 32
  new_tokens: int = 96        # target tokens per prompt
  temperature: float = 0.0    # of the target's samples (0: greedy)
  steps: int = 200
  batch_size: int = 16
  learning_rate: float = 2e-3
  eagle_cls_weight: float = 0.1  # EAGLE's loss: feature regression + this x token CE
  eagle_width: int = 0        # the EAGLE layer's width (0: the target's)
  eagle_draft_vocab: int = 0  # draft among the samples' most frequent tokens (0: all)
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"DraftConfig.kind: one of {KINDS} (got {self.kind!r})")
    if not self.temperature >= 0:
      raise ValueError(f"DraftConfig.temperature: must be >= 0 (got {self.temperature!r})")
    if not (isinstance(self.eagle_draft_vocab, int) and self.eagle_draft_vocab >= 0):
      raise ValueError(f"DraftConfig.eagle_draft_vocab: an int >= 0, 0 for the whole "
                       f"vocabulary (got {self.eagle_draft_vocab!r})")
    for f in ("layers", "prompts", "prompt_len", "new_tokens", "steps", "batch_size"):
      if not (isinstance(getattr(self, f), int) and getattr(self, f) > 0):
        raise ValueError(f"DraftConfig.{f}: must be a positive int (got {getattr(self, f)!r})")


KINDS = ("model", "eagle")


def draft_config(target_cfg, layers: int):
  if not 1 <= layers <= target_cfg.num_layers:
    raise ValueError(f"draft layers must be in [1, {target_cfg.num_layers}] (got {layers})")
  return target_cfg.replace(num_layers=layers)


def init_draft_params(target_params: dict, layers: int) -> dict:
  """Embeddings, final norm, head and the first `layers` blocks of the target."""
  import jax
  out = {k: v for k, v in target_params.items() if k != "blocks"}
  out["blocks"] = jax.tree.map(lambda a: np.asarray(a)[:layers], target_params["blocks"])
  return out


def medical_prompts(tokenizer, split: str, n: int, length: int, seed: int = 0,
                    data_dir: str | None = None) -> list[list[int]]:
  """`n` prompts of `length` tokens: the start of de-identified MTS-Dialog documents."""
  from export.quantize import medical_texts

  docs = medical_texts(split, data_dir=data_dir)
  rng = np.random.default_rng(seed)
  prompts = []
  for i in rng.permutation(len(docs)):
    ids = tokenizer.encode(docs[i])
    if len(ids) >= length:
      prompts.append(ids[:length])
    if len(prompts) == n:
      return prompts
  raise ValueError(f"only {len(prompts)} {split} documents have {length} tokens; {n} needed")


def target_samples(model, params, prompts, new_tokens: int, batch: int = 64,
                   temperature: float = 0.0, seed: int = 0) -> np.ndarray:
  """[n, prompt + new] continuations of `prompts` by the target (no stop tokens),
  greedy or sampled at `temperature`."""
  from m2.sampling.sampler import Sampler, SamplingParams

  sampler = Sampler(model, seed=seed)
  sp = SamplingParams(temperature=temperature, max_new_tokens=new_tokens)
  rows = []
  for i in range(0, len(prompts), batch):
    chunk = prompts[i:i + batch]
    out = sampler.generate(params, chunk, sp)
    for p, t in zip(chunk, out.token_lists()):
      rows.append(list(p) + t)
  width = max(map(len, rows))
  return np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32), len(prompts[0])


def distillation_dataset(samples: np.ndarray, prompt_len: int, batch_size: int, seed: int):
  """grain batches for `lm_loss`: the loss only on the target's generated tokens."""
  import grain

  n, width = samples.shape
  examples = []
  for row in samples:
    mask = np.zeros(width - 1, np.int32)
    mask[prompt_len - 1:] = 1          # targets from the first generated token on
    examples.append({"inputs": row[:-1], "targets": row[1:],
                     "positions": np.arange(width - 1, dtype=np.int32),
                     "segments": np.ones(width - 1, np.int32), "loss_mask": mask})
  return (grain.MapDataset.source(examples).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True).to_iter_dataset())


def m2_model(cfg, params):
  from flax import nnx

  from m2.model.transformer import Transformer
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def _distillation_samples(target, tokenizer, cfg: DraftConfig, data_dir):
  from flax import nnx
  prompts = medical_prompts(tokenizer, "train", cfg.prompts, cfg.prompt_len, cfg.seed, data_dir)
  return target_samples(target, nnx.state(target), prompts, cfg.new_tokens,
                        temperature=cfg.temperature, seed=cfg.seed)


def _train_config(cfg: DraftConfig, seq_len: int):
  """m2 train-loop settings of a distillation run (no weight decay: see _eagle_trainer)."""
  from m2.train.loop import TrainConfig
  from m2.train.optimizer import OptimizerConfig
  return TrainConfig(
      steps=cfg.steps, batch_size=cfg.batch_size, seq_len=seq_len,
      log_every=max(1, cfg.steps // 5), save_every=cfg.steps, keep_checkpoints=1,
      seed=cfg.seed, optimizer=OptimizerConfig(
          learning_rate=cfg.learning_rate, warmup_steps=max(1, cfg.steps // 10),
          decay_steps=max(1, cfg.steps - cfg.steps // 10), weight_decay=0.0))


def distill(target_cfg, target_params, tokenizer, workdir: str, cfg: DraftConfig, *,
            data_dir: str | None = None):
  """Trains the draft in `workdir` (resumable, m2's train loop). Returns (cfg, params, report)."""
  import jax
  from flax import nnx

  from m2.model.transformer import Transformer
  from m2.train.loop import MeshConfig, train

  target = m2_model(target_cfg, target_params)
  start = time.time()
  samples, prompt_len = _distillation_samples(target, tokenizer, cfg, data_dir)
  sample_s = time.time() - start
  dcfg = draft_config(target_cfg, cfg.layers)
  init = init_draft_params(target_params, cfg.layers)
  init_state = nnx.state(nnx.eval_shape(lambda: Transformer(dcfg, rngs=nnx.Rngs(0))), nnx.Param)
  nnx.replace_by_pure_dict(init_state, jax.tree.map(np.asarray, init))
  result = train(dcfg, _train_config(cfg, samples.shape[1] - 1), MeshConfig(),
                 distillation_dataset(samples, prompt_len, cfg.batch_size, cfg.seed),
                 workdir, init_params=init_state, meta={"stage": "draft"})
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(result.state.params))
  report = {"samples": int(samples.shape[0]), "sample_s": sample_s,
            "train_s": result.wall_s, "final": result.final_metrics}
  return dcfg, params, report


# --- EAGLE head ------------------------------------------------------------------------

def target_features(model, samples: np.ndarray, batch: int = 64) -> np.ndarray:
  """[n, W, E] the target's final hidden states (what its LM head reads) over `samples`."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, return_hidden=True)[0])
  return np.concatenate([np.asarray(run(state, samples[i:i + batch]))
                         for i in range(0, len(samples), batch)])


def eagle_dataset(samples: np.ndarray, features: np.ndarray, prompt_len: int, batch_size: int,
                  seed: int):
  """grain batches for `eagle_loss`: at position t the head reads token x_t and the
  feature f_{t-1} (zeros at t = 0) and learns f_t and x_{t+1}, on generated tokens."""
  import grain

  n, width = samples.shape
  examples = []
  for row, f in zip(samples, features):
    mask = np.zeros(width - 1, np.int32)
    mask[prompt_len - 1:] = 1
    examples.append({"inputs": row[:-1], "targets": row[1:],
                     "features_in": np.concatenate([np.zeros_like(f[:1]), f[:-2]]),
                     "features": f[:-1],
                     "positions": np.arange(width - 1, dtype=np.int32),
                     "segments": np.ones(width - 1, np.int32), "loss_mask": mask})
  return (grain.MapDataset.source(examples).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True).to_iter_dataset())


def _eagle_trainer(cfg, width: int | None):
  """An EagleHead beside the target's embedding (and LM head), which it does not train:
  `eagle_loss` stops their gradients and the draft optimizer has no weight decay."""
  from flax import nnx

  from m2.model.modules import param
  from m2.sampling.eagle import EagleHead

  class EagleTrainer(nnx.Module):

    def __init__(self, rngs):
      self.head = EagleHead(cfg, rngs=rngs, width=width)
      self.embed = param(None, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"),
                         cfg.weight_dtype)
      if not cfg.tie_embeddings:
        self.lm_head = param(None, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"),
                             cfg.weight_dtype)

    def output_embedding(self):
      if cfg.tie_embeddings:
        return self.embed[...], "ve"
      return self.lm_head[...], "ev"

  return EagleTrainer


def eagle_loss(model, batch, cls_weight: float):
  """EAGLE's objective: smooth-L1 regression of the target's features plus
  `cls_weight` x the cross entropy of the target's tokens under the target's LM head."""
  import jax
  import jax.numpy as jnp

  from m2.model import head

  embed = jax.lax.stop_gradient(model.embed[...])
  out, out_axes = model.output_embedding()
  pred, _ = model.head(jnp.take(embed, batch["inputs"], axis=0), batch["features_in"],
                       batch["positions"], batch["segments"])
  err = jnp.abs(pred.astype(jnp.float32) - batch["features"])
  feature_loss = jnp.mean(jnp.where(err < 1.0, 0.5 * err * err, err - 0.5), axis=-1)
  nll = -head.target_logprobs(pred, jax.lax.stop_gradient(out), batch["targets"], out_axes)[0]
  mask = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.maximum(mask.sum(), 1.0)
  mean = lambda x: (x * mask).sum() / tokens  # noqa: E731
  return (mean(feature_loss + cls_weight * nll),
          {"tokens": mask.sum(), "weight": mask.sum(), "feature_loss": mean(feature_loss),
           "token_nll": mean(nll)})


def distill_eagle(target_cfg, target_params, tokenizer, workdir: str, cfg: DraftConfig, *,
                  data_dir: str | None = None):
  """Trains an EAGLE head in `workdir` on the target's samples of medical prompts
  (m2's train loop, resumable). Returns (params of the EagleHead, report)."""
  target = m2_model(target_cfg, target_params)
  start = time.time()
  samples, prompt_len = _distillation_samples(target, tokenizer, cfg, data_dir)
  sample_s = time.time() - start
  params, report = train_eagle_head(target, samples, prompt_len, workdir, cfg)
  return params, {**report, "sample_s": sample_s}


def train_eagle_head(target, samples: np.ndarray, prompt_len: int, workdir: str,
                     cfg: DraftConfig):
  """Trains an EAGLE head for the Transformer `target` on its own `samples`
  ([n, W] token ids; the loss from `prompt_len` on) and their features."""
  import functools

  import jax
  from flax import nnx

  from m2.train.loop import MeshConfig, train

  features = target_features(target, samples)
  trainer = _eagle_trainer(target.cfg, cfg.eagle_width or None)
  make = lambda: trainer(nnx.Rngs(cfg.seed))  # noqa: E731
  init = nnx.state(make(), nnx.Param)
  shared = {"embed": target.embed[...]}
  if not target.cfg.tie_embeddings:
    shared["lm_head"] = target.lm_head[...]
  nnx.replace_by_pure_dict(init, {"head": nnx.to_pure_dict(init)["head"],
                                  **jax.tree.map(np.asarray, shared)})
  result = train(target.cfg, _train_config(cfg, samples.shape[1] - 1), MeshConfig(),
                 eagle_dataset(samples, features, prompt_len, cfg.batch_size, cfg.seed),
                 workdir, init_params=init, meta={"stage": "eagle_draft"}, make_model=make,
                 loss_fn=functools.partial(eagle_loss, cls_weight=cfg.eagle_cls_weight))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(result.state.params)["head"])
  if cfg.eagle_draft_vocab:
    params["draft_vocab"] = frequent_tokens(samples[:, prompt_len:], cfg.eagle_draft_vocab,
                                            target.cfg.vocab_size)
  return params, {"kind": "eagle", "samples": int(samples.shape[0]),
                  "train_s": result.wall_s, "final": result.final_metrics}


def frequent_tokens(tokens: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
  """The `n` most frequent ids of `tokens` (ties: lower id first), sorted: a draft
  vocabulary."""
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size)
  return np.sort(np.argsort(-counts, kind="stable")[:n]).astype(np.int32)


EAGLE_WEIGHTS, EAGLE_CONFIG = "model.safetensors", "eagle_config.json"


def eagle_conversions(target_cfg, width: int | None = None, draft_vocab: int = 0) -> list:
  """The head's tensors under EAGLE's checkpoint names, which vLLM's EAGLE-1 drafter
  loads: fc.weight [W, 2E] over concat(embedding, feature) and layers.0.* as in the
  target family's decoder layer, without input_layernorm (`m2.model.hf.conversions`
  gives those). A narrower head (W < E) adds m2's own up.weight [E, W], and a draft
  vocabulary its token ids, draft_vocab [N] (vLLM's EAGLE-1 skips both names)."""
  from m2.model import hf
  from m2.sampling.eagle import layer_config

  lc = layer_config(target_cfg, width)
  e, w = target_cfg.embed_dim, lc.embed_dim
  out = [hf.Conversion(("fc",), None, ("fc.weight",), ((w, 2 * e),),
                       lambda t: t.T.reshape(2, e, w), lambda a: (a.reshape(2 * e, w).T,))]
  for c in hf.conversions(lc):
    if c.layer == 0 and c.m2_path[1] != "attn_norm":
      out.append(dataclasses.replace(
          c, m2_path=c.m2_path[1:], layer=None,
          hf_names=tuple(n.removeprefix("model.") for n in c.hf_names)))
  if w != e:
    out.append(hf.Conversion(("up",), None, ("up.weight",), ((e, w),), lambda t: t.T,
                             lambda a: (a.T,)))
  if draft_vocab:
    out.append(hf.Conversion(("draft_vocab",), None, ("draft_vocab",), ((draft_vocab,),),
                             lambda t: t, lambda a: (a,)))
  return out


def vllm_eagle_config(target_cfg) -> dict | None:
  """config.json of vLLM's EAGLE-1 drafter for a full-width head over a Qwen2 target:
  a one-layer Llama whose q/k/v carry biases (`qkv_bias`) and o_proj none, as in
  Qwen2. None where vLLM has no matching layer (Qwen3's qk-norm)."""
  if target_cfg.family != "qwen2":
    return None
  return {**target_cfg.to_hf_config(), "architectures": ["LlamaForCausalLM"],
          "model_type": "llama", "num_hidden_layers": 1, "attention_bias": False,
          "mlp_bias": False, "qkv_bias": target_cfg.qkv_bias}


def write_eagle_folder(target_cfg, head_params: dict, folder) -> None:
  """The head's weights (`eagle_conversions`), eagle_config.json with the target's
  config and, where vLLM has a matching drafter, its config.json."""
  import pathlib

  from safetensors.numpy import save_file

  folder = pathlib.Path(folder)
  width = int(np.shape(head_params["fc"])[-1])
  vocab = int(np.size(head_params.get("draft_vocab", ())))
  tensors = {}
  for c in eagle_conversions(target_cfg, width, vocab):
    value = head_params
    for key in c.m2_path:
      value = value[key]
    tensors.update(zip(c.hf_names, c.to_hf(np.asarray(value))))
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(folder / EAGLE_WEIGHTS))
  (folder / EAGLE_CONFIG).write_text(json.dumps(
      {"draft": "eagle", "width": width, "draft_vocab": vocab,
       "target_model": dataclasses.asdict(target_cfg)},
      indent=2))
  vllm = vllm_eagle_config(target_cfg) if width == target_cfg.embed_dim else None
  if vllm is not None:
    (folder / "config.json").write_text(json.dumps(vllm, indent=2))


def read_eagle_folder(folder) -> tuple[Any, dict]:
  """(target ModelConfig, head parameters as a nested dict) from `write_eagle_folder`."""
  import pathlib

  from safetensors.numpy import load_file

  from m2.model.config import ModelConfig

  folder = pathlib.Path(folder)
  for name in (EAGLE_WEIGHTS, EAGLE_CONFIG):
    if not (folder / name).exists():
      raise FileNotFoundError(f"{folder} is not an EAGLE head folder: {name} is missing")
  meta = json.loads((folder / EAGLE_CONFIG).read_text())
  cfg = ModelConfig(**meta["target_model"])
  tensors = load_file(str(folder / EAGLE_WEIGHTS))
  convs = eagle_conversions(cfg, meta["width"], meta.get("draft_vocab", 0))
  expected = {n: shape for c in convs for n, shape in zip(c.hf_names, c.hf_shapes)}
  found = {n: tuple(t.shape) for n, t in tensors.items()}
  if found != expected:
    wrong = sorted(n for n in expected.keys() & found.keys() if expected[n] != found[n])
    raise ValueError(
        f"{folder / EAGLE_WEIGHTS} does not hold a width-{meta['width']} EAGLE head of this "
        f"target: missing {sorted(expected.keys() - found.keys())}, unexpected "
        f"{sorted(found.keys() - expected.keys())}, wrong shape {wrong}")
  params: dict = {}
  for c in convs:
    *parents, leaf = c.m2_path
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = c.from_hf(*(tensors[n] for n in c.hf_names))
  return cfg, params


def eagle_drafter(target_cfg, head_params):
  """(EagleDrafter, its nnx.State) from the head's nested dict of arrays."""
  from flax import nnx

  from m2.sampling.eagle import EagleDrafter, EagleHead

  width = np.shape(head_params["fc"])[-1]  # [2, E, width]
  vocab = int(np.size(head_params.get("draft_vocab", ())))
  module = nnx.eval_shape(lambda: EagleHead(target_cfg, rngs=nnx.Rngs(0), width=width,
                                            draft_vocab=vocab))
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, head_params)
  return EagleDrafter(module), state


def speculative_stats(target_cfg, target_params, drafter, draft_state, prompts,
                      new_tokens: int, k: int = 4, temperature: float = 0.0) -> dict:
  """Mean tokens per round (acceptance length) and wall speed-up with m2's sampler.

  drafter, draft_state: a `Drafter` and its parameters (`model_drafter`, `eagle_drafter`).
  Greedy by default; with a temperature, rows are sampled (seeded per prompt) and the
  output is checked against plain decoding only in distribution (tests/sampling).
  """
  from flax import nnx

  from m2.sampling.sampler import Sampler, SamplingParams
  from m2.sampling.speculative import SpeculativeSampler

  target = m2_model(target_cfg, target_params)
  plain = Sampler(target)
  spec = SpeculativeSampler(target, drafter, num_draft_tokens=k)
  tp, dp = nnx.state(target), draft_state

  def timed(fn):
    fn()                        # compile
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start

  rounds, accepted = [], []
  plain_s = spec_s = 0.0
  same = True
  for i, p in enumerate(prompts):  # batch 1: single-user decoding, as on a 24 GB GPU
    sp = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, seed=i)
    base, t0 = timed(lambda: plain.generate(tp, [p], sp))
    out, t1 = timed(lambda: spec.generate(tp, [p], sp, draft_params=dp))
    same &= out.token_lists() == base.token_lists()
    plain_s += t0
    spec_s += t1
    rounds.append(out.stats["tokens_per_round"])
    accepted.append(out.stats["acceptance_rate"])
  return {"k": k, "tokens_per_round": float(np.mean(rounds)),
          "acceptance_rate": float(np.mean(accepted)),
          "speedup": plain_s / spec_s, "plain_s": plain_s, "speculative_s": spec_s,
          "identical_to_plain_greedy": bool(same) if temperature == 0 else None,
          "temperature": temperature, "prompts": len(prompts)}


def model_drafter(draft_cfg, draft_params):
  """(ModelDrafter, its nnx.State) for a small Transformer draft."""
  from flax import nnx

  from m2.sampling.speculative import ModelDrafter

  draft = m2_model(draft_cfg, draft_params)
  return ModelDrafter(draft), nnx.state(draft)


def assisted_generation_stats(target_dir, draft_dir, prompts, new_tokens: int) -> dict:
  """transformers' assisted generation on CPU: speed-up over plain greedy `generate`."""
  import torch
  from transformers import AutoModelForCausalLM

  target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
  draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).eval()
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
  plain_s = assisted_s = 0.0
  same = True
  with torch.no_grad():
    for p in prompts:
      x = torch.as_tensor([p])
      target.generate(x, max_new_tokens=2, do_sample=False)    # warm up
      t = time.perf_counter()
      a = target.generate(x, **kw)
      plain_s += time.perf_counter() - t
      t = time.perf_counter()
      b = target.generate(x, assistant_model=draft, **kw)
      assisted_s += time.perf_counter() - t
      same &= torch.equal(a, b)
  return {"speedup": plain_s / assisted_s, "plain_s": plain_s, "assisted_s": assisted_s,
          "identical_to_plain_greedy": bool(same), "prompts": len(prompts)}


def build_draft(workdir: str, out: str, cfg: DraftConfig, *, stage: str | None = None,
                train_dir: str | None = None, overwrite: bool = False,
                eval_prompts: int = 8, eval_tokens: int = 64, k: int = 4,
                eval_temperature: float = 0.0) -> dict:
  """Distils, exports to `out` and evaluates (decoding at `eval_temperature`; 0: greedy).
  Returns the report (also out/draft_report.json)."""
  from export import to_hf

  stage_dir = to_hf.find_stage_dir(workdir, stage)
  target_cfg, target_params, meta, step = to_hf.read_checkpoint(stage_dir)
  tokenizer = to_hf.load_run_tokenizer(meta)
  train_dir = train_dir or os.path.join(os.path.dirname(os.path.abspath(out)),
                                        f".{os.path.basename(out)}.train")
  return draft_folder(target_cfg, target_params, tokenizer, out, cfg, train_dir=train_dir,
                      overwrite=overwrite, eval_prompts=eval_prompts, eval_tokens=eval_tokens,
                      k=k, eval_temperature=eval_temperature)


def draft_folder(target_cfg, target_params, tokenizer, out: str, cfg: DraftConfig, *,
                 train_dir: str, overwrite: bool = False, eval_prompts: int = 8,
                 eval_tokens: int = 64, k: int = 4, data_dir: str | None = None,
                 eval_temperature: float = 0.0) -> dict:
  """`build_draft` from weights in memory (a nested dict of host arrays), e.g. those the
  pipeline's export stage receives. Writes the HF folder `out` (atomically) with
  draft_report.json; `train_dir` keeps the distillation checkpoints (a rerun resumes)."""
  from export import to_hf

  with to_hf.atomic_dir(out, overwrite) as tmp:
    if cfg.kind == "eagle":
      dparams, report = distill_eagle(target_cfg, target_params, tokenizer, train_dir, cfg,
                                      data_dir=data_dir)
      write_eagle_folder(target_cfg, dparams, tmp)
      drafter = eagle_drafter(target_cfg, dparams)
    else:
      dcfg, dparams, report = distill(target_cfg, target_params, tokenizer, train_dir, cfg,
                                      data_dir=data_dir)
      to_hf.write_hf_folder(dcfg, dparams, tmp, tokenizer)
      drafter = model_drafter(dcfg, dparams)
    held = medical_prompts(tokenizer, "test1", eval_prompts, cfg.prompt_len, cfg.seed + 1,
                           data_dir)
    report["m2_speculative"] = speculative_stats(target_cfg, target_params, *drafter, held,
                                                 eval_tokens, k, eval_temperature)
    (tmp / "draft_report.json").write_text(json.dumps(report, indent=2))
  return report


def main(argv=None):
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--stage", default=None)
  p.add_argument("--kind", default="model", choices=KINDS,
                 help="model: a small Transformer (exported as an HF folder); eagle: an "
                      "EAGLE head over the target's features (EAGLE-1 layout)")
  p.add_argument("--layers", type=int, default=1)
  p.add_argument("--eagle_width", type=int, default=0,
                 help="width of the EAGLE layer (0: the target's embed_dim)")
  p.add_argument("--eagle_draft_vocab", type=int, default=0,
                 help="draft among this many of the samples' most frequent tokens (0: all)")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--prompts", type=int, default=256)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--temperature", type=float, default=0.0,
                 help="sample the target's distillation text at this temperature (0: greedy)")
  p.add_argument("--eval_prompts", type=int, default=8, help="held-out prompts (MTS-Dialog test1)")
  p.add_argument("--eval_temperature", type=float, default=0.0,
                 help="decode the held-out prompts at this temperature (0: greedy)")
  p.add_argument("--target_hf", default=None,
                 help="the target's HF export, to also time transformers assisted generation")
  p.add_argument("--overwrite", action="store_true")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  cfg = DraftConfig(kind=a.kind, layers=a.layers, steps=a.steps, prompts=a.prompts,
                    temperature=a.temperature, eagle_width=a.eagle_width,
                    eagle_draft_vocab=a.eagle_draft_vocab)
  report = build_draft(a.workdir, a.out, cfg, stage=a.stage, overwrite=a.overwrite, k=a.k,
                       eval_prompts=a.eval_prompts, eval_temperature=a.eval_temperature)
  if a.target_hf and cfg.kind == "model":
    from export import to_hf
    _, _, meta, _ = to_hf.read_checkpoint(to_hf.find_stage_dir(a.workdir, a.stage))
    tok = to_hf.load_run_tokenizer(meta)
    held = medical_prompts(tok, "test1", a.eval_prompts, cfg.prompt_len, cfg.seed + 1)
    report["transformers_assisted"] = assisted_generation_stats(a.target_hf, a.out, held, 64)
  print(json.dumps({"bench": "draft", **report}))


if __name__ == "__main__":
  main()
