"""Device mesh and logical-axis sharding.

Model code names the axes of parameters and activations logically
(`batch, length, embed, heads, kv_heads, head_dim, mlp, vocab, layers`). One
rule table, which is config data, maps each logical name to a mesh axis
(`data, fsdp, tensor`), a tuple of mesh axes, or None (replicated). This file
is the only place that turns names into `PartitionSpec`s.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards weights along `embed`; tensor parallelism shards heads and MLP.
# Query heads are stored grouped under their kv head (see model/modules.py), so
# tensor parallelism shards `kv_heads` and each shard computes whole groups.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", None),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("cache_length", None),
)

# Generation (`MeshConfig.rollout_rules`): weights split Megatron-style over heads,
# MLP and vocab on both `fsdp` and `tensor`, and rows over `data` only. A decode
# step then reads its own weight shard and all-reduces [rows, embed] twice a layer;
# under DEFAULT_RULES it all-gathers every layer's weights on every step.
DECODE_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("heads", None),
    ("kv_heads", ("fsdp", "tensor")),
    ("head_dim", None),
    ("mlp", ("fsdp", "tensor")),
    ("vocab", ("fsdp", "tensor")),
    ("layers", None),
    ("norm", None),
    ("cache_length", None),
)

LOGICAL_AXES = frozenset(name for name, _ in DEFAULT_RULES)

Rules = Sequence[tuple[str, Any]]
_WARNED: set = set()


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh; one entry of `shape` may be -1 (takes the remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {shape} has {len(shape)} entries for axes {tuple(axes)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or len(devices) % known:
    raise ValueError(f"mesh shape {shape} does not fit {len(devices)} devices")
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available")
  device_array = _device_grid(devices, shape)
  return Mesh(device_array, tuple(axes),
              axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def _device_grid(devices, shape):
  try:  # topology-aware placement on TPU/GPU; CPU devices have no topology
    from jax.experimental import mesh_utils
    return mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - fall back to the order jax reports
    return np.asarray(devices).reshape(shape)


def check_rules(rules: Rules, mesh_axes: Iterable[str] = MESH_AXES) -> None:
  """Fails with the offending entry if a rule names an unknown axis (a misspelled
  logical name would otherwise leave that axis unsharded, silently)."""
  mesh_axes = set(mesh_axes)
  for logical, physical in rules:
    if logical not in LOGICAL_AXES:
      raise ValueError(f"sharding rule {logical!r} -> {physical!r}: unknown logical axis "
                       f"{logical!r}; the model's are {sorted(LOGICAL_AXES)}")
    targets = physical if isinstance(physical, (tuple, list)) else (physical,)
    for t in targets:
      if t is not None and t not in mesh_axes:
        raise ValueError(f"sharding rule {logical!r} -> {physical!r}: unknown mesh axis "
                         f"{t!r}; mesh axes are {sorted(mesh_axes)}")


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules,
                    shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per array (first dimension wins). Given the
  `shape` and `mesh`, a dimension that the mesh axes do not divide is
  replicated instead, and a warning says so, so that odd shapes still run.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover "
                       f"{sorted(table)}")
    physical = table.get(name) if name is not None else None
    axes = tuple(a for a in (physical if isinstance(physical, (tuple, list)) else (physical,))
                 if a is not None and a not in used)
    if axes and shape is not None and mesh is not None:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % size:
        log.warning("dimension %d (%s, size %d) is not divisible by mesh axes %s "
                        "(size %d); replicating it", i, name, shape[i], axes, size)
        axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


# --- rules + mesh context used by the model's activation constraints ------------

_CONTEXT: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Activates `mesh` (jax.set_mesh) and `rules` for `constrain` calls."""
  check_rules(rules, mesh.axis_names)
  _CONTEXT.append((mesh, tuple(rules)))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _CONTEXT.pop()


def current() -> tuple[Mesh, Rules] | None:
  return _CONTEXT[-1] if _CONTEXT else None


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `sharding_context`."""
  ctx = current()
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = logical_to_spec(logical_axes, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --- shardings for whole states --------------------------------------------------

def logical_axes_of(tree: Any) -> Any:
  """The `logical_axes` metadata of every nnx Variable in `tree` (None for arrays)."""
  def axes(x):
    if isinstance(x, nnx.Variable):
      return x.get_metadata().get("logical_axes")
    return None
  return jax.tree.map(axes, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for an nnx State (abstract or concrete), from its metadata.

  Leaves without `logical_axes` metadata (scalars, RNG keys, counters) are
  replicated.
  """
  def sharding(x):
    value = x.get_value() if isinstance(x, nnx.Variable) else x
    shape = getattr(value, "shape", ())
    axes = x.get_metadata().get("logical_axes") if isinstance(x, nnx.Variable) else None
    if axes is None:
      return NamedSharding(mesh, PartitionSpec())
    if len(axes) != len(shape):
      raise ValueError(f"logical axes {axes} do not match shape {shape}")
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))

  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def data_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] input array."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def batch_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """Into how many pieces the rules split the batch dimension on `mesh`."""
  axes = logical_to_spec(("batch",), rules)[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def init_sharded(make_module, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Creates an nnx Module with every parameter born sharded on `mesh`.

  `make_module()` is traced once abstractly to read shapes and logical axes,
  then run under jit with out_shardings, so no device ever holds a full copy.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_module))
  shardings = state_shardings(abstract_state, mesh, rules)
  with sharding_context(mesh, rules):
    state = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)
