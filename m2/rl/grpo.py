"""Improved GRPO as pure functions: advantages, reward shaping, the policy loss.

Host-side pieces work on numpy arrays of one rollout batch laid out as
consecutive groups (`group_size` responses per prompt); the loss works on
jax arrays inside the jitted learner step. Knob names follow verl / TRL.

What Baichuan-M2 changed relative to vanilla GRPO (DeepSeekMath), each a knob:
- no KL term (`beta=0`; no reference model is built or run),
- clip-higher: asymmetric `epsilon` / `epsilon_high` (DAPO, arXiv 2503.14476),
- token-level loss aggregation (`loss_agg_mode="token-mean"`, DAPO),
- advantage = reward - group mean, no std division (`norm_adv_by_std=False`,
  Dr.GRPO, arXiv 2503.20783),
- a dynamic length reward that only applies inside groups that are already good
  (`dynamic_length_reward`).
Also here: dual clip (arXiv 1912.09729), truncated importance sampling to the
sampler's log-probs (`tis_cap`, "Your efficient RL framework secretly brings you
off-policy RL training", Yao et al. 2025), DAPO dynamic sampling
(`informative_groups`) and DAPO's soft overlong punishment counted in tokens
(`overlong_penalty`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclasses.dataclass(frozen=True)
class LengthRewardConfig:
  """Baichuan-M2's dynamic length reward (concision inside already-good groups).

  A group qualifies when the `quantile` of its task scores is above
  `group_threshold`; inside it, each response scoring at least
  `good_threshold` gets `coef * (0.5 - (len - min) / (max - min))` over the
  good responses' token lengths (Kimi k1.5's length reward, arXiv 2501.12599):
  the shortest good response +coef/2, the longest -coef/2. Other responses and
  groups get 0. `coef=0` turns it off.
  """
  coef: float = 0.0
  quantile: float = 0.8
  group_threshold: float = 0.5
  good_threshold: float = 0.5

  def __post_init__(self):
    if self.coef < 0:
      raise ValueError(f"LengthRewardConfig.coef must be >= 0, got {self.coef!r}")
    if not 0 <= self.quantile <= 1:
      raise ValueError(f"LengthRewardConfig.quantile must be in [0, 1], got {self.quantile!r}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """config.<stage>.grpo: the algorithm's knobs (defaults: Baichuan-M2's improved GRPO).

  group_size:       responses sampled per prompt (G).
  epsilon:          lower clip, ratio >= 1 - epsilon (PPO).
  epsilon_high:     upper clip, ratio <= 1 + epsilon_high (DAPO clip-higher; = epsilon
                    is symmetric PPO clipping).
  dual_clip:        c > 1 bounds the loss of negative-advantage tokens at -A * c
                    (Ye et al. 2019); 0 turns it off.
  loss_agg_mode:    "token-mean" (DAPO, the paper), "seq-mean-token-mean" (GRPO) or
                    "seq-mean-token-sum-norm" (Dr.GRPO: token sums / `norm_tokens`).
  norm_tokens:      the constant of seq-mean-token-sum-norm (0: the batch's padded length).
  norm_adv_by_std:  divide advantages by the group std (vanilla GRPO; off in Dr.GRPO/M2).
  beta:             KL-to-reference coefficient (k3 estimator, Schulman 2020); 0 builds
                    and runs no reference model.
  tis_cap:          truncated importance sampling: weight each token by
                    min(pi_learner / pi_sampler, tis_cap), detached; 0 turns it off.
  entropy_coef:     entropy bonus (0: entropy is only logged).
  dynamic_sampling: drop groups whose rewards are all equal and refill the batch (DAPO).
  max_refill_rounds: extra rollout rounds dynamic sampling may take per step.
  num_minibatches:  optimizer steps per rollout batch (its rows split evenly). With
                    more than one, the learner first computes the batch's old log-probs,
                    so later minibatches are off-policy and the clip range matters; with
                    one, the ratio is 1 (value) and only its gradient counts.
  overlong_buffer:  DAPO soft overlong punishment: the last `overlong_buffer` tokens
                    before `max_new_tokens` are penalised linearly up to
                    `overlong_penalty`; 0 turns it off.
  overlong_penalty: the penalty at (and past) the limit.
  length_reward:    Baichuan-M2's dynamic length reward.
  """
  group_size: int = 8
  epsilon: float = 0.2
  epsilon_high: float = 0.28
  dual_clip: float = 0.0
  loss_agg_mode: str = "token-mean"
  norm_tokens: int = 0
  norm_adv_by_std: bool = False
  beta: float = 0.0
  tis_cap: float = 2.0
  entropy_coef: float = 0.0
  dynamic_sampling: bool = True
  max_refill_rounds: int = 2
  num_minibatches: int = 1
  overlong_buffer: int = 0
  overlong_penalty: float = 1.0
  length_reward: LengthRewardConfig = LengthRewardConfig()

  def __post_init__(self):
    def check(ok, name, msg):
      if not ok:
        raise ValueError(f"GRPOConfig.{name}: {msg} (got {getattr(self, name)!r})")

    check(isinstance(self.group_size, int) and self.group_size >= 2, "group_size",
          "must be an int >= 2 (advantages compare responses within a group)")
    check(0 < self.epsilon < 1, "epsilon", "must be in (0, 1)")
    check(self.epsilon_high > 0, "epsilon_high", "must be > 0")
    check(self.dual_clip == 0 or self.dual_clip > 1, "dual_clip", "must be 0 (off) or > 1")
    check(self.loss_agg_mode in LOSS_AGG_MODES, "loss_agg_mode", f"must be one of {LOSS_AGG_MODES}")
    check(isinstance(self.norm_tokens, int) and self.norm_tokens >= 0, "norm_tokens",
          "must be an int >= 0")
    check(self.beta >= 0, "beta", "must be >= 0")
    check(self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap", "must be 0 (off) or >= 1")
    check(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
    check(isinstance(self.max_refill_rounds, int) and self.max_refill_rounds >= 0,
          "max_refill_rounds", "must be an int >= 0")
    check(isinstance(self.num_minibatches, int) and self.num_minibatches >= 1,
          "num_minibatches", "must be an int >= 1")
    check(isinstance(self.overlong_buffer, int) and self.overlong_buffer >= 0,
          "overlong_buffer", "must be an int >= 0")
    check(self.overlong_penalty >= 0, "overlong_penalty", "must be >= 0")
    if isinstance(self.length_reward, Mapping):
      object.__setattr__(self, "length_reward", LengthRewardConfig(**self.length_reward))


# ---------------------------------------------------------------- host side


def _groups(x: np.ndarray, group_size: int) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 1 or x.size % group_size:
    raise ValueError(f"expected a flat array of whole groups of {group_size}, got shape {x.shape}")
  return x.reshape(-1, group_size)


def group_advantages(rewards, group_size: int, norm_adv_by_std: bool = False,
                     eps: float = 1e-6) -> np.ndarray:
  """Reward minus its group's mean (divided by the group's std when asked).

  rewards: [N] with N = groups * group_size, groups consecutive. Returns [N] float32.
  The std is the unbiased one (as in DeepSeekMath / TRL).
  """
  r = _groups(rewards, group_size)
  adv = r - r.mean(axis=1, keepdims=True)
  if norm_adv_by_std:
    adv = adv / (r.std(axis=1, ddof=1, keepdims=True) + eps)
  return adv.reshape(-1).astype(np.float32)


def informative_groups(rewards, group_size: int, atol: float = 1e-9) -> np.ndarray:
  """DAPO dynamic sampling: [groups] bool, False for groups whose rewards are all
  equal (every advantage is zero, so they carry no gradient)."""
  r = _groups(rewards, group_size)
  return (r.max(axis=1) - r.min(axis=1)) > atol


def overlong_penalty(lengths, max_new_tokens: int, buffer: int, penalty: float = 1.0
                     ) -> np.ndarray:
  """DAPO's soft overlong punishment, in tokens: 0 up to `max_new_tokens - buffer`,
  then linear down to `-penalty` at `max_new_tokens` (and beyond)."""
  lengths = np.asarray(lengths, np.float64)
  if buffer <= 0:
    return np.zeros_like(lengths, np.float32)
  if buffer > max_new_tokens:
    raise ValueError(f"overlong buffer {buffer} exceeds max_new_tokens {max_new_tokens}")
  over = np.clip(lengths - (max_new_tokens - buffer), 0, buffer) / buffer
  return (-penalty * over).astype(np.float32)


def dynamic_length_reward(scores, lengths, group_size: int, cfg: LengthRewardConfig
                          ) -> np.ndarray:
  """Baichuan-M2's length reward: [N] float32, nonzero only for good responses of
  good groups (see `LengthRewardConfig`)."""
  s = _groups(scores, group_size)
  n = _groups(lengths, group_size)
  out = np.zeros_like(s)
  if cfg.coef == 0:
    return out.reshape(-1).astype(np.float32)
  for g in range(s.shape[0]):
    if np.quantile(s[g], cfg.quantile) <= cfg.group_threshold:
      continue
    good = s[g] >= cfg.good_threshold
    if not good.any():   # good_threshold above every score of a qualifying group
      continue
    lo, hi = n[g][good].min(), n[g][good].max()
    if hi > lo:
      out[g][good] = cfg.coef * (0.5 - (n[g][good] - lo) / (hi - lo))
  return out.reshape(-1).astype(np.float32)


# ---------------------------------------------------------------- the loss


def aggregate(values: jax.Array, mask: jax.Array, mode: str, norm_tokens: int = 0) -> jax.Array:
  """Reduces per-token values [B, T] over `mask` as `loss_agg_mode` says.

  token-mean:              sum over all tokens / number of tokens.
  seq-mean-token-mean:     mean over sequences of each sequence's token mean.
  seq-mean-token-sum-norm: mean over sequences of token sums / `norm_tokens` (or T).
  Sequences without a token do not count in the sequence means.
  """
  mask = mask.astype(jnp.float32)
  values = jnp.where(mask > 0, values, 0.0)
  if mode == "token-mean":
    return values.sum() / jnp.maximum(mask.sum(), 1.0)
  tokens = mask.sum(axis=-1)
  has = (tokens > 0).astype(jnp.float32)
  seqs = jnp.maximum(has.sum(), 1.0)
  if mode == "seq-mean-token-mean":
    return (values.sum(axis=-1) / jnp.maximum(tokens, 1.0) * has).sum() / seqs
  if mode == "seq-mean-token-sum-norm":
    return (values.sum(axis=-1) * has).sum() / (norm_tokens or values.shape[-1]) / seqs
  raise ValueError(f"unknown loss_agg_mode {mode!r}; known: {LOSS_AGG_MODES}")


def policy_loss(logp: jax.Array, advantages: jax.Array, mask: jax.Array, cfg: GRPOConfig, *,
                old_logp: jax.Array | None = None, sampler_logp: jax.Array | None = None,
                ref_logp: jax.Array | None = None, entropy: jax.Array | None = None):
  """The GRPO objective to minimise and its metrics.

  logp:         [B, T] log-probs of the taken tokens under the current policy.
  advantages:   [B, T] (a sequence's advantage repeated over its tokens) or [B].
  mask:         [B, T] 1 for tokens the policy produced and is trained on.
  old_logp:     [B, T] the policy that made the batch, as the learner computes it;
                None: the current log-probs, detached (one update per batch).
  sampler_logp: [B, T] what the sampler reported; with `cfg.tis_cap` each token is
                weighted by min(exp(old - sampler), tis_cap), detached.
  ref_logp:     [B, T] the reference policy's, needed iff `cfg.beta > 0`.
  entropy:      [B, T] per-token entropy of the current policy (for the bonus and logs).

  Values at masked positions never reach the result (nor the gradient), so
  padding may hold anything, even inf or nan.
  """
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  on = mask > 0
  logp = jnp.where(on, f32(logp), 0.0)
  old = jax.lax.stop_gradient(logp) if old_logp is None else jnp.where(on, f32(old_logp), 0.0)
  adv = f32(advantages)
  if adv.ndim == 1:
    adv = jnp.broadcast_to(adv[:, None], logp.shape)
  adv = jnp.where(on, adv, 0.0)
  agg = lambda x: aggregate(x, mask, cfg.loss_agg_mode, cfg.norm_tokens)  # noqa: E731

  log_ratio = logp - old
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high)
  loss1, loss2 = -adv * ratio, -adv * clipped
  per_token = jnp.maximum(loss1, loss2)
  if cfg.dual_clip:
    per_token = jnp.where(adv < 0, jnp.minimum(per_token, -adv * cfg.dual_clip), per_token)
    dual_clipped = (adv < 0) & (jnp.maximum(loss1, loss2) > -adv * cfg.dual_clip)
  if cfg.tis_cap:
    if sampler_logp is None:
      raise ValueError("GRPOConfig.tis_cap is set but no sampler log-probs were given")
    mismatch = jnp.where(on, old - f32(sampler_logp), 0.0)
    tis = jax.lax.stop_gradient(jnp.minimum(jnp.exp(mismatch), cfg.tis_cap))
    per_token = per_token * tis
  pg_loss = agg(per_token)
  loss = pg_loss
  metrics = {"pg_loss": pg_loss,
             "clip_frac_low": agg(((ratio < 1 - cfg.epsilon) & (adv < 0)).astype(jnp.float32)),
             "clip_frac_high": agg(((ratio > 1 + cfg.epsilon_high) & (adv > 0)).astype(jnp.float32)),
             "ratio_mean": agg(ratio),
             "ratio_max": jnp.max(jnp.where(on, ratio, -jnp.inf)),
             "ratio_min": jnp.min(jnp.where(on, ratio, jnp.inf)),
             # k3 estimate of KL(old || current) over tokens drawn from old, r = ratio:
             # r - 1 - log r. How far this update has moved.
             "kl_old": agg(ratio - 1.0 - log_ratio)}
  if cfg.dual_clip:
    metrics["clip_frac_dual"] = agg(dual_clipped.astype(jnp.float32))
  if sampler_logp is not None:
    d = jnp.where(on, old - f32(sampler_logp), 0.0)
    metrics["kl_sampler"] = agg(jnp.exp(d) - d - 1.0)   # k3 of KL(sampler || learner)
    if cfg.tis_cap:
      metrics["tis_weight_mean"] = agg(tis)
      metrics["tis_capped_frac"] = agg((jnp.exp(mismatch) > cfg.tis_cap).astype(jnp.float32))
  if cfg.beta > 0:
    if ref_logp is None:
      raise ValueError("GRPOConfig.beta > 0 needs the reference policy's log-probs")
    d = jnp.where(on, f32(ref_logp) - logp, 0.0)
    kl = jnp.exp(d) - d - 1.0    # k3: unbiased, low-variance, >= 0 (Schulman 2020)
    kl_loss = agg(kl)
    loss = loss + cfg.beta * kl_loss
    metrics["kl_ref"] = kl_loss
  if entropy is not None:
    ent = agg(f32(entropy))
    metrics["entropy"] = jax.lax.stop_gradient(ent)
    if cfg.entropy_coef:
      loss = loss - cfg.entropy_coef * ent
  return loss, metrics


def grpo_loss(model, batch: Mapping[str, jax.Array], cfg: GRPOConfig):
  """`policy_loss` of a model on a learner batch; a `m2.train.state` loss_fn.

  batch ([B, T] each, aligned with `targets`): inputs, targets, positions,
  segments, loss_mask, advantages, sampler_logp, and optionally old_logp and
  ref_logp.
  """
  hidden, _ = model(batch["inputs"], batch["positions"], batch["segments"], return_hidden=True)
  logp, entropy = model.target_logprobs(hidden, batch["targets"])
  loss, metrics = policy_loss(
      logp, batch["advantages"], batch["loss_mask"], cfg, old_logp=batch.get("old_logp"),
      sampler_logp=batch.get("sampler_logp"), ref_logp=batch.get("ref_logp"),
      entropy=jax.lax.stop_gradient(entropy) if not cfg.entropy_coef else entropy)
  mask = batch["loss_mask"].astype(jnp.float32)
  metrics["tokens"] = mask.sum()
  # What the loss is a mean over, for gradient accumulation (`m2.train.state.accumulate`).
  metrics["weight"] = (mask.sum() if cfg.loss_agg_mode == "token-mean"
                       else (mask.sum(axis=-1) > 0).sum().astype(jnp.float32))
  return loss, metrics


__all__ = ["GRPOConfig", "LOSS_AGG_MODES", "LengthRewardConfig", "aggregate",
           "dynamic_length_reward", "group_advantages", "grpo_loss", "informative_groups",
           "overlong_penalty", "policy_loss"]
