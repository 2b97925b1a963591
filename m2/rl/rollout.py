"""Rollouts: the policy's samples with their log-probs, as learner trajectories.

- `single_turn`: G samples per prompt in one batched `Sampler.generate` call.
- `multi_turn`: the policy plays the doctor in verifier `Consultation`
  environments until each one's Termination Gate ends it (or a turn limit);
  every turn is one batched call over the consultations still open, with the
  whole history as the prompt (prefilled again each turn). Only the doctor's
  sampled tokens have loss mask 1; patient and measurement turns are masked out.

Nothing is dropped silently: truncated responses, consultations that hit the
turn limit or the cache, and judge failures are counted in `RolloutStats`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

from m2.rl.learner import Trajectory
from m2.sampling import FINISH_LENGTH, Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Sample:
  """One response to one prompt."""
  group: int                 # index of its prompt in the rollout call
  prompt_ids: list[int]
  completion_ids: list[int]  # as sampled (including the stop token, if any)
  logprobs: np.ndarray       # [len(completion_ids)] under the sampling distribution
  text: str                  # decoded completion without the stop token
  finished: bool             # ended by a stop token (False: cut at max_new_tokens)

  def trajectory(self) -> Trajectory:
    return Trajectory.single_turn(self.prompt_ids, self.completion_ids, self.logprobs)


@dataclasses.dataclass
class RolloutStats:
  """Counters of a rollout; `as_metrics` gives them as `rollout/<name>` floats."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, name: str, n: int = 1):
    self.counts[name] += n

  def as_metrics(self) -> dict[str, float]:
    return {f"rollout/{k}": float(v) for k, v in sorted(self.counts.items())}


def _decode(tokenizer, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
  ids = list(ids)
  while ids and ids[-1] in stop_ids:
    ids.pop()
  return tokenizer.decode(ids)


def samples_from_output(out, rows: Sequence[Sequence[int]], group_size: int, tokenizer,
                        stop_ids: Sequence[int], stats: RolloutStats | None = None
                        ) -> list[Sample]:
  """`Sample`s of a `Sampler.generate` output whose rows are groups of `group_size`."""
  samples = []
  for i, ids in enumerate(out.token_lists()):
    samples.append(Sample(group=i // group_size, prompt_ids=list(rows[i]), completion_ids=ids,
                          logprobs=out.logprobs[i, :len(ids)].copy(),
                          text=_decode(tokenizer, ids, stop_ids),
                          finished=out.finish_reasons[i] != FINISH_LENGTH))
  if stats is not None:
    stats.add("samples", len(samples))
    stats.add("truncated", sum(not s.finished for s in samples))
    stats.add("generated_tokens", int(sum(len(s.completion_ids) for s in samples)))
  return samples


def single_turn(sampler: Sampler, params, prompts: Sequence[Sequence[int]], group_size: int,
                sampling: SamplingParams | Callable[[int], list[SamplingParams]], tokenizer,
                stats: RolloutStats | None = None) -> list[Sample]:
  """`group_size` samples per prompt (consecutive), in one generate call.

  sampling: one SamplingParams with seed=None (the sampler draws a seed per row,
  so a group's samples differ), or `f(rows) -> list[SamplingParams]` with
  per-row seeds (reproducible).
  """
  rows = [list(p) for p in prompts for _ in range(group_size)]
  if isinstance(sampling, SamplingParams):
    if sampling.seed is not None:
      raise ValueError("single_turn: a shared SamplingParams must have seed=None so that a "
                       "group's samples differ; pass per-row seeds as a function instead")
    per_row, stop = sampling, sampling.stop_token_ids
  else:
    per_row = sampling(len(rows))
    stop = per_row[0].stop_token_ids
  out = sampler.generate(params, rows, per_row)
  return samples_from_output(out, rows, group_size, tokenizer, stop, stats)


# ------------------------------------------------------------------ multi-turn


@dataclasses.dataclass
class Episode:
  """One consultation the policy played as the doctor."""
  case_id: str
  tokens: Any                  # m2.data.chat.ChatTokens of the conversation (mask 1: doctor)
  logprobs: np.ndarray         # [len(tokens)] sampler log-prob of each doctor token, else 0
  messages: list               # the transcript (doctor = "assistant")
  doctor_turns: list[str] = dataclasses.field(default_factory=list)
  turn_tokens: list[int] = dataclasses.field(default_factory=list)   # sampled per turn
  ended_by: str = ""           # "gate", "turn_limit", "empty_turn" or "length"
  finished: bool = True        # every doctor turn ended with a stop token
  # Case facts the doctor's turns entitled the patient to reveal (the Fact Unit's
  # verdict; volunteered facts are not the doctor's doing).
  elicited: set = dataclasses.field(default_factory=set)

  def trajectory(self) -> Trajectory:
    return Trajectory(self.tokens.ids, self.tokens.mask, self.logprobs)

  def graded_transcript(self) -> list:
    """The transcript up to the doctor's last turn (what the grader scores)."""
    last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=-1)
    return list(self.messages[:last + 1])


def consultations(sampler: Sampler, params, env, cases: Sequence[Any], fmt,
                  sampling: Callable[[int], list[SamplingParams]], *, max_turns: int,
                  max_length: int, stats: RolloutStats | None = None) -> list[Episode]:
  """Plays one consultation per case with the policy as the doctor.

  env: a verifier `BatchConsultation` (reset(cases) -> openings; step(turns) ->
  (message, done, info) per row, None for rows sitting out). Every doctor turn
  is one batched `generate` over the consultations still open, with the whole
  history as the prompt. The policy's tokens get mask 1 (`append_completion`);
  the patient's and measurement turns mask 0 (`append_messages`). An episode
  ends when the Termination Gate says so ("gate"), after `max_turns` doctor
  turns ("turn_limit"), on an empty doctor turn ("empty_turn"), or when the next
  turn would pass `max_length` tokens ("length"); each ending is counted.
  """
  from m2.data.records import Message
  stats = stats if stats is not None else RolloutStats()
  openings = env.reset(list(cases))
  episodes = []
  for case, opening in zip(cases, openings):
    tokens = fmt.prompt([opening])
    episodes.append(Episode(case_id=case.id, tokens=tokens,
                            logprobs=np.zeros(len(tokens), np.float32), messages=[opening]))
  active = list(range(len(episodes)))
  for turn in range(max_turns):
    params_rows = sampling(len(active)) if active else []
    max_new = params_rows[0].max_new_tokens if params_rows else 0
    fits = [i for i in active if len(episodes[i].tokens) + max_new <= max_length]
    for i in set(active) - set(fits):
      episodes[i].ended_by = "length"
      stats.add("ended_length")
    active = fits
    if not active:
      break
    stop = params_rows[0].stop_token_ids
    out = sampler.generate(params, [episodes[i].tokens.ids.tolist() for i in active],
                           params_rows[:len(active)])
    turns: list[str | None] = [None] * len(episodes)
    for j, (i, ids) in enumerate(zip(active, out.token_lists())):
      e = episodes[i]
      stats.add("doctor_turns")
      if out.finish_reasons[j] == FINISH_LENGTH:
        stats.add("truncated_turns")
        e.finished = False
      before = len(e.tokens)
      e.tokens = fmt.append_completion(e.tokens, ids)
      lp = np.zeros(len(e.tokens) - before, np.float32)
      produced = int(e.tokens.mask[before:].sum())   # the sampled ids come first
      lp[:produced] = out.logprobs[j, :produced]
      e.logprobs = np.concatenate([e.logprobs, lp])
      text = _decode(fmt.tokenizer, ids, stop)
      e.turn_tokens.append(len(ids))
      if not text.strip():
        # An empty turn (the policy stopped at once) ends the episode: the simulator
        # needs words. Its tokens stay in the trajectory and share the episode's reward.
        e.ended_by = "empty_turn"
        stats.add("ended_empty_turn")
        continue
      e.doctor_turns.append(text)
      e.messages.append(Message("assistant", text))
      turns[i] = text
    if turn == max_turns - 1:
      break   # the last doctor turn needs no reply
    still = []
    for i, res in enumerate(env.step(turns)):
      if res is None:
        continue
      msg, done, info = res
      episodes[i].elicited.update(info.get("entitled", ()))
      stats.add("fallback_replies", int(bool(info.get("fallback"))))
      stats.add("rejected_replies", int(info.get("rejections", 0)))
      if done:
        episodes[i].ended_by = "gate"
        stats.add("ended_gate")
        continue
      if msg.role == "measurement":
        stats.add("measurement_turns")
      e = episodes[i]
      before = len(e.tokens)
      e.tokens = fmt.append_messages(e.tokens, [msg])
      e.logprobs = np.concatenate([e.logprobs, np.zeros(len(e.tokens) - before, np.float32)])
      e.messages.append(msg)
      still.append(i)
    active = still
  for i in active:
    if not episodes[i].ended_by:
      episodes[i].ended_by = "turn_limit"
      stats.add("ended_turn_limit")
  stats.add("episodes", len(episodes))
  return episodes
