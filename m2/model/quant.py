"""Weight-only fake quantization (W4A16 / W8A16) for quantization-aware eval and training.

`ModelConfig.quant` switches it on: "none" (default: weights are used as they
are, the traced graph is unchanged), or "int{4|8}[_asym][_g{group}]", e.g.
"int4" (symmetric, group 128), "int4_asym_g64", "int8"; with an "aqt:" prefix
("aqt:int4", "aqt:int8_g64", symmetric only) the same scheme runs on AQT
(aqtp) quantizers: see `aqt_fake_quant`.

Each linear weight is quantized along its input dimension in groups of
`group` values, with one scale (and, asymmetric, one zero point) per output
channel and group: exactly the scheme `export/quantize.py` writes in the
compressed-tensors `pack-quantized` layout, with the same rounding, so an RTN
export dequantizes to the weights this forward pass uses, bit for bit, eager
or under jit. Scales are bfloat16 values, as serving engines keep them. Gradients pass straight through
(STE), so a model can be fine-tuned quantization-aware.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp

_SPEC = re.compile(r"^(?P<aqt>aqt:)?int(?P<bits>4|8)(?P<asym>_asym)?(?:_g(?P<group>\d+))?$")


@dataclasses.dataclass(frozen=True)
class QuantScheme:
  bits: int = 4
  symmetric: bool = True
  group_size: int = 128
  backend: str = "m2"  # "m2": the hand-written ops below; "aqt": aqtp quantizers

  @property
  def qmin(self) -> int:
    return -(1 << (self.bits - 1))

  @property
  def qmax(self) -> int:
    return (1 << (self.bits - 1)) - 1


def parse(spec: str) -> QuantScheme | None:
  """"none" -> None; "int4", "int8_asym", "aqt:int4_g64", ... -> QuantScheme."""
  if spec == "none":
    return None
  m = _SPEC.match(spec)
  if not m:
    raise ValueError(f"quant spec {spec!r}: want 'none', int{{4|8}}[_asym][_g<group>] or "
                     f"aqt:int{{4|8}}[_g<group>], e.g. 'int4', 'int4_asym_g64', 'aqt:int4'")
  group = int(m["group"] or 128)
  if group <= 0:
    raise ValueError(f"quant spec {spec!r}: group size must be positive")
  if m["aqt"] and m["asym"]:
    # aqtp 0.9.0 calibrates abs-max scales only; it has no zero point to match ours.
    raise ValueError(f"quant spec {spec!r}: the aqt backend is symmetric only; use "
                     f"{spec.removeprefix('aqt:')!r} for the asymmetric scheme")
  return QuantScheme(bits=int(m["bits"]), symmetric=not m["asym"], group_size=group,
                     backend="aqt" if m["aqt"] else "m2")


def round_to_bf16(x):
  """float32 -> the nearest bfloat16 value (ties to even), still as float32.

  Done on the bits: XLA may drop an f32 -> bf16 -> f32 convert pair under jit,
  which would keep the unrounded value.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def group_scales(groups, scheme: QuantScheme):
  """(scale, zero_point) of groups [..., n_groups, group, out] over the `group` axis.

  Symmetric: scale = max|w| / qmax, no zero point. Asymmetric: the range
  [min(w, 0), max(w, 0)] onto [qmin, qmax] with an integer zero point.
  Scales are rounded to bfloat16 values (kept as float32) before use; an
  all-zero group gets scale 1.
  """
  f32 = jnp.float32
  if scheme.symmetric:
    amax = jnp.max(jnp.abs(groups), axis=-2, keepdims=True).astype(f32)
    scale = amax / f32(scheme.qmax)
    zero = None
  else:
    wmin = jnp.minimum(jnp.min(groups, axis=-2, keepdims=True), 0).astype(f32)
    wmax = jnp.maximum(jnp.max(groups, axis=-2, keepdims=True), 0).astype(f32)
    scale = (wmax - wmin) / f32(scheme.qmax - scheme.qmin)
  scale = round_to_bf16(scale)
  scale = jnp.where(scale == 0, jnp.ones_like(scale), scale)
  if not scheme.symmetric:
    zero = jnp.clip(jnp.round(-wmin / scale) + scheme.qmin, scheme.qmin, scheme.qmax)
  return scale, zero


def fake_quant(w, in_axes: int, scheme: QuantScheme):
  """Quantize-dequantize `w`, whose first `in_axes` axes are the input dimension."""
  shape = w.shape
  n_in = math.prod(shape[:in_axes])
  if n_in % scheme.group_size:
    raise ValueError(f"fake_quant: input dimension {n_in} (weight shape {shape}) is not a "
                     f"multiple of the group size {scheme.group_size}")
  if scheme.backend == "aqt":
    return aqt_fake_quant(w, in_axes, scheme)
  f32 = jnp.float32
  groups = w.reshape(n_in // scheme.group_size, scheme.group_size, -1).astype(f32)
  s, zero = group_scales(groups, scheme)
  q = jnp.round(groups / s)
  if zero is not None:
    q = q + zero
  q = jnp.clip(q, scheme.qmin, scheme.qmax)
  if zero is not None:
    q = q - zero
  # (q - zero) * scale rounded to bfloat16, as compressed-tensors dequantizes
  # with bf16 scales (the float32 product of these small operands is exact).
  deq = round_to_bf16(q * s).astype(w.dtype).reshape(shape)
  # Straight-through gradient; the value is exactly deq (w - stop_gradient(w) is 0).
  return w - jax.lax.stop_gradient(w) + jax.lax.stop_gradient(deq)


def aqt_fake_quant(w, in_axes: int, scheme: QuantScheme):
  """The symmetric `fake_quant` scheme on AQT: aqtp's abs-max calibration per tile
  (= group), IntSymmetric numerics and its straight-through gradient.

  It equals the hand-written path (tested) because `preserve_max_val=True` maps max|w|
  to qmax (AQT's default maps it to qmax + 0.5 and clips) and scales and q * scale are
  rounded to bfloat16, as the export format keeps them. The one possible difference:
  AQT multiplies by 1 / scale where we divide, so a value within a float32 ulp of a
  half step may round the other way. Call it through `fake_quant` (checks the group).
  """
  shape = w.shape
  w2 = w.reshape(math.prod(shape[:in_axes]), -1).astype(jnp.float32)
  return _aqt_qdq(w2, scheme.bits, scheme.group_size).astype(w.dtype).reshape(shape)


def _aqt_tiling(shape, group):
  # Imported here: the model runs without aqtp unless an "aqt:" scheme is asked for.
  from aqt.jax.v2 import tiled_dot_general
  # Groups along the input axis are AQT tiles: calibration shares a scale within a tile.
  state = tiled_dot_general.TilingState(untiled_shape=tuple(shape))
  state.tile_one_axis(tiled_dot_general.AxisTiling(axis=0, tile_size=group,
                                                   tile_count=shape[0] // group))
  return state


def _aqt_qdq_fwd(w2, bits, group):
  from aqt.jax.v2 import aqt_quantizer
  quantizer = aqt_quantizer.quantizer_make(bits, preserve_max_val=True)
  qt = quantizer.calibrate(w2, calibration_axes=[0], tiling_state=_aqt_tiling(w2.shape, group))
  qt = qt.replace(scale=[round_to_bf16(s) for s in qt.scale])
  qt, quant_grad = quantizer.calculate_qvalue(w2, qt)
  return round_to_bf16(qt.dequant()), quant_grad


def _aqt_qdq_bwd(bits, group, quant_grad, g):
  # AQT's numerics backward (IntSymmetric, clip_gradient=False: the identity, i.e. a
  # straight-through estimator), applied on the tiled layout it was made for.
  tiling = _aqt_tiling(g.shape, group)
  grad, _ = quant_grad(tiling.apply(g))
  return (tiling.unapply(grad),)


# A custom VJP because autodiff through AQT's round gives a zero gradient; AQT hands
# its backward to the caller (`quant_grad`), as its own dot_general does.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _aqt_qdq(w2, bits, group):
  return _aqt_qdq_fwd(w2, bits, group)[0]


_aqt_qdq.defvjp(_aqt_qdq_fwd, _aqt_qdq_bwd)


def maybe_quant(w, in_axes: int, spec: str):
  """`w` unchanged when `spec` is "none", else its fake-quantized value."""
  scheme = parse(spec)
  return w if scheme is None else fake_quant(w, in_axes, scheme)


# The linear weights the forward quantizes (m2/model/modules.py), and how many leading
# axes of one layer's weight are its input dimension.
INPUT_AXES = {"qkv": 1, "out": 3, "gate_up": 1, "down": 1}


def computed_weights(params, spec: str):
  """The Transformer's params (nested dict or nnx.State, layers stacked) with every
  quantized weight replaced by the value the forward computes with under `spec`.

  For export: with these, a quant="none" model computes what the quantization-aware
  one does, so a dense HF folder of them serves the model that was trained.
  """
  scheme = parse(spec)
  if scheme is None:
    return params
  from flax import nnx
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)

  def one(path, w):
    name = getattr(path[-1], "key", None)
    if name not in INPUT_AXES:
      return w
    per_layer = functools.partial(fake_quant, in_axes=INPUT_AXES[name], scheme=scheme)
    return jax.jit(jax.vmap(per_layer))(w).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, params)
