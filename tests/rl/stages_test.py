"""The RL stages end to end through m2.main on a tiny model: run, resume, hand on."""

import importlib.util
import json
import os

import numpy as np
import pytest

from m2 import main, parallel
from m2.rl import stages
from m2.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_rl_config(tokenizer_file, cache):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs/tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stages = ("sft_rs", "rl_rule", "rl_multiturn")
  c.model.update(preset="", vocab_size=384, num_layers=1, embed_dim=32, num_heads=2,
                 num_kv_heads=1, head_dim=16, mlp_dim=64)
  c.data.update(tokenizer=tokenizer_file, cache_dir=cache, math_items=200)
  c.sft_rs.update(sources=("math",), samples_per_prompt=2, max_keep_per_prompt=1,
                  max_new_tokens=6, keep_threshold=0.0)
  c.sft_rs.train.update(steps=1, batch_size=4, seq_len=96, save_every=1)
  c.rl_rule.update(sources=("math",), max_new_tokens=6, rollout_rows=4)   # 8 rows: 2 parts
  # Two optimizer updates per GRPO step: resuming must count GRPO steps, not updates.
  c.rl_rule.grpo.update(group_size=2, overlong_buffer=2, max_refill_rounds=0, num_minibatches=2)
  c.rl_rule.train.update(steps=2, batch_size=4, seq_len=96, save_every=1)
  c.rl_multiturn.update(max_new_tokens=6, max_turns=2, case_limit=4)
  c.rl_multiturn.grpo.update(group_size=2, overlong_buffer=2, max_refill_rounds=0)
  # Updates in two micro-batches (gradient accumulation), as the real configs run them.
  c.rl_multiturn.train.update(steps=1, batch_size=4, seq_len=256, save_every=1, microbatches=2)
  return c


def test_rl_stages_run_resume_and_hand_on_params(tmp_path, sp_tokenizer, monkeypatch):
  c = tiny_rl_config(sp_tokenizer.model_file, str(tmp_path / "cache"))
  work = tmp_path / "run"
  starts = {}
  real = stages.GRPOLearner.__init__

  def spy(self, model_cfg, cfg, opt, mesh, rules=(), *, init_params=None, state=None, **kw):
    starts[len(starts)] = (init_params, state)
    real(self, model_cfg, cfg, opt, mesh, rules, init_params=init_params, state=state, **kw)

  monkeypatch.setattr(stages.GRPOLearner, "__init__", spy)
  # An interrupted rl_rule: one of its two steps is checkpointed, then the run dies.
  c.rl_rule.train.steps = 1
  first = main.run(c, str(work), ["sft_rs", "rl_rule"])
  assert [(r.name, r.status) for r in first] == [("sft_rs", "ran"), ("rl_rule", "ran")]
  os.remove(work / "rl_rule" / "DONE")
  c.rl_rule.train.steps = 2
  results = main.run(c, str(work))
  assert [(r.name, r.status) for r in results] == [
      ("sft_rs", "skipped"), ("rl_rule", "resumed"), ("rl_multiturn", "ran")]
  # rl_rule resumed from its checkpoint, not from sft_rs's weights again
  assert starts[2][1] is not None
  # rl_multiturn started from the weights rl_rule ended with
  handed = starts[3][0]
  import jax
  for a, b in zip(jax.tree.leaves(jax.device_get(handed)),
                  jax.tree.leaves(jax.device_get(results[1].params))):
    np.testing.assert_array_equal(a, b)

  rows = read_metrics(str(work / "rl_rule"))
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert {"reward_mean", "reward/correct", "reward/format", "rollout/samples",
            "rollout/truncated", "rollout/groups_dropped"} <= set(r)
  trained = [r for r in rows if "pg_loss" in r]
  for r in trained:
    assert {"entropy", "clip_frac_low", "clip_frac_high", "ratio_mean", "kl_old",
            "kl_sampler", "tis_weight_mean", "grad_norm"} <= set(r)
  assert (work / "rl_rule" / "tb").is_dir()
  trend = json.loads((work / "rl_rule" / "reward_trend.json").read_text())
  assert trend["steps"] == 2

  multi = read_metrics(str(work / "rl_multiturn"))
  assert len(multi) == 1
  m = multi[0]
  assert m["rollout/episodes"] == 8 and m["rollout/doctor_turns"] >= 8
  assert m["rollout/judge_failures"] == m["rollout/judge_fallbacks"] == 0
  assert sum(m.get(f"rollout/ended_{k}", 0)
             for k in ("gate", "turn_limit", "length", "empty_turn")) == 8
  sft = read_metrics(str(work / "sft_rs"))
  # threshold 0 passes every sample; at most one of the two per prompt is kept
  assert sft[0]["kept"] == 4 and sft[0]["keep_rate"] == 0.5
  assert "loss" in sft[0]

  # config.verifier picks model-backed roles: here rl_rule's weights play the patient
  # and the grader (an RL stage dir names its tokenizer in its checkpoint metadata).
  from m2.verifier.backend import ModelRole
  calls = {}
  real_complete = ModelRole.complete

  def count(self, conversations, **kw):
    calls[self.name] = calls.get(self.name, 0) + len(conversations)
    return real_complete(self, conversations, **kw)

  monkeypatch.setattr(ModelRole, "complete", count)
  c.verifier.update(simulator="model", simulator_checkpoint=str(work / "rl_rule"),
                    grader="model", grader_checkpoint=str(work / "rl_rule"))
  # All samplers (policy and roles) take their own rules; the one kv head of this model
  # splits no further, so the mesh splits the rows (the sampler tests split weights).
  c.mesh.update(shape=(8, 1, 1), rollout_rules=parallel.DECODE_RULES)
  from m2.sampling import Sampler
  sampler_rules, real_init = [], Sampler.__init__

  def record(self, *args, **kw):
    real_init(self, *args, **kw)
    sampler_rules.append(self.rules)

  monkeypatch.setattr(Sampler, "__init__", record)
  os.remove(work / "rl_multiturn" / "DONE")
  os.rename(work / "rl_multiturn", work / "rl_multiturn_reference")
  assert [r.status for r in main.run(c, str(work), ["rl_multiturn"])] == ["ran"]
  assert calls.get("simulator", 0) >= 8 and calls.get("grader", 0) > 0
  m = read_metrics(str(work / "rl_multiturn"))[0]
  assert m["rollout/episodes"] == 8
  # This grader writes no JSON: every verdict fell back to the reference judge, counted.
  assert m["rollout/judge_fallbacks"] > 0 and m["rollout/judge_malformed"] > 0
  assert len(sampler_rules) == 2 and set(sampler_rules) == {parallel.DECODE_RULES}


def test_reward_trend():
  t = stages.reward_trend([0.0] * 10 + [1.0] * 10)
  assert t["gain"] == 1.0 and t["gain_over_2std"] is (1.0 > 2 * t["step_to_step_std"])
  flat = stages.reward_trend([0.5, 0.4] * 10)
  assert flat["gain"] == 0.0 and not flat["gain_over_2std"]


def test_consultation_reward_keeps_negative_rubric_scores_and_grades_empty_episodes():
  from m2.data.records import Message
  from m2.rl.rewards import RewardConfig
  from m2.rl.rollout import Episode
  from m2.verifier.grader import Grader, ReferenceJudge
  from m2.verifier.rubrics import SCOPE_DIALOGUE, Criterion, Rubric
  dlg = (SCOPE_DIALOGUE,)
  rubric = Rubric((Criterion("Arranges follow-up, for example a return visit", 2,
                             "follow_up", dlg),
                   Criterion("Asks about the chest pain", 4, "consultation_logic", dlg),
                   Criterion("Fails to address hemoptysis", -5, "ethics_safety", dlg)))
  opening = Message("user", "I have chest pain and I cough up blood.")

  def episode(*turns):
    msgs = [opening] + [Message("assistant", t) for t in turns]
    return Episode("case", None, None, msgs, doctor_turns=list(turns))

  cfg = RewardConfig(weights={"rubric": 1.0, "format": 0.2})
  silent, follow_up, both = stages.grade_episodes(
      Grader(ReferenceJudge()),
      [episode(), episode("We will arrange a follow-up visit."),
       episode("Where is the chest pain?", "We will arrange a follow-up visit.")],
      [rubric] * 3, cfg)
  # an empty episode is graded as saying nothing: the omission counts, no format credit
  assert silent.parts == {"rubric": -5 / 6, "format": 0.0, "safety": 0.0}
  # meeting a criterion raises the reward even while the score is below 0 (no clip at 0)
  assert follow_up.parts["rubric"] == pytest.approx(-3 / 6)
  assert both.parts["rubric"] == pytest.approx(1 / 6)
  assert silent.total < follow_up.total < both.total
  # with the cases, the share of visible facts the doctor elicited is a part of its own
  import types
  asked = episode("Where is the chest pain?")
  asked.elicited = {"f1", "f2"}
  weighted = RewardConfig(weights={"rubric": 1.0, "elicited": 0.5})
  (r,) = stages.grade_episodes(Grader(ReferenceJudge()), [asked], [rubric], weighted,
                               [types.SimpleNamespace(visible_facts=tuple(range(4)))])
  assert r.parts["elicited"] == 0.5 and r.total == pytest.approx(r.parts["rubric"] + 0.25)
