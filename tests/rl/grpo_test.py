"""GRPO pure functions against a small NumPy reference, knob by knob."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2.rl import grpo
from m2.rl.grpo import GRPOConfig, LengthRewardConfig


# ----------------------------------------------------------------- NumPy reference


def ref_loss(logp, old, sampler, ref, adv, mask, cfg: GRPOConfig):
  """The objective written out per token with plain loops."""
  b, t = logp.shape
  per, kl = np.zeros((b, t)), np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      if not mask[i, j]:
        continue
      r = np.exp(logp[i, j] - old[i, j])
      a = adv[i]
      l = max(-a * r, -a * min(max(r, 1 - cfg.epsilon), 1 + cfg.epsilon_high))
      if cfg.dual_clip and a < 0:
        l = min(l, -a * cfg.dual_clip)
      if cfg.tis_cap:
        l *= min(np.exp(old[i, j] - sampler[i, j]), cfg.tis_cap)
      per[i, j] = l
      d = ref[i, j] - logp[i, j]
      kl[i, j] = np.exp(d) - d - 1

  def agg(x):
    if cfg.loss_agg_mode == "token-mean":
      return (x * mask).sum() / mask.sum()
    rows = [i for i in range(b) if mask[i].sum()]
    if cfg.loss_agg_mode == "seq-mean-token-mean":
      return np.mean([(x[i] * mask[i]).sum() / mask[i].sum() for i in rows])
    norm = cfg.norm_tokens or t
    return np.mean([(x[i] * mask[i]).sum() / norm for i in rows])

  return agg(per) + cfg.beta * agg(kl)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  b, t = 6, 7
  old = -rng.uniform(0.1, 3.0, (b, t))
  logp = old + rng.normal(0, 0.4, (b, t))          # ratios well outside the clip range
  sampler = old + rng.normal(0, 0.5, (b, t))
  ref = old + rng.normal(0, 0.3, (b, t))
  adv = np.array([1.5, -0.7, 0.0, -2.0, 0.9, -0.3])
  mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.float64)
  mask[2] = 0          # a sequence with no trained token
  mask[0, :3] = 1
  return dict(logp=logp, old=old, sampler=sampler, ref=ref, adv=adv, mask=mask)


KNOBS = [
    {},                                                  # improved defaults
    {"epsilon_high": 0.2},                               # symmetric clip
    {"dual_clip": 3.0},
    {"loss_agg_mode": "seq-mean-token-mean"},
    {"loss_agg_mode": "seq-mean-token-sum-norm"},
    {"loss_agg_mode": "seq-mean-token-sum-norm", "norm_tokens": 11},
    {"beta": 0.05},
    {"tis_cap": 0.0},
    {"tis_cap": 1.2, "dual_clip": 1.5, "beta": 0.1, "epsilon": 0.1, "epsilon_high": 0.3},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items())
                         or "default")
def test_policy_loss_matches_reference(batch, knobs):
  cfg = GRPOConfig(**knobs)
  want = ref_loss(batch["logp"], batch["old"], batch["sampler"], batch["ref"], batch["adv"],
                  batch["mask"], cfg)
  got, metrics = grpo.policy_loss(
      jnp.asarray(batch["logp"], jnp.float32), jnp.asarray(batch["adv"], jnp.float32),
      jnp.asarray(batch["mask"]), cfg, old_logp=jnp.asarray(batch["old"], jnp.float32),
      sampler_logp=jnp.asarray(batch["sampler"], jnp.float32),
      ref_logp=jnp.asarray(batch["ref"], jnp.float32) if cfg.beta else None)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  assert ("kl_ref" in metrics) == (cfg.beta > 0)
  assert ("clip_frac_dual" in metrics) == bool(cfg.dual_clip)


def test_clip_metrics_match_reference(batch):
  cfg = GRPOConfig()
  _, m = grpo.policy_loss(jnp.asarray(batch["logp"]), jnp.asarray(batch["adv"]),
                          jnp.asarray(batch["mask"]), cfg, old_logp=jnp.asarray(batch["old"]),
                          sampler_logp=jnp.asarray(batch["sampler"]))
  mask = batch["mask"] > 0
  r = np.exp(batch["logp"] - batch["old"])
  a = np.broadcast_to(batch["adv"][:, None], r.shape)
  np.testing.assert_allclose(float(m["clip_frac_high"]), ((r > 1.28) & (a > 0))[mask].mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_frac_low"]), ((r < 0.8) & (a < 0))[mask].mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(float(m["ratio_max"]), r[mask].max(), rtol=1e-5)
  np.testing.assert_allclose(float(m["ratio_mean"]), r[mask].mean(), rtol=1e-5)
  d = batch["old"] - batch["sampler"]
  np.testing.assert_allclose(float(m["tis_capped_frac"]), (np.exp(d) > 2.0)[mask].mean(),
                             rtol=1e-6)
  # k3 (Schulman 2020) of KL(q || p) on tokens drawn from q: r - 1 - log r, r = p / q.
  np.testing.assert_allclose(float(m["kl_sampler"]), (np.exp(d) - 1 - d)[mask].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(m["kl_old"]), (r - 1 - np.log(r))[mask].mean(), rtol=1e-5)


def test_on_policy_ratio_is_one_with_gradient(batch):
  """old_logp=None: the ratio is 1 but the gradient is the policy gradient -A/N."""
  cfg = GRPOConfig(tis_cap=0.0)
  mask = jnp.asarray(batch["mask"])
  def f(logp):
    return grpo.policy_loss(logp, jnp.asarray(batch["adv"]), mask, cfg)[0]
  g = jax.grad(f)(jnp.asarray(batch["logp"], jnp.float32))
  want = -batch["adv"][:, None] * batch["mask"] / batch["mask"].sum()
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)


def test_masked_tokens_get_exactly_zero_gradient(batch):
  cfg = GRPOConfig(dual_clip=3.0, beta=0.1, entropy_coef=0.01)
  mask = batch["mask"]
  logp = np.where(mask > 0, batch["logp"], np.inf)      # garbage in the padding
  sampler = np.where(mask > 0, batch["sampler"], np.nan)
  def f(logp, ent):
    return grpo.policy_loss(logp, jnp.asarray(batch["adv"]), jnp.asarray(mask), cfg,
                            old_logp=jnp.asarray(batch["old"]), sampler_logp=jnp.asarray(sampler),
                            ref_logp=jnp.asarray(batch["ref"]), entropy=ent)[0]
  ent = np.where(mask > 0, 1.0, np.nan)
  value, (g_logp, g_ent) = jax.value_and_grad(f, argnums=(0, 1))(
      jnp.asarray(logp, jnp.float32), jnp.asarray(ent, jnp.float32))
  assert np.isfinite(float(value))
  assert np.all(np.asarray(g_logp)[mask == 0] == 0.0)
  assert np.all(np.asarray(g_ent)[mask == 0] == 0.0)
  assert np.all(np.isfinite(np.asarray(g_logp)))
  assert np.any(np.asarray(g_logp)[mask > 0] != 0.0)


def test_config_validates_with_field_names():
  with pytest.raises(ValueError, match="loss_agg_mode"):
    GRPOConfig(loss_agg_mode="sum")
  with pytest.raises(ValueError, match="dual_clip"):
    GRPOConfig(dual_clip=0.5)
  with pytest.raises(ValueError, match="group_size"):
    GRPOConfig(group_size=1)
  assert GRPOConfig(length_reward={"coef": 0.1}).length_reward.coef == 0.1


def test_missing_inputs_are_clear_errors(batch):
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="reference"):
    grpo.policy_loss(x, jnp.zeros(2), jnp.ones((2, 3)), GRPOConfig(beta=0.1, tis_cap=0))
  with pytest.raises(ValueError, match="sampler"):
    grpo.policy_loss(x, jnp.zeros(2), jnp.ones((2, 3)), GRPOConfig())


# ------------------------------------------------------------------------- host side


def test_group_advantages():
  r = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
  np.testing.assert_allclose(grpo.group_advantages(r, 4), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
  std = np.std([1, 0, 0, 1], ddof=1)
  np.testing.assert_allclose(grpo.group_advantages(r, 4, norm_adv_by_std=True)[:4],
                             np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6), rtol=1e-6)
  assert np.all(grpo.group_advantages(r, 4, norm_adv_by_std=True)[4:] == 0)
  with pytest.raises(ValueError, match="whole groups"):
    grpo.group_advantages(r[:7], 4)


def test_informative_groups():
  r = np.array([1, 1, 1, 0.5, 0.5, 0.5, 0, 1, 0.0])   # all equal, all equal, mixed
  np.testing.assert_array_equal(grpo.informative_groups(r, 3), [False, False, True])


def test_overlong_penalty_counts_tokens():
  got = grpo.overlong_penalty([10, 48, 56, 64, 70], max_new_tokens=64, buffer=16, penalty=1.0)
  np.testing.assert_allclose(got, [0, 0, -0.5, -1, -1])
  assert np.all(grpo.overlong_penalty([64], 64, 0) == 0)


def test_dynamic_length_reward_only_for_good_groups():
  cfg = LengthRewardConfig(coef=0.2, quantile=0.8, group_threshold=0.6, good_threshold=0.7)
  scores = np.array([0.9, 0.8, 0.2, 0.9,      # good group: 80th percentile 0.9 > 0.6
                     0.9, 0.1, 0.1, 0.1])     # 80th percentile 0.42: no length reward
  lengths = np.array([10, 30, 5, 20, 10, 30, 5, 20])
  got = grpo.dynamic_length_reward(scores, lengths, 4, cfg)
  # good responses of group 0 have lengths 10, 30, 20 -> 0.5 - (len - 10) / 20
  np.testing.assert_allclose(got, [0.1, -0.1, 0, 0, 0, 0, 0, 0], atol=1e-7)
  assert np.all(grpo.dynamic_length_reward(scores, lengths, 4, LengthRewardConfig()) == 0)
  # A qualifying group with no response above good_threshold gets nothing.
  strict = LengthRewardConfig(coef=0.2, quantile=0.8, group_threshold=0.6, good_threshold=0.95)
  assert np.all(grpo.dynamic_length_reward(scores, lengths, 4, strict) == 0)
