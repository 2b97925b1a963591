r"""Per-device memory plan of the sharded train step, computed analytically.

  python -m m2.tools.memory --config=configs/qwen2_5_32b.py:v5p64 --devices=32 --hbm_gib=95
  python -m m2.tools.memory --preset=qwen2_5_32b --mesh=1,8,1 --devices=8 --batch=8 \
      --seq_len=4096 --remat=full --dtype=bfloat16 --hbm_gib=80

or, from Python, `plan(model_cfg, mesh_shape, rules, batch, seq_len, remat_policy)`.
Nothing is allocated and no device is needed: parameter and optimizer shapes
come from `jax.eval_shape` of the real model and optimizer, per-device shard
sizes from `parallel.logical_to_spec` on an abstract mesh, so a 32B model on a
64-chip mesh plans in a fraction of a second.

What the peak of `make_train_step` holds, per device (the state is donated, so
the updated state reuses the argument buffers):

    params + optimizer state                    (the arguments)
  + grads                                       (param shapes and dtype)
  + L x residuals each scanned layer saves      (the remat policy decides which)
  + max(loss working set, one layer's backward working set)

With `microbatches` k > 1 (gradient accumulation) the activation terms are one
micro-batch's (batch / k rows) and the gradients are an fp32 sum plus one
micro-batch's gradient in the param dtype.

The residual lists are what XLA keeps, read from the compiled HLO (the forward
`while` loop's stacked outputs), not JAX's residual list. Attention is blocked
(`m2.model.modules.causal_attention`): it keeps a log-sum-exp per query row
instead of the [B,K,G,T,T] probabilities, and its backward works on one query
block's scores at a time. The working-set coefficients are fitted to
`compiled.memory_analysis()` of the real step on CPU (fp32, meshes (1,1,1),
(1,8,1), (2,2,2), 256 to 2048 tokens); tests/tools/memory_test.py holds the
plan within 15 % of it. Caveats:
  * bf16 on CPU: XLA CPU upcasts stacked bf16 residuals to fp32 in the backward
    loop, so `remat none` + bf16 uses up to 25 % more there than planned.
  * `dots`, `dots_no_batch` and `qkv_proj` are counted from the layer's matmul
    outputs, not fitted; in fp32 they plan 0.95-0.98 of XLA (medium model, T 256
    and 1024), and `dots_no_batch` is in the 15 % test.
  * GPU/TPU compilers fuse the loss and attention better and keep bf16
    intermediates in bf16; the working sets here count fp32, so on
    accelerators they are an upper bound.
  * remat `none` with long sequences on an FSDP mesh: XLA's heap packing leaves
    gaps. At (1,8,1), T 2048 it allocates a 1,257 MB heap for an 843 MB live peak
    (medium model), and the plan is 0.87 of the heap (tiny model: 313 MB for 207
    MB live, plan 0.83).
  * the fused attention kernels (m2/model/kernels.py) are counted from their
    code: no scores in memory; "pallas_gpu" repeats k and v per query head.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from m2 import configlib, parallel
from m2.model.config import ATTENTION, ModelConfig, model_config_from, preset
from m2.model.modules import Block, query_blocks
from m2.model.transformer import Transformer
from m2.train.optimizer import OptimizerConfig, make_optimizer
from m2.train.state import TrainState

GiB = 2 ** 30
POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")  # remat policies modeled

# Live [B,T,V] tensors at the loss backward, in fp32 units, by compute dtype bytes:
# the fp32 logits the fused head saves and d(logits) in the compute dtype
# (`m2.model.head`). In fp32 XLA writes d(logits) over the logits: one copy, plus
# 0.15 fitted (the heap's fragmentation).
LOSS_COPIES = {4: 1.15, 2: 1.5}
# [B,T,E] fp32 tensors live beside them (hidden states, their norm, d(hidden)); fitted.
LOSS_HIDDEN_COPIES = 8
# One layer's backward, in units of that layer's activations (fitted on CPU,
# see module docstring): [B,T,M] MLP tensors, [B,K,G,T,S] attention tensors,
# [B,T,E]-sized tensors, and copies of the layer's (gathered) weights.
_BACKWARD = {
    # policy: (mlp, scores, embed, weights)
    "none": (7.5, 2.0, 5.0, 1.5),
    "full": (8.0, 2.75, 6.0, 1.0),
}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of one train step. `activations` already includes its parts below."""

  params: int
  grads: int
  optimizer: int
  activations: int
  total: int
  # Parts of `activations`.
  saved_per_layer: int     # residuals one layer keeps for the backward pass
  saved: int               # all layers' residuals (num_layers x saved_per_layer + hoisted)
  loss: int                # loss working set ([B,T,V] and [B,T,E] copies, the head's gradient)
  layer_backward: int      # one layer's backward (recompute, cotangents) + what the loss leaves
  inputs: int              # the batch arrays
  # What was planned.
  mesh: dict[str, int] = dataclasses.field(default_factory=dict)
  batch: int = 0
  microbatches: int = 1
  seq_len: int = 0
  remat_policy: str = ""
  attention: str = "blocked"
  dtype: str = ""
  param_dtype: str = ""
  num_params: int = 0

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh.values())

  def fits(self, hbm_bytes: float) -> bool:
    return self.total <= hbm_bytes

  def table(self, hbm_gib: float | None = None) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
    loss_peak = self.loss >= self.layer_backward
    rows = [
        ("params", self.params, f"{self.param_dtype}, {_count(self.num_params)} parameters"),
        ("grads", self.grads, self.param_dtype if self.microbatches == 1 else
         f"fp32 sum + one micro-batch's in {self.param_dtype}"),
        ("optimizer", self.optimizer, "optimizer state (AdamW: mu, nu)"),
        ("activations", self.activations, f"remat {self.remat_policy}, compute {self.dtype}, "
                                          f"{self.attention} attention"),
        ("  saved by scan", self.saved, f"{_size(self.saved_per_layer)} per layer"),
        ("  loss", self.loss, "peak" if loss_peak else ""),
        ("  layer backward", self.layer_backward, "" if loss_peak else "peak"),
        ("total", self.total, ""),
    ]
    width = max(len(r[0]) for r in rows)
    micro = (f", {self.microbatches} micro-batches of {self.batch // self.microbatches}"
             if self.microbatches > 1 else "")
    lines = [f"memory per device: {mesh} ({self.num_devices} devices), "
             f"global batch {self.batch} x {self.seq_len}{micro}"]
    for name, n, note in rows:
      lines.append(f"  {name:<{width}}  {_size(n):>10}  {note}".rstrip())
    if hbm_gib:
      verdict = "fits" if self.fits(hbm_gib * GiB) else "does NOT fit"
      lines.append(f"  {verdict} in {hbm_gib:g} GiB ({self.total / (hbm_gib * GiB):.0%} used)")
    return "\n".join(lines)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))


def _size(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# --- sharding arithmetic ------------------------------------------------------------

def _abstract_mesh(mesh_shape: Sequence[int], axes: Sequence[str], num_devices: int | None):
  shape = [int(s) for s in mesh_shape]
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} has {len(shape)} entries for axes {tuple(axes)}")
  if -1 in shape:
    if shape.count(-1) > 1:
      raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    n = num_devices if num_devices is not None else jax.device_count()
    known = math.prod(s for s in shape if s != -1)
    if n % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not fit {n} devices")
    shape[shape.index(-1)] = n // known
  if any(s < 1 for s in shape):
    raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive")
  if num_devices is not None and math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"not {num_devices}")
  return jax.sharding.AbstractMesh(tuple(shape), tuple(axes))


class _Sharder:
  """Local (per-device) shapes under the rules, as `logical_to_spec` decides them."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, tuple(rules)
    self._cache = {}

  def local(self, shape, axes, drop: Sequence[str] = ()) -> tuple[int, ...]:
    key = (tuple(shape), tuple(axes), tuple(drop))
    if key not in self._cache:  # logical_to_spec warns once per replicated shape, not per leaf
      spec = parallel.logical_to_spec(axes, self.rules, shape, self.mesh)
      out = []
      for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = entry if isinstance(entry, tuple) else (entry,)
        out.append(dim // math.prod(self.mesh.shape[a] for a in names
                                    if a is not None and a not in drop))
      self._cache[key] = tuple(out)
    return self._cache[key]

  def nbytes(self, shape, axes, dtype, drop: Sequence[str] = ()) -> int:
    return math.prod(self.local(shape, axes, drop)) * jnp.dtype(dtype).itemsize


def _batch_axes(rules) -> list[str]:
  """The mesh axes the rules shard the batch over (FSDP shards the weights over them too)."""
  return jax.tree.leaves(parallel.logical_to_spec(("batch",), rules)[0])


def _state_bytes(tree, sharder: _Sharder, drop: Sequence[str] = ()) -> int:
  """Per-device bytes of an abstract nnx State / pytree, using `logical_axes` metadata."""
  total = 0
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  for leaf in jax.tree.leaves(tree, is_leaf=is_var):
    value = leaf.get_value() if is_var(leaf) else leaf
    axes = leaf.get_metadata().get("logical_axes") if is_var(leaf) else None
    if not hasattr(value, "shape"):
      continue
    if axes is None:  # counters, RNG keys: replicated
      total += math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
    else:
      total += sharder.nbytes(value.shape, axes, value.dtype, drop)
  return total


def abstract_state(model_cfg: ModelConfig, tx=None) -> TrainState:
  """The TrainState's shapes and dtypes (with logical-axis metadata), nothing allocated."""
  tx = tx if tx is not None else make_optimizer(OptimizerConfig())
  def make():
    return TrainState.create(nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))[1], tx)
  return jax.eval_shape(make)


# --- activations ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def checkpoint_names(model_cfg: ModelConfig) -> frozenset[str]:
  """Names the layer tags with `checkpoint_name`, read from its jaxpr (abstract trace)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(model_cfg, rngs=nnx.Rngs(0))))
  def layer(state, x):
    tokens = jnp.ones(x.shape[:2], jnp.int32)
    return nnx.merge(graphdef, state)(x, tokens, tokens)[0]
  x = jax.ShapeDtypeStruct((1, 8, model_cfg.embed_dim), model_cfg.compute_dtype)
  names = set()
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "name":
        names.add(eqn.params["name"])
      for sub in eqn.params.values():
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          walk(sub)
  walk(jax.make_jaxpr(layer)(state, x).jaxpr)
  return frozenset(names)


def _saved_per_layer(policy: str, u: dict[str, int], cb: int, cast_weights: int,
                     tagged: frozenset[str] = frozenset()) -> int:
  """Bytes one scanned layer keeps for backward, as XLA stacks them in the forward loop.

  u: local element counts; cb: compute dtype bytes; cast_weights: bytes of the layer's
  weights cast to the compute dtype (0 when compute and param dtypes agree).
  """
  a, q, kv, s, m = u["embed"], u["q"], u["kv"], u["scores"], u["mlp"]
  if policy == "none":
    norms = 2 * a * (8 + cb)          # per RMSNorm: two fp32 [B,T,E], the matmul input
    attn = 2 * q * cb + 2 * kv * cb   # roped q, attention output; transposed k, v
    attn += u["rows"] * 4             # fp32 log-sum-exp per query row
    mlp = 2 * m * cb                  # [gate, up] (what `swiglu_mlp` saves)
    return norms + attn + mlp + cast_weights
  carry = a * cb  # the layer input, from which the rest is recomputed
  if policy == "full":
    return carry
  qkv = q + 2 * kv  # fused qkv projection output [B,T,K,G+2,D]
  if policy == "dots":  # every matmul output, attention einsums included
    return carry + (qkv + s + q + a + 2 * m + a) * cb
  if policy == "dots_no_batch":  # matmuls without batch dims: the four weight matmuls
    return carry + (qkv + a + 2 * m + a) * cb
  if policy == "qkv_proj":  # the tensor tagged "qkv_proj"; untagged, this is `full`
    return carry + (qkv * cb if "qkv_proj" in tagged else 0)
  raise ValueError(f"the memory planner does not model remat_policy {policy!r}")


def _layer_backward(policy: str, u: dict[str, int], weights: int) -> int:
  """Working set of one layer's backward: recomputed forward + cotangents + weights."""
  # Policies between `none` and `full` recompute part of the layer: plan as `full`.
  mlp, scores, embed, w = _BACKWARD["none" if policy == "none" else "full"]
  elems = mlp * u["mlp"] + scores * u["scores"] + embed * (u["embed"] + u["q"] + u["kv"])
  return int(elems * 4 + w * weights)


# --- the plan -------------------------------------------------------------------------

def plan(model_cfg: ModelConfig, mesh_shape: Sequence[int] = (1, -1, 1),
         rules: parallel.Rules = parallel.DEFAULT_RULES, batch: int = 8, seq_len: int = 2048,
         remat_policy: str | None = None, *, num_devices: int | None = None,
         mesh_axes: Sequence[str] = parallel.MESH_AXES, tx=None,
         microbatches: int = 1) -> MemoryPlan:
  """Per-device memory of `make_train_step(...)` for this model, mesh and batch.

  mesh_shape: sizes for `mesh_axes`; one may be -1 (then `num_devices`, default
    the local device count, fills it). The mesh need not exist.
  rules:      logical -> mesh axis rules, as in `parallel.DEFAULT_RULES`.
  batch:      global batch (sequences); seq_len: tokens per sequence.
  remat_policy: overrides `model_cfg.remat_policy`.
  tx:         optax optimizer (default: m2's AdamW), only its state shapes matter.
  microbatches: gradient accumulation steps (`TrainConfig.microbatches`).
  """
  if remat_policy is not None:
    model_cfg = model_cfg.replace(remat_policy=remat_policy)
  policy = model_cfg.remat_policy
  if policy not in POLICIES:
    raise ValueError(f"the memory planner does not model remat_policy {policy!r}; "
                     f"it knows {list(POLICIES)}")
  mesh = _abstract_mesh(mesh_shape, mesh_axes, num_devices)
  parallel.check_rules(rules, mesh_axes)
  sh = _Sharder(mesh, rules)
  batch_axes = _batch_axes(rules)
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if batch % (shards * microbatches):
    raise ValueError(f"batch {batch} is not divisible by the {shards} batch shards "
                     f"(mesh axes {batch_axes}) x {microbatches} micro-batches; the train "
                     f"step would reject it")

  # State: exact shapes from the real model + optimizer.
  state = abstract_state(model_cfg, tx)
  params = _state_bytes(state.params, sh)
  optimizer = _state_bytes(state.opt_state, sh)
  # Accumulation keeps an fp32 sum besides one micro-batch's gradient.
  param_bytes = jnp.dtype(model_cfg.weight_dtype).itemsize
  grads = params + (params * 4 // param_bytes if microbatches > 1 else 0)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))

  # Activation units: local element counts of the tensors one layer makes.
  c = model_cfg
  rows = batch // microbatches   # what one forward/backward pass holds
  b, t, e = sh.local((rows, seq_len, c.embed_dim), ("batch", "length", "embed"))
  _, _, k, g, d = sh.local((rows, seq_len, c.num_kv_heads, c.q_per_kv, c.head_dim),
                           ("batch", "length", "kv_heads", "heads", "head_dim"))
  m = sh.local((rows, seq_len, 2, c.mlp_dim), ("batch", "length", None, "mlp"))[3]
  v = sh.local((rows, seq_len, c.vocab_size), ("batch", "length", "vocab"))[2]
  u = {"embed": b * t * e, "q": b * t * k * g * d, "kv": b * t * k * d,
       "rows": b * k * g * t, "mlp": b * t * m,
       # The largest query block's [B,K,G,rows,keys] scores (`query_blocks`).
       "scores": b * k * g * max((hi - lo) * hi for lo, hi in query_blocks(seq_len))}
  # The kernels keep their scores on chip; the GPU one saves (and differentiates) k
  # and v repeated to one per query head. Counted from the code: XLA CPU cannot check it.
  if c.attention == "pallas_gpu":
    u.update(kv=u["q"], scores=0)
  elif c.attention == "pallas_tpu":
    u.update(scores=0)
  cb = jnp.dtype(c.compute_dtype).itemsize

  # Weights a layer works on: the batch axes' (FSDP) shards are gathered for the matmuls.
  blocks = state.params["blocks"]
  weights = _state_bytes(blocks, sh, drop=batch_axes) // c.num_layers
  # Without remat the compute-dtype copy of each (sharded) weight is a residual too.
  pb = jnp.dtype(c.weight_dtype).itemsize
  cast = 0 if cb == pb else _state_bytes(blocks, sh) // c.num_layers * cb // pb

  tagged = checkpoint_names(model_cfg) if policy == "qkv_proj" else frozenset()
  per_layer = _saved_per_layer(policy, u, cb, cast, tagged)
  saved = c.num_layers * per_layer
  head = state.params["embed" if c.tie_embeddings else "lm_head"]
  head_full = _state_bytes(head, sh, drop=batch_axes)

  # Under FSDP the all-gathered embedding table of the forward lookup is still live
  # through the backward (XLA's schedule on CPU).
  embed_local = _state_bytes(state.params["embed"], sh)
  embed_full = _state_bytes(state.params["embed"], sh, drop=batch_axes)
  leftover = embed_full if embed_full != embed_local else 0
  loss = (int((LOSS_COPIES[cb] * v + LOSS_HIDDEN_COPIES * e) * b * t * 4)
          + head_full + leftover)
  backward = _layer_backward(policy, u, weights) + leftover
  inputs = 5 * (batch // shards) * t * 4  # inputs, targets, positions, segments, loss_mask
  activations = saved + max(loss, backward) + inputs
  return MemoryPlan(
      params=params, grads=grads, optimizer=optimizer, activations=activations,
      total=params + grads + optimizer + activations,
      saved_per_layer=per_layer, saved=saved, loss=loss, layer_backward=backward,
      inputs=inputs, mesh=dict(mesh.shape), batch=batch, microbatches=microbatches,
      seq_len=seq_len,
      remat_policy=policy, attention=c.attention, dtype=c.dtype, param_dtype=c.param_dtype, num_params=num_params)


@dataclasses.dataclass(frozen=True)
class RolloutPlan:
  """Per-device bytes while an RL stage generates: the learner's state stays resident."""

  state: int         # params + optimizer state (exact)
  resharded: int     # the params again in the sampler's layout (0 when it is the same)
  kv_cache: int      # the sampler's K and V caches (exact: `KVCache.init` shapes, sharded)
  working: int       # gathered weights, the prefill's activations, sampling buffers
  total: int
  rows: int = 0      # sequences decoded at once
  cache_length: int = 0

  def fits(self, hbm_bytes: float) -> bool:
    return self.total <= hbm_bytes

  def table(self, hbm_gib: float | None = None) -> str:
    lines = [f"rollout per device: {self.rows} sequences at once, cache {self.cache_length} slots",
             f"  train state   {_size(self.state):>10}  resident (params + optimizer)",
             *([f"  resharded     {_size(self.resharded):>10}  params in the sampler's layout"]
               if self.resharded else []),
             f"  KV cache      {_size(self.kv_cache):>10}",
             f"  working set   {_size(self.working):>10}  gathered weights, prefill, sampling",
             f"  total         {_size(self.total):>10}"]
    if hbm_gib:
      verdict = "fits" if self.fits(hbm_gib * GiB) else "does NOT fit"
      lines.append(f"  {verdict} in {hbm_gib:g} GiB ({self.total / (hbm_gib * GiB):.0%} used)")
    return "\n".join(lines)


def kv_cache_bytes(model_cfg: ModelConfig, sharder: "_Sharder", rows: int,
                   cache_length: int) -> int:
  """Per-device bytes of the sampler's cache for `rows` sequences of `cache_length` slots."""
  from m2.model.cache import KVCache
  c, dtype = model_cfg, model_cfg.compute_dtype
  k = (c.num_layers, rows, c.num_kv_heads, c.head_dim, cache_length)
  v = (c.num_layers, rows, c.num_kv_heads, cache_length, c.head_dim)
  segments = rows * cache_length * 4   # int32, on every device
  return sharder.nbytes(k, KVCache.K_AXES, dtype) + sharder.nbytes(v, KVCache.V_AXES, dtype) \
      + segments


def rollout_plan(model_cfg: ModelConfig, mesh_shape: Sequence[int] = (1, -1, 1),
                 rules: parallel.Rules = parallel.DEFAULT_RULES, rows: int = 8,
                 cache_length: int = 4096, prompt_length: int | None = None, *,
                 num_devices: int | None = None, mesh_axes: Sequence[str] = parallel.MESH_AXES,
                 tx=None, sampler_rules: parallel.Rules | None = None) -> RolloutPlan:
  """Per-device memory of generating `rows` sequences (prompts of up to `prompt_length`
  tokens, default `cache_length`) in a cache of `cache_length` slots: one
  `Sampler.generate` call, or one part of it under `max_rows`, beside the train state.
  The train state is sharded by `rules`, the sampler by `sampler_rules` (default:
  `rules`; other rules add the resharded copy of the params).

  The cache is exact. The working set is what XLA keeps besides it with the scan
  forward (the accelerator default), read from the compiled sampler on CPU
  (tests/tools/memory_test.py holds the plan within 20 %): the input and output
  embedding tables gathered over the batch (FSDP) axes for the whole call, two
  layers' gathered weights, the prefill's [tokens, 2 x mlp] activations, five
  [tokens, embed] ones and one query block's attention scores, and four fp32
  [rows, vocab] sampling buffers.
  """
  mesh = _abstract_mesh(mesh_shape, mesh_axes, num_devices)
  sampler_rules = tuple(sampler_rules or rules)
  parallel.check_rules(rules, mesh_axes)
  parallel.check_rules(sampler_rules, mesh_axes)
  state = abstract_state(model_cfg, tx)
  train_sh = _Sharder(mesh, rules)
  resident = _state_bytes(state.params, train_sh) + _state_bytes(state.opt_state, train_sh)
  sh = _Sharder(mesh, sampler_rules)
  resharded = _state_bytes(state.params, sh) if sampler_rules != tuple(rules) else 0
  batch_axes = _batch_axes(sampler_rules)
  c = model_cfg
  def gathered(tree):   # a copy only where the batch (FSDP) axes shard the weights
    full = _state_bytes(tree, sh, drop=batch_axes)
    return full if full != _state_bytes(tree, sh) else 0
  tables = state.params["embed"] if c.tie_embeddings else (state.params["embed"],
                                                           state.params["lm_head"])
  embeddings = gathered(tables) * (2 if c.tie_embeddings else 1)
  layer = gathered(state.params["blocks"]) // c.num_layers
  # Weights no collective gathers are cast to the compute dtype once, for all layers.
  pb, cb = jnp.dtype(c.weight_dtype).itemsize, jnp.dtype(c.compute_dtype).itemsize
  cast = _state_bytes(state.params, sh) * cb // pb if not layer and cb != pb else 0
  b, t, m = sh.local((rows, prompt_length or cache_length, 2 * c.mlp_dim),
                     ("batch", "length", "mlp"))
  e = sh.local((c.embed_dim,), ("embed",))[0]
  k = sh.local((c.num_kv_heads,), ("kv_heads",))[0]
  # One query block's fp32 scores and probabilities (`cached_attention`).
  block = max(hi - lo for lo, hi in query_blocks(t))
  prefill = b * t * (m + 5 * e) * cb + 2 * b * k * c.q_per_kv * block * cache_length * 4
  logits = 4 * b * c.vocab_size * 4
  cache = kv_cache_bytes(c, sh, rows, cache_length)
  working = embeddings + 2 * layer + cast + prefill + logits
  return RolloutPlan(state=resident, resharded=resharded, kv_cache=cache, working=working,
                     total=resident + resharded + cache + working, rows=rows,
                     cache_length=cache_length)


def rollout_plan_from_config(config, stage: str, num_devices: int | None = None) -> RolloutPlan:
  """The rollout plan of an RL stage (or sft_rs): its rows per generation call
  (`rollout_rows`, else all samples of a step) and their longest cache."""
  from m2.sampling.sampler import length_bucket
  from m2.train.loop import MeshConfig
  mesh_cfg = configlib.build(MeshConfig, config.mesh, "config.mesh")
  s = config[stage]
  samples = s.train.batch_size * (s.grpo.group_size if "grpo" in s else s.samples_per_prompt)
  # Consultations grow to train.seq_len; single turns to the prompt bucket + the answer.
  prompt = s.train.seq_len if stage == "rl_multiturn" else length_bucket(s.max_prompt_len)
  cache_length = -(-(prompt + s.max_new_tokens) // 64) * 64
  return rollout_plan(model_config_from(config.model), mesh_cfg.shape, mesh_cfg.rules,
                      rows=s.get("rollout_rows", 0) or samples, cache_length=cache_length,
                      prompt_length=prompt, num_devices=num_devices, mesh_axes=mesh_cfg.axes,
                      sampler_rules=mesh_cfg.sampler_rules)


def _train_section(config, stage: str | None):
  """(name, stage section or None, train section): `config.train` or `config.<stage>.train`."""
  if stage is None and "train" in config:
    return "config.train", None, config.train
  for name in ([stage] if stage else list(config.get("stages", ()))):
    if name in config and "train" in config[name]:
      return f"config.{name}.train", config[name], config[name].train
  raise ValueError(f"config has no train section for stage {stage!r}: expected config.train "
                   f"or config.<stage>.train with batch_size and seq_len")


def _rows_per_update(stage_cfg, batch_size: int) -> int:
  """Sequences in one optimizer step. RL stages count prompts in `batch_size`:
  GRPO trains on batch_size x group_size rows in `num_minibatches` updates, and
  rejection-sampling SFT on up to batch_size x max_keep_per_prompt rows at once."""
  from m2.rl.grpo import GRPOConfig
  if stage_cfg is not None and "grpo" in stage_cfg:
    grpo = stage_cfg.grpo
    return (batch_size * grpo.get("group_size", GRPOConfig.group_size)
            // grpo.get("num_minibatches", GRPOConfig.num_minibatches))
  if stage_cfg is not None and "max_keep_per_prompt" in stage_cfg:
    return batch_size * stage_cfg.max_keep_per_prompt
  return batch_size


def plan_args_from_config(config, stage: str | None = None) -> dict[str, Any]:
  """`plan` keyword arguments from an experiment config (`model`, `mesh`, a `train` section)."""
  from m2.train.loop import MeshConfig, TrainConfig
  mesh_cfg = configlib.build(MeshConfig, config.mesh, "config.mesh")
  where, stage_cfg, section = _train_section(config, stage)
  train_cfg = configlib.build(TrainConfig, section, where)
  return dict(model_cfg=model_config_from(config.model), mesh_shape=mesh_cfg.shape,
              rules=mesh_cfg.rules, mesh_axes=mesh_cfg.axes,
              batch=_rows_per_update(stage_cfg, train_cfg.batch_size), seq_len=train_cfg.seq_len,
              tx=make_optimizer(train_cfg.optimizer), microbatches=train_cfg.microbatches)


def plan_from_config(config, num_devices: int | None = None, stage: str | None = None,
                     **overrides) -> MemoryPlan:
  """Plan for an experiment config; `overrides` replace `plan` arguments."""
  return plan(**{**plan_args_from_config(config, stage), **overrides}, num_devices=num_devices)


# --- command line ---------------------------------------------------------------------

def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  if f.config is not None:
    args = plan_args_from_config(f.config, f.stage)
  else:
    args = dict(model_cfg=preset(f.preset), mesh_shape=(1, -1, 1),
                rules=parallel.DEFAULT_RULES, batch=8, seq_len=2048)
  # Flags given on the command line override the config.
  numerics = {k: getattr(f, k) for k in ("dtype", "param_dtype", "attention") if getattr(f, k)}
  if numerics:
    args["model_cfg"] = args["model_cfg"].replace(**numerics)
  if f.mesh:
    args["mesh_shape"] = tuple(int(s) for s in f.mesh.split(","))
  args["batch"] = f.batch or args["batch"]
  args["seq_len"] = f.seq_len or args["seq_len"]
  args["microbatches"] = f.microbatches or args.get("microbatches", 1)
  p = plan(**args, remat_policy=f.remat, num_devices=f.devices)
  print(p.table(f.hbm_gib))
  print(p.to_json())
  stage = f.config[f.stage] if f.config is not None and f.stage else None
  if stage is not None and ("grpo" in stage or "samples_per_prompt" in stage):
    print(rollout_plan_from_config(f.config, f.stage, f.devices).table(f.hbm_gib))


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                  lock_config=False)
  flags.DEFINE_string("preset", "tiny", "model preset when no --config is given "
                      "(with a config: --config.model.preset)")
  flags.DEFINE_string("stage", None, "stage whose train section sets batch, seq_len and "
                      "microbatches (default: config.train, else the first stage that has "
                      "one); an RL stage's batch is the sequences of one update")
  flags.DEFINE_string("mesh", None, "mesh shape data,fsdp,tensor, e.g. 1,8,1 (one may be -1)")
  flags.DEFINE_integer("devices", None, "device count for a -1 mesh entry (default: local)")
  flags.DEFINE_integer("batch", None, "global batch in sequences")
  flags.DEFINE_integer("seq_len", None, "tokens per sequence")
  flags.DEFINE_integer("microbatches", None, "gradient-accumulation micro-batches per step "
                       "(default: the config's, else 1)")
  flags.DEFINE_enum("remat", None, list(POLICIES), "remat policy (default: the model's)")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "compute dtype")
  flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"], "parameter dtype")
  flags.DEFINE_enum("attention", None, list(ATTENTION), "attention kernel (default: the model's)")
  flags.DEFINE_float("hbm_gib", None, "device memory to check the plan against, GiB")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
