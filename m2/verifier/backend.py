"""The one way the verifier talks to a model: a role (simulator, rubric generator,
grader) = a Sampler + parameters + tokenizer + chat format.

    role = ModelRole(sampler, params, tokenizer, name="grader",
                     sampling=SamplingParams(temperature=0.0, max_new_tokens=128))
    texts = role.complete([[{"role": "user", "content": "..."}], ...])   # one batched decode

`complete` renders every conversation with the chat template, decodes the
whole batch in one `Sampler.generate` call and returns the reply texts, cut at
the end-of-turn marker. `seeds` gives each row its own random stream, which is
how callers regenerate a rejected reply differently.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from m2.data.chat import ENDOFTEXT, IM_END, ChatFormat, split_thinking
from m2.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RoleStats:
  calls: int = 0
  rows: int = 0
  new_tokens: int = 0


class ModelRole:
  """A model-backed verifier role driven through `m2.sampling.Sampler`."""

  def __init__(self, sampler, params, tokenizer, *, chat: ChatFormat | None = None,
               sampling: SamplingParams | None = None, name: str = "role",
               max_prompt_tokens: int = 4096):
    self.sampler, self.params, self.tokenizer = sampler, params, tokenizer
    self.chat = chat or ChatFormat(tokenizer, thinking_mode="off")
    base = sampling or SamplingParams(temperature=0.7, max_new_tokens=128)
    stops = tuple(dict.fromkeys(base.stop_token_ids + self.chat.stop_ids))
    self.sampling = dataclasses.replace(base, stop_token_ids=stops)
    self.name, self.max_prompt_tokens = name, max_prompt_tokens
    self.stats = RoleStats()
    self._vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)

  def _prompt_ids(self, messages) -> list[int]:
    ids = self.chat.prompt(messages).ids.tolist()
    if len(ids) > self.max_prompt_tokens:   # keep the end: the instruction and the last turns
      log.warning("%s: prompt of %d tokens cut to its last %d", self.name, len(ids),
                  self.max_prompt_tokens)
      ids = ids[-self.max_prompt_tokens:]
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    # A random or mismatched model can emit ids the tokenizer does not have.
    ids = [int(i) for i in ids if not self._vocab or 0 <= int(i) < self._vocab]
    text = self.tokenizer.decode(ids)
    for marker in (IM_END, ENDOFTEXT):
      text = text.split(marker)[0]
    return split_thinking(text)[1].strip()

  def complete(self, conversations: Sequence[Sequence[Any]], *,
               seeds: Sequence[int | None] | None = None,
               max_new_tokens: int | None = None, min_temperature: float = 0.0) -> list[str]:
    """One reply per conversation, decoded together in one batch, at the role's
    temperature or `min_temperature` if that is higher (a retry of a greedy role)."""
    if not conversations:
      return []
    prompts = [self._prompt_ids(c) for c in conversations]
    base = self.sampling
    if max_new_tokens is not None:
      base = dataclasses.replace(base, max_new_tokens=max_new_tokens)
    if min_temperature > base.temperature:
      base = dataclasses.replace(base, temperature=min_temperature)
    if seeds is None:
      sampling: Any = base
    else:
      if len(seeds) != len(conversations):
        raise ValueError(f"{len(seeds)} seeds for {len(conversations)} conversations")
      sampling = [dataclasses.replace(base, seed=None if s is None else int(s) % 2**32)
                  for s in seeds]
    out = self.sampler.generate(self.params, prompts, sampling)
    self.stats.calls += 1
    self.stats.rows += len(prompts)
    self.stats.new_tokens += int(out.lengths.sum())
    return [self.decode(t) for t in out.token_lists()]
