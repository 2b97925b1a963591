"""The RL-side stages of the pipeline, in the paper's order:

  sft_rs        rejection-sampling SFT: k answers per prompt, keep those the
                verifier scores at or above `keep_threshold`, fine-tune on them
  rl_rule       GRPO on verifiable answers (MediQ / PubMedQA / math; exact match)
  rl_rubric     GRPO on single-turn consultations scored by the grader on a
                generated rubric
  rl_multiturn  GRPO on whole consultations with the patient simulator; the final
                rubric score is the reward, only the doctor's tokens are trained

Each runner has `m2.main`'s stage signature `(config, workdir, model_cfg, mesh_cfg,
init_params) -> (TrainResult, metric name, value)`. A stage resumes from the
last checkpoint in `workdir/checkpoints` (params, optimizer, step and the prompt
iterator), writes `metrics.jsonl` and TensorBoard events, shows a progress bar,
and returns its final params for the next stage. The headline metric is the mean
reward over the last 10 steps (`reward_mean`: the reward GRPO optimises, with the
overlong and length shaping); `reward_trend.json` holds the first/last-10 means
and the step-to-step std of the per-step mean reward, and under "parts" the same
for the unshaped reward and each of its parts.

The patient simulator, rubric generator and grader of rl_rubric / rl_multiturn
are the backends `config.verifier` names: "reference" (no model) or "model", an
m2 stage directory or HF folder loaded onto the policy's mesh with its own sampler.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from m2 import configlib
from m2.rl import grpo, rewards, rollout
from m2.rl.grpo import GRPOConfig
from m2.rl.learner import GRPOLearner, Trajectory, learner_batch
from m2.rl.rewards import Reward, RewardConfig
from m2.train.checkpoint import Checkpointer
from m2.train.loop import TrainConfig, TrainResult
from m2.train.metrics import MetricsWriter, read_metrics

log = logging.getLogger(__name__)

RULE_SOURCES = ("mediq_qa", "pubmedqa", "math")
CASE_SOURCES = ("agentclinic", "mediq")


@dataclasses.dataclass(frozen=True)
class RLStageConfig:
  """config.<stage> of a GRPO stage (rl_rule, rl_rubric, rl_multiturn).

  train.steps: GRPO steps; train.batch_size: prompts (groups) per step;
  train.seq_len: the longest learner sequence (prompt + response[s]);
  train.optimizer, log_every, save_every, keep_checkpoints, seed as usual.
  """
  sources: tuple[str, ...] = RULE_SOURCES
  max_prompt_len: int = 256
  max_new_tokens: int = 48
  temperature: float = 1.0
  top_p: float = 1.0
  thinking_mode: str = "off"
  system: str = ""
  max_turns: int = 4            # rl_multiturn: doctor turns per consultation
  case_limit: int = 0           # cases kept per source (0: all)
  # Learner rows: 0 pads every batch to train.seq_len (one compile per run); n > 0 pads
  # to the longest trajectory rounded up to n (at most seq_len / n compiles, less
  # compute once responses get shorter than seq_len).
  length_multiple: int = 0
  # Sequences one generation call decodes at once (0: all of them); bounds the
  # rollout's KV cache (`m2.tools.memory.rollout_plan`).
  rollout_rows: int = 0
  grpo: GRPOConfig = GRPOConfig()
  reward: RewardConfig = RewardConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    from m2.data.chat import THINKING_MODES
    if self.thinking_mode not in THINKING_MODES:
      raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {self.thinking_mode!r}")
    if not self.sources:
      raise ValueError("sources: none listed")
    for f in ("length_multiple", "rollout_rows"):
      if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 0):
        raise ValueError(f"{f} must be an int >= 0, got {getattr(self, f)!r}")
    for f in ("max_prompt_len", "max_new_tokens", "max_turns"):
      if not (isinstance(getattr(self, f), int) and getattr(self, f) > 0):
        raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
    if self.grpo.overlong_buffer > self.max_new_tokens:
      raise ValueError(f"grpo.overlong_buffer={self.grpo.overlong_buffer} exceeds "
                       f"max_new_tokens={self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class SFTRSConfig:
  """config.sft_rs: rejection-sampling SFT.

  Each step samples `samples_per_prompt` answers for `train.batch_size` prompts,
  keeps those whose reward total is >= `keep_threshold` (at most
  `max_keep_per_prompt` per prompt) and takes one SFT step on them (loss on the
  answer tokens only). A step that keeps nothing is counted and skipped.
  """
  sources: tuple[str, ...] = RULE_SOURCES
  samples_per_prompt: int = 8
  keep_threshold: float = 1.0
  max_keep_per_prompt: int = 2
  max_prompt_len: int = 256
  max_new_tokens: int = 48
  temperature: float = 1.0
  thinking_mode: str = "off"
  system: str = ""
  rollout_rows: int = 0         # as RLStageConfig's
  reward: RewardConfig = RewardConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    if self.samples_per_prompt < 1 or self.max_keep_per_prompt < 1:
      raise ValueError("samples_per_prompt and max_keep_per_prompt must be >= 1")
    if not (isinstance(self.rollout_rows, int) and self.rollout_rows >= 0):
      raise ValueError(f"rollout_rows must be an int >= 0, got {self.rollout_rows!r}")


# ------------------------------------------------------------------ tasks


@dataclasses.dataclass
class Group:
  """The G responses to one prompt (or case) with their rewards."""
  trajectories: list[Trajectory]
  rewards: list[Reward]
  scores: np.ndarray        # [G] the task score the length reward looks at
  lengths: np.ndarray       # [G] policy tokens per response
  texts: list[str]
  shaped: np.ndarray | None = None   # [G] reward after overlong and length shaping
  turn_lengths: np.ndarray | None = None   # [G] longest single turn (overlong shaping);
                                           # None: `lengths` (single-turn)


class _Setup:
  """Tokenizer, chat format, sampler and prompt data shared by the stages."""

  def __init__(self, config, stage, model_cfg, mesh):
    from m2.data import pipelines
    from m2.data.chat import ChatFormat
    from m2.sampling import Sampler
    self.data_cfg = pipelines.resolve_tokenizer(
        configlib.build(pipelines.DataConfig, config.data, "config.data"),
        config.model.get("hf_checkpoint", ""))
    self.tokenizer = pipelines.load_data_tokenizer(self.data_cfg)
    if self.tokenizer.vocab_size > model_cfg.vocab_size:
      raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                       f"tokenizer's {self.tokenizer.vocab_size}")
    self.fmt = ChatFormat(self.tokenizer, thinking_mode=stage.thinking_mode,
                          system=stage.system or None)
    if not self.fmt.stop_ids:
      raise ValueError(f"tokenizer {self.data_cfg.tokenizer!r} has no <|im_end|> token to "
                       f"end a turn; RL needs a chat-capable tokenizer")
    self.sampler = Sampler.for_config(model_cfg, mesh=mesh, rules=sampler_rules(config),
                                      tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_id,
                                      max_rows=stage.rollout_rows)
    self.config, self.mesh = config, mesh

  def verifier(self):
    """The verifier roles `config.verifier` names; "model" roles are loaded onto the
    policy's mesh, each checkpoint once, with its own sampler."""
    from m2.verifier import VerifierConfig, build_verifier
    cfg = configlib.build(VerifierConfig, self.config.get("verifier", {}), "config.verifier")
    return build_verifier(cfg, _model_roles(cfg, self.mesh, sampler_rules(self.config)))


# (max new tokens, temperature) of each model-backed verifier role.
_ROLE_SAMPLING = {"simulator": (64, 0.7), "rubric_generator": (512, 0.0), "grader": (96, 0.0)}


def _model_roles(cfg, mesh, rules) -> dict:
  from m2.sampling import Sampler, SamplingParams
  from m2.train.policy import load_policy
  from m2.verifier.backend import ModelRole
  roles, loaded = {}, {}
  for name, (max_new_tokens, temperature) in _ROLE_SAMPLING.items():
    if getattr(cfg, name) != "model":
      continue
    path = getattr(cfg, f"{name}_checkpoint")
    if path not in loaded:
      policy = load_policy(path, mesh=mesh, rules=rules)
      loaded[path] = policy, Sampler.for_config(policy.model_cfg, mesh=mesh, rules=rules,
                                                tokenizer=policy.tokenizer)
    policy, sampler = loaded[path]
    roles[name] = ModelRole(sampler, policy.params, policy.tokenizer, name=name,
                            sampling=SamplingParams(temperature=temperature,
                                                    max_new_tokens=max_new_tokens))
  return roles


def sampler_rules(config):
  """The samplers' sharding rules: `config.mesh.rollout_rules`, else the training rules."""
  from m2.train.loop import MeshConfig
  return configlib.build(MeshConfig, config.mesh, "config.mesh").sampler_rules


def _round_up(n: int, multiple: int) -> int:
  """Learner rows: whole data-parallel shards (the extra rows are padding, no loss)."""
  return -(-n // multiple) * multiple


def _row_sampling(base, rng: np.random.Generator, n: int):
  """One SamplingParams per row with its own seed: reproducible, and resumable."""
  return [dataclasses.replace(base, seed=int(s)) for s in rng.integers(0, 2**32, n)]


class QATask:
  """Verifiable QA prompts (rl_rule, sft_rs): rule rewards."""

  def __init__(self, setup: _Setup, stage, seed: int):
    from m2.data import pipelines
    from m2.sampling import SamplingParams
    self.setup, self.stage = setup, stage
    prepared = pipelines.prepare_data("prompts", stage.sources, setup.data_cfg)
    self.report = prepared.report
    self.dataset = pipelines.rl_prompts(prepared.sources_dict(), setup.fmt, seed=seed,
                                        max_prompt_len=stage.max_prompt_len)
    self.iterator = iter(self.dataset)
    self.sampling = SamplingParams(temperature=stage.temperature,
                                   top_p=getattr(stage, "top_p", 1.0),
                                   max_new_tokens=stage.max_new_tokens,
                                   stop_token_ids=setup.fmt.stop_ids)

  def collect(self, params, n: int, group_size: int, rng, stats) -> list[Group]:
    examples = [next(self.iterator) for _ in range(n)]
    prompts = [e["prompt_ids"] for e in examples]
    rows = [p for p in prompts for _ in range(group_size)]
    out = self.setup.sampler.generate(params, rows, _row_sampling(self.sampling, rng, len(rows)))
    samples = rollout.samples_from_output(out, rows, group_size, self.setup.tokenizer,
                                          self.sampling.stop_token_ids, stats)
    groups = []
    for g, e in enumerate(examples):
      chunk = samples[g * group_size:(g + 1) * group_size]
      rs = [rewards.rule_reward(e["item"], s.text, self.stage.reward, finished=s.finished)
            for s in chunk]
      groups.append(Group([s.trajectory() for s in chunk], rs,
                          np.array([r.parts["correct"] for r in rs]),
                          np.array([len(s.completion_ids) for s in chunk]),
                          [s.text for s in chunk]))
    return groups


def load_cases(sources: Sequence[str], data_cfg, limit: int = 0):
  """Training PatientCases through the de-identification gate (simulator purpose).
  `exclude_splits` and the held-out cases that `m2.eval.consult` evaluates on are left out."""
  from m2.data import deid, loaders
  from m2.data.tfds_builders import check_excluded, is_heldout
  cases = []
  for name in sources:
    loaded = loaders.load_source(name, data_cfg.data_dir or None, policy="skip")
    check_excluded(name, loaded.records, data_cfg.exclude_splits)
    kept = [c for c in loaded.records if f"{name}:{c.split}" not in data_cfg.exclude_splits
            and not is_heldout(c.id, data_cfg.heldout_fraction)]
    if limit:
      kept = kept[:limit]
    cases += deid.gate(kept, purpose="simulator").records
    log.info("cases: %s: %d of %d loaded", name, len(kept), len(loaded.records))
  if not cases:
    raise ValueError(f"no training cases in {list(sources)}")
  return cases


def grade_episodes(grader, episodes: Sequence[rollout.Episode], rubrics, cfg: RewardConfig,
                   cases: Sequence[Any] | None = None) -> list[Reward]:
  """The reward of each consultation: its final rubric score plus the shaping terms,
  and with `cases` the share of each case's visible facts the doctor elicited.

  The rubric part is the per-example HealthBench score (achieved / possible
  points) as the grader returns it, not clipped at 0: a case whose red flags
  the doctor has not addressed starts below 0, and clipping there would hide
  every criterion the doctor does meet (HealthBench clips only the mean over
  examples). An episode without a doctor turn (an empty first turn, or an
  opening that filled the context) is graded as an empty reply, so its
  omission criteria count against it and stopping at once never beats trying.
  """
  from m2.data.records import Message
  convs = [e.graded_transcript() if e.doctor_turns else [*e.messages[:1], Message("assistant", "")]
           for e in episodes]
  out = []
  for i, (e, r) in enumerate(zip(episodes, grader.grade_batch(list(zip(convs, rubrics))))):
    elicited = None if cases is None else len(e.elicited) / max(1, len(cases[i].visible_facts))
    out.append(rewards.rubric_reward(r.score, e.doctor_turns[-1] if e.doctor_turns else "", cfg,
                                     finished=e.finished, elicited=elicited))
  return out


class ConsultationTask:
  """Cases played with the patient simulator and graded on a generated rubric.

  `turns=1` is rl_rubric (the doctor answers the patient's opening once);
  more is rl_multiturn (until the Termination Gate, or `turns`).
  """

  def __init__(self, setup: _Setup, stage, seed: int, turns: int):
    from m2.sampling import SamplingParams
    self.setup, self.stage, self.turns = setup, stage, turns
    self.cases = load_cases(stage.sources, setup.data_cfg, stage.case_limit)
    self.order = np.random.default_rng(seed).permutation(len(self.cases))
    self.position = 0
    self.verifier = setup.verifier()
    self.rubrics: dict[str, Any] = {}
    self.sampling = SamplingParams(temperature=stage.temperature, top_p=stage.top_p,
                                   max_new_tokens=stage.max_new_tokens,
                                   stop_token_ids=setup.fmt.stop_ids)

  @property
  def iterator(self):   # the position in the case order is the data state
    return self

  def get_state(self):
    return {"position": int(self.position)}

  def set_state(self, state):
    self.position = int(state["position"])

  def _next_cases(self, n):
    picked = [self.cases[self.order[(self.position + i) % len(self.cases)]] for i in range(n)]
    self.position += n
    return picked

  def _rubric(self, case):
    if case.id not in self.rubrics:
      self.rubrics[case.id] = self.verifier.rubric_generator.generate(case)
    return self.rubrics[case.id]

  def collect(self, params, n: int, group_size: int, rng, stats) -> list[Group]:
    cases = self._next_cases(n)
    fallbacks = _verifier_fallbacks(self.verifier)
    envs = self.verifier.consultation(max_turns=max(self.turns, 2))
    rows = [c for c in cases for _ in range(group_size)]
    episodes = rollout.consultations(
        self.setup.sampler, params, envs, rows, self.setup.fmt,
        lambda k: _row_sampling(self.sampling, rng, k), max_turns=self.turns,
        max_length=self.stage.train.seq_len + 1, stats=stats)
    stats.add("no_doctor_turn", sum(not e.doctor_turns for e in episodes))
    all_rewards = grade_episodes(self.verifier.grader, episodes, [self._rubric(c) for c in rows],
                                 self.stage.reward, rows)
    groups = []
    for g in range(n):
      eps = episodes[g * group_size:(g + 1) * group_size]
      rs = all_rewards[g * group_size:(g + 1) * group_size]
      stats.add("judge_failures", sum(r.failed for r in rs))
    for name, count in _verifier_fallbacks(self.verifier).items():
      stats.add(name, count - fallbacks[name])
      groups.append(Group([e.trajectory() for e in eps], rs,
                          np.array([r.parts["rubric"] for r in rs]),
                          np.array([int(e.tokens.mask.sum()) for e in eps]),
                          [" | ".join(e.doctor_turns) for e in eps],
                          turn_lengths=np.array([max(e.turn_tokens, default=0) for e in eps])))
    return groups


# ------------------------------------------------------------------ GRPO loop


def _verifier_fallbacks(verifier) -> dict[str, int]:
  """Running counts of model-backed grader verdicts and rubrics that did not parse
  (and were replaced by the reference algorithm's); 0 for the reference backends."""
  judge = getattr(verifier.grader.judge, "stats", None)
  return {"judge_malformed": getattr(judge, "malformed", 0),
          "judge_fallbacks": getattr(judge, "fallbacks", 0),
          "rubric_fallbacks": getattr(verifier.rubric_generator, "fallbacks", 0)}


def shaped_rewards(groups: Sequence[Group], cfg: GRPOConfig, max_new_tokens: int):
  """(totals [N], overlong [N], length [N]) over the groups' responses."""
  totals = np.array([r.total for g in groups for r in g.rewards], np.float64)
  lengths = np.concatenate([g.lengths for g in groups])
  scores = np.concatenate([g.scores for g in groups])
  # Overlong shaping looks at one turn (what max_new_tokens bounds), not a whole consultation.
  turns = np.concatenate([g.lengths if g.turn_lengths is None else g.turn_lengths
                          for g in groups])
  over = grpo.overlong_penalty(turns, max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
  length = grpo.dynamic_length_reward(scores, lengths, cfg.group_size, cfg.length_reward)
  return totals + over + length, over, length


def reward_trend(values: Sequence[float], window: int = 10) -> dict[str, float]:
  """First/last-`window` means of the per-step mean reward and its step-to-step std
  (the std of consecutive differences), as the issue's acceptance test reads them."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return {"steps": len(v)}
  w = min(window, len(v) // 2)
  first, last = float(v[:w].mean()), float(v[-w:].mean())
  std = float(np.std(np.diff(v)))
  return {"steps": len(v), "window": w, "first_mean": first, "last_mean": last,
          "gain": last - first, "step_to_step_std": std,
          "gain_over_2std": (last - first) > 2 * std}


def _restore_or_init(learner_factory, workdir, cfg: TrainConfig, meta, model_cfg, mesh, rules):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                      async_save=cfg.async_checkpoints)
  resumed_from = ckpt.latest_step()
  data_state = {}
  state = None
  if resumed_from is not None:
    abstract = GRPOLearner.abstract_state(model_cfg, cfg.optimizer, mesh, rules, cfg.seed)
    state, data_state = ckpt.restore(abstract, resumed_from, meta=meta)
    log.info("resuming %s from step %d", workdir, resumed_from)
  return ckpt, resumed_from, state, data_state


def run_grpo(config, workdir, model_cfg, mesh_cfg, init_params, name: str,
             make_task: Callable[[_Setup, RLStageConfig, int], Any]):
  """The GRPO loop shared by the three RL stages."""
  start = time.time()
  stage = configlib.build(RLStageConfig, config[name], f"config.{name}")
  tcfg, gcfg = stage.train, stage.grpo
  mesh, rules = mesh_cfg.make(), mesh_cfg.rules
  setup = _Setup(config, stage, model_cfg, mesh)
  task = make_task(setup, stage, tcfg.seed)
  meta = {"model": dataclasses.asdict(model_cfg), "stage": name,
          "tokenizer": setup.data_cfg.tokenizer}
  ckpt, resumed_from, state, data_state = _restore_or_init(None, workdir, tcfg, meta, model_cfg,
                                                           mesh, rules)
  if data_state.get("iterator"):
    task.iterator.set_state(data_state["iterator"])
  if init_params is None and state is None:
    log.warning("%s starts from random weights: no earlier stage ran and no hf_checkpoint", name)
  learner = GRPOLearner(model_cfg, gcfg, tcfg.optimizer, mesh, rules, init_params=init_params,
                        seed=tcfg.seed, state=state, microbatches=tcfg.microbatches)
  rows = _round_up(tcfg.batch_size * gcfg.group_size, learner.row_multiple)
  writer = MetricsWriter(workdir, resume_step=resumed_from)
  # GRPO steps are the checkpoints' step numbers; the optimizer's count differs
  # (num_minibatches updates per step, none on a step without a trainable group).
  step = first = resumed_from or 0
  final: dict[str, float] = {}
  bar = tqdm(total=tcfg.steps, initial=step, desc=name, dynamic_ncols=True, disable=False)
  try:
    while step < tcfg.steps:
      t0, c0 = time.time(), time.process_time()
      rng = np.random.default_rng([tcfg.seed, step])
      stats = rollout.RolloutStats()
      kept: list[Group] = []
      logged: dict[str, float] = {}
      rounds = 1 + (gcfg.max_refill_rounds if gcfg.dynamic_sampling else 0)
      for r in range(rounds):
        groups = task.collect(learner.params, tcfg.batch_size, gcfg.group_size, rng, stats)
        totals, over, length = shaped_rewards(groups, gcfg, stage.max_new_tokens)
        if r == 0:   # the policy's own reward on fresh prompts, before any filtering
          all_rewards = [x for g in groups for x in g.rewards]
          logged.update(rewards.mean_parts(all_rewards))
          logged["reward_mean"] = float(np.mean(totals))
          logged["response_tokens"] = float(np.mean([x for g in groups for x in g.lengths]))
          logged["reward/overlong"] = float(np.mean(over))
          logged["reward/length"] = float(np.mean(length))
        for g, i in zip(groups, range(len(groups))):
          g.shaped = totals[i * gcfg.group_size:(i + 1) * gcfg.group_size]
        if gcfg.dynamic_sampling:
          useful = grpo.informative_groups(totals, gcfg.group_size)
          stats.add("groups_dropped", int((~useful).sum()))
          groups = [g for g, u in zip(groups, useful) if u]
        kept += groups
        if len(kept) >= tcfg.batch_size:
          break
      kept = kept[:tcfg.batch_size]
      stats.add("groups_trained", len(kept))
      t_rollout = time.time() - t0
      if kept:
        shaped = np.concatenate([g.shaped for g in kept])
        adv = grpo.group_advantages(shaped, gcfg.group_size, gcfg.norm_adv_by_std)
        trajs = [t for g in kept for t in g.trajectories]
        stats.add("clipped_to_seq_len", sum(len(t.ids) - 1 > tcfg.seq_len for t in trajs))
        if stage.length_multiple:
          batch = learner_batch(trajs, adv, rows, pad_id=setup.tokenizer.pad_id,
                                multiple=stage.length_multiple, max_length=tcfg.seq_len)
        else:
          batch = learner_batch(trajs, adv, rows, pad_id=setup.tokenizer.pad_id,
                                width=tcfg.seq_len)
        metrics = learner.update(batch)
        logged.update({k: float(v) for k, v in jax.device_get(metrics).items()})
        logged["learner_width"] = float(batch["inputs"].shape[1])
      else:
        stats.add("skipped_updates")
        log.warning("%s step %d: every group had equal rewards; no update", name, step)
      step += 1
      logged.update(stats.as_metrics())
      logged["step_s"] = time.time() - t0
      # CPU seconds of this process (all threads): unlike wall time, barely moved by
      # other jobs on a shared machine.
      logged["step_cpu_s"] = time.process_time() - c0
      logged["rollout_s"] = t_rollout
      final.update(logged)
      if step % tcfg.log_every == 0 or step == tcfg.steps:
        writer.write(step, logged)
      bar.set_postfix({"reward": f"{logged['reward_mean']:.3f}"})
      bar.update(1)
      if step % tcfg.save_every == 0 or step == tcfg.steps:
        ckpt.save(step, learner.state, {"iterator": task.iterator.get_state()}, meta, force=True)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  rows_logged = read_metrics(workdir)
  trend = reward_trend([r["reward_mean"] for r in rows_logged if "reward_mean" in r])
  # The same test on the unshaped reward and on each of its parts: which term moved.
  trend["parts"] = {k: reward_trend([r[k] for r in rows_logged if k in r])
                    for k in ("reward/total", "reward/overlong", "reward/length",
                              *(f"reward/{p}" for p in rewards.PARTS))
                    if any(k in r for r in rows_logged)}
  with open(os.path.join(workdir, "reward_trend.json"), "w") as f:
    json.dump(trend, f, indent=1)
  log.info("%s reward trend: %s", name, trend)
  result = TrainResult(state=learner.state, graphdef=learner.graphdef, steps_run=step - first,
                       resumed_from=resumed_from, final_metrics=final,
                       wall_s=time.time() - start)
  last = [r["reward_mean"] for r in rows_logged if "reward_mean" in r][-10:]
  return result, "reward_last10", float(np.mean(last)) if last else None


def run_rl_rule(config, workdir, model_cfg, mesh_cfg, init_params):
  """GRPO on verifiable answers (exact match of the extracted answer)."""
  return run_grpo(config, workdir, model_cfg, mesh_cfg, init_params, "rl_rule", QATask)


def run_rl_rubric(config, workdir, model_cfg, mesh_cfg, init_params):
  """GRPO on one doctor reply to a simulated patient, graded on the case's rubric."""
  return run_grpo(config, workdir, model_cfg, mesh_cfg, init_params, "rl_rubric",
                  lambda setup, stage, seed: ConsultationTask(setup, stage, seed, turns=1))


def run_rl_multiturn(config, workdir, model_cfg, mesh_cfg, init_params):
  """GRPO on whole consultations with the patient simulator."""
  return run_grpo(config, workdir, model_cfg, mesh_cfg, init_params, "rl_multiturn",
                  lambda setup, stage, seed: ConsultationTask(setup, stage, seed,
                                                              turns=stage.max_turns))


# ------------------------------------------------------------------ rejection-sampling SFT


def run_sft_rs(config, workdir, model_cfg, mesh_cfg, init_params):
  """Rejection-sampling SFT on verifiable prompts (the rule reward is the verifier)."""
  from m2.train.state import lm_loss, make_train_step
  start = time.time()
  stage = configlib.build(SFTRSConfig, config.sft_rs, "config.sft_rs")
  tcfg = stage.train
  mesh, rules = mesh_cfg.make(), mesh_cfg.rules
  setup = _Setup(config, stage, model_cfg, mesh)
  task = QATask(setup, stage, tcfg.seed)
  meta = {"model": dataclasses.asdict(model_cfg), "stage": "sft_rs",
          "tokenizer": setup.data_cfg.tokenizer}
  ckpt, resumed_from, state, data_state = _restore_or_init(None, workdir, tcfg, meta, model_cfg,
                                                           mesh, rules)
  if data_state.get("iterator"):
    task.iterator.set_state(data_state["iterator"])
  # The GRPO learner's state and step are reused with the SFT loss.
  learner = GRPOLearner(model_cfg, GRPOConfig(), tcfg.optimizer, mesh, rules,
                        init_params=init_params, seed=tcfg.seed, state=state)
  sft_step = make_train_step(learner.graphdef, learner.tx, lm_loss, mesh, learner.shardings,
                             rules, tcfg.microbatches)
  rows = _round_up(tcfg.batch_size * stage.max_keep_per_prompt,
                   learner.data_shards * tcfg.microbatches)
  writer = MetricsWriter(workdir, resume_step=resumed_from)
  step = first = learner.step
  final: dict[str, float] = {}
  bar = tqdm(total=tcfg.steps, initial=step, desc="sft_rs", dynamic_ncols=True, disable=False)
  try:
    while step < tcfg.steps:
      t0 = time.time()
      rng = np.random.default_rng([tcfg.seed, step])
      stats = rollout.RolloutStats()
      groups = task.collect(learner.params, tcfg.batch_size, stage.samples_per_prompt, rng, stats)
      keep: list[Trajectory] = []
      for g in groups:
        good = [t for t, r in zip(g.trajectories, g.rewards) if r.total >= stage.keep_threshold]
        keep += good[:stage.max_keep_per_prompt]
      all_rewards = [r for g in groups for r in g.rewards]
      logged = {**rewards.mean_parts(all_rewards),
                "reward_mean": float(np.mean([r.total for r in all_rewards])),
                "kept": float(len(keep)), "keep_rate": len(keep) / max(len(all_rewards), 1)}
      if keep:
        batch = learner_batch(keep, [0.0] * len(keep), rows, pad_id=setup.tokenizer.pad_id,
                              width=tcfg.seq_len)
        learner.state, metrics = sft_step(learner.state, learner._place(batch))
        logged.update({k: float(v) for k, v in jax.device_get(metrics).items()})
      else:
        stats.add("skipped_updates")
        learner.state = learner.state.replace(step=learner.state.step + 1)
      step += 1
      logged.update(stats.as_metrics())
      logged["step_s"] = time.time() - t0
      final.update(logged)
      if step % tcfg.log_every == 0 or step == tcfg.steps:
        writer.write(step, logged)
      bar.set_postfix({"kept": len(keep)})
      bar.update(1)
      if step % tcfg.save_every == 0 or step == tcfg.steps:
        ckpt.save(step, learner.state, {"iterator": task.iterator.get_state()}, meta, force=True)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  result = TrainResult(state=learner.state, graphdef=learner.graphdef, steps_run=step - first,
                       resumed_from=resumed_from, final_metrics=final, wall_s=time.time() - start)
  return result, "keep_rate", final.get("keep_rate")


STAGES = {"sft_rs": run_sft_rs, "rl_rule": run_rl_rule, "rl_rubric": run_rl_rubric,
          "rl_multiturn": run_rl_multiturn}
