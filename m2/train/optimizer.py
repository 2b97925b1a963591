"""AdamW with warmup + cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 10
  decay_steps: int = 0          # 0: constant after warmup
  end_lr_ratio: float = 0.1     # cosine ends at learning_rate * end_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0   # 0 disables clipping

  def __post_init__(self):
    for f in ("learning_rate", "eps"):
      if not getattr(self, f) > 0:
        raise ValueError(f"OptimizerConfig.{f}: must be > 0 (got {getattr(self, f)!r})")
    for f in ("warmup_steps", "decay_steps", "weight_decay", "grad_clip_norm"):
      if getattr(self, f) < 0:
        raise ValueError(f"OptimizerConfig.{f}: must be >= 0 (got {getattr(self, f)!r})")
    for f in ("b1", "b2", "end_lr_ratio"):
      if not 0 <= getattr(self, f) <= 1:
        raise ValueError(f"OptimizerConfig.{f}: must be in [0, 1] (got {getattr(self, f)!r})")


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
  if cfg.decay_steps:
    after = optax.cosine_decay_schedule(cfg.learning_rate, cfg.decay_steps, cfg.end_lr_ratio)
  else:
    after = optax.constant_schedule(cfg.learning_rate)
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _decay_mask(params):
  # Decay matrices only: norm scales and biases are left alone. A parameter's name is
  # its last dict key (an nnx Variable adds its own `.value` attribute after it).
  def keep(path, _):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    name = str(keys[-1]) if keys else ""
    return not (name == "scale" or name.endswith("bias"))
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
      optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask),
  )
