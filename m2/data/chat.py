"""Qwen ChatML chat template with Baichuan-M2's thinking switch, as token ids
plus a per-token mask of what the assistant produced.

Every message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; roles other
than system/user/assistant (e.g. "measurement" for exam and test results the
patient simulator returns, "tool") are rendered the same way and never
trained on. No default system prompt is added (as Qwen3 / Baichuan-M2) unless
`system=` is given.

`thinking_mode` (Baichuan-M2's `thinking_mode='on'|'off'|'auto'` argument):
- "off":  the generation prompt is `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`
          (Qwen3's enable_thinking=False); the answer follows, with any
          `<think>...</think>` in the content removed.
- "on":   the generation prompt is `<|im_start|>assistant\\n<think>\\n`: the model
          must reason, then close `\\n</think>\\n\\n` and answer.
- "auto": the generation prompt is `<|im_start|>assistant\\n`; the model may open
          a `<think>` block itself (Qwen3's enable_thinking=True behaviour).

A training target is exactly what the model generates after the generation
prompt: `encode(msgs[:-1], add_generation_prompt=True)` is a prefix of
`encode(msgs)`, and the rest is masked 1 up to and including `<|im_end|>`
(the role header, think prefix and the newline after `<|im_end|>` are 0).
Assistant turns before the last user turn lose their reasoning, as in Qwen3
(`strip_history_thinking=True`); multi-turn RL keeps it (False), or builds the
sequence incrementally from the policy's own tokens with `append_completion`
and `append_messages`.

`CHAT_TEMPLATE` is the same template in Jinja (with `{% generation %}` blocks)
for transformers' `apply_chat_template(..., thinking_mode=...,
return_assistant_tokens_mask=True)`; the tests check identical ids and masks.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from m2.data.records import Message

IM_START, IM_END, THINK, END_THINK = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
ENDOFTEXT = "<|endoftext|>"
THINKING_MODES = ("on", "off", "auto")
_CHAT_SPECIALS = (ENDOFTEXT, IM_START, IM_END, THINK, END_THINK)

CHAT_TEMPLATE = (
    "{%- set mode = thinking_mode | default('auto') -%}"
    "{%- set strip_history = strip_history_thinking | default(true) -%}"
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role != 'assistant' -%}"
    "{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- if default_system is defined and default_system is not none"
    " and (not messages or messages[0].role != 'system') -%}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role != 'assistant' -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{%- set content = m.content -%}{%- set reasoning = none -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 < ns.last_query and strip_history -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- content + '<|im_end|>' -}}{% endgeneration %}"
    "{%- elif mode == 'off' -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}"
    "{% generation %}{{- content + '<|im_end|>' -}}{% endgeneration %}"
    "{%- elif mode == 'on' -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{% generation %}{{- (reasoning or '') + '\\n</think>\\n\\n' + content + '<|im_end|>' -}}"
    "{% endgeneration %}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{%- if reasoning is not none -%}"
    "{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- content + '<|im_end|>' -}}{% endgeneration %}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if mode == 'off' -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- elif mode == 'on' -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}")


@dataclasses.dataclass(frozen=True)
class ChatTokens:
  """Token ids [T] and mask [T] (1 = produced by the assistant: train / score it)."""
  ids: np.ndarray
  mask: np.ndarray

  def __post_init__(self):
    if self.ids.shape != self.mask.shape or self.ids.ndim != 1:
      raise ValueError(f"ids {self.ids.shape} and mask {self.mask.shape} must be equal 1-D")

  def __len__(self) -> int:
    return len(self.ids)

  def __add__(self, other: "ChatTokens") -> "ChatTokens":
    return ChatTokens(np.concatenate([self.ids, other.ids]),
                      np.concatenate([self.mask, other.mask]))

  @classmethod
  def empty(cls) -> "ChatTokens":
    return cls(np.zeros([0], np.int32), np.zeros([0], np.int32))


def split_thinking(content: str) -> tuple[str | None, str]:
  """(reasoning or None, answer) of an assistant message with `<think>...</think>`."""
  if END_THINK not in content:
    return None, content
  head, answer = content.split(END_THINK)[0], content.split(END_THINK)[-1]
  return head.split(THINK)[-1].strip("\n"), answer.lstrip("\n")


def _as_message(m) -> Message:
  if isinstance(m, Message):
    return m
  if isinstance(m, Mapping):
    return Message(m["role"], m["content"])
  raise TypeError(f"a message must be a Message or a {{'role', 'content'}} mapping, got {m!r}")


class ChatFormat:
  """Renders and tokenizes chats for one tokenizer.

  Special tokens are single ids when the tokenizer has them (`token_to_id`);
  otherwise (ByteTokenizer) their text is encoded like any other text.
  """

  def __init__(self, tokenizer, *, thinking_mode: str = "auto", system: str | None = None,
               strip_history_thinking: bool = True):
    if thinking_mode not in THINKING_MODES:
      raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    self.tokenizer, self.thinking_mode, self.system = tokenizer, thinking_mode, system
    self.strip_history_thinking = strip_history_thinking
    lookup = getattr(tokenizer, "token_to_id", None)
    self._special_ids = {}
    if lookup is not None:
      specials = set(_CHAT_SPECIALS)
      added = getattr(getattr(tokenizer, "_tok", None), "get_added_tokens_decoder", None)
      if added is not None:   # HF splits text at every added token; so must we
        specials |= {t.content for t in added().values()}
      self._special_ids = {s: lookup(s) for s in specials if lookup(s) is not None}
    self._split = (re.compile("(" + "|".join(re.escape(s) for s in sorted(
        self._special_ids, key=len, reverse=True)) + ")") if self._special_ids else None)

  # ---------------------------------------------------------------- render

  def _generation_prefix(self) -> str:
    return {"off": f"{THINK}\n\n{END_THINK}\n\n", "on": f"{THINK}\n", "auto": ""}[
        self.thinking_mode]

  def _completion(self, content: str) -> str:
    """What the model generates for an assistant message after the prefix."""
    reasoning, answer = split_thinking(content)
    if self.thinking_mode == "off":
      return answer
    if self.thinking_mode == "on":
      return f"{reasoning or ''}\n{END_THINK}\n\n{answer}"
    return answer if reasoning is None else f"{THINK}\n{reasoning}\n{END_THINK}\n\n{answer}"

  def pieces(self, messages: Sequence[Any], add_generation_prompt: bool = False,
             continuation: bool = False) -> list[tuple[str, bool]]:
    """The rendered chat as (text, produced-by-assistant) pieces."""
    msgs = [_as_message(m) for m in messages]
    out: list[tuple[str, bool]] = []
    if self.system is not None and not continuation and (not msgs or msgs[0].role != "system"):
      out.append((f"{IM_START}system\n{self.system}{IM_END}\n", False))
    last_query = max((i for i, m in enumerate(msgs) if m.role != "assistant"), default=-1)
    for i, m in enumerate(msgs):
      if m.role != "assistant":
        out.append((f"{IM_START}{m.role}\n{m.content}{IM_END}\n", False))
      elif i < last_query and self.strip_history_thinking:
        out += [(f"{IM_START}assistant\n", False), (split_thinking(m.content)[1] + IM_END, True),
                ("\n", False)]
      else:
        out += [(f"{IM_START}assistant\n{self._generation_prefix()}", False),
                (self._completion(m.content) + IM_END, True), ("\n", False)]
    if add_generation_prompt:
      out.append((f"{IM_START}assistant\n{self._generation_prefix()}", False))
    return out

  def render(self, messages: Sequence[Any], add_generation_prompt: bool = False) -> str:
    """The chat as text (what CHAT_TEMPLATE renders)."""
    return "".join(t for t, _ in self.pieces(messages, add_generation_prompt))

  # -------------------------------------------------------------- tokenize

  def _tokenize(self, pieces: Iterable[tuple[str, bool]]) -> ChatTokens:
    text = "".join(t for t, _ in pieces)
    flags = np.concatenate([np.full(len(t), f, bool) for t, f in pieces] or [np.zeros(0, bool)])
    ids, mask, pos = [], [], 0
    for part in (self._split.split(text) if self._split else [text]):
      if not part:
        continue
      span = flags[pos:pos + len(part)]
      if part in self._special_ids:
        ids.append(self._special_ids[part])
        mask.append(bool(span[0]))
      else:
        self._encode_span(part, span, ids, mask)
      pos += len(part)
    return ChatTokens(np.asarray(ids, np.int32), np.asarray(mask, np.int32))

  def _encode_span(self, text: str, flags: np.ndarray, ids: list, mask: list):
    """Encodes text between special tokens in one go (as transformers does); a
    token is the assistant's if any of its characters is."""
    enc = getattr(getattr(self.tokenizer, "_tok", None), "encode", None)
    if enc is not None:   # HF: offsets map tokens to characters
      e = enc(text, add_special_tokens=False)
      for i, (a, b) in zip(e.ids, e.offsets):
        ids.append(i)
        mask.append(bool(flags[a:max(b, a + 1)].any()))
      return
    # Other backends: encode each run of equal flags separately.
    start = 0
    for end in [*np.flatnonzero(np.diff(flags.astype(np.int8))) + 1, len(text)]:
      part = self.tokenizer.encode(text[start:end])
      ids += part
      mask += [bool(flags[start])] * len(part)
      start = end

  def encode(self, messages: Sequence[Any], add_generation_prompt: bool = False) -> ChatTokens:
    """Token ids and assistant mask of a whole chat (SFT, RL scoring)."""
    return self._tokenize(self.pieces(messages, add_generation_prompt))

  def prompt(self, messages: Sequence[Any]) -> ChatTokens:
    """A rollout prompt: the chat plus the generation prompt (all mask 0)."""
    return self.encode(messages, add_generation_prompt=True)

  # ------------------------------------------------- incremental rollouts

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end an assistant turn during sampling."""
    return tuple(self._special_ids[s] for s in (IM_END, ENDOFTEXT) if s in self._special_ids)

  def append_completion(self, tokens: ChatTokens, completion_ids: Sequence[int]) -> ChatTokens:
    """Appends the policy's own sampled ids (mask 1), closing the turn with
    `<|im_end|>` (mask 0 if the policy did not produce it) and the newline."""
    ids = [int(i) for i in completion_ids]
    end = self._tokenize([(IM_END, False)])
    if ENDOFTEXT in self._special_ids and ids and ids[-1] == self._special_ids[ENDOFTEXT]:
      ids = ids[:-1]   # the turn ends in <|im_end|>, whichever stop id was sampled
    produced = ChatTokens(np.asarray(ids, np.int32), np.ones(len(ids), np.int32))
    if len(ids) < len(end) or list(ids[-len(end):]) != end.ids.tolist():
      produced = produced + end
    return tokens + produced + self._tokenize([("\n", False)])

  def append_messages(self, tokens: ChatTokens, messages: Sequence[Any],
                      add_generation_prompt: bool = True) -> ChatTokens:
    """Appends non-assistant messages (patient replies, measurements; mask 0)
    and, by default, the next generation prompt."""
    msgs = [_as_message(m) for m in messages]
    if any(m.role == "assistant" for m in msgs):
      raise ValueError("append_messages takes the other side's messages; use "
                       "append_completion for the assistant's")
    return tokens + self._tokenize(self.pieces(msgs, add_generation_prompt, continuation=True))


def encode_chat(tokenizer, messages: Sequence[Any], *, thinking_mode: str = "auto",
                add_generation_prompt: bool = False, system: str | None = None,
                strip_history_thinking: bool = True) -> ChatTokens:
  """`ChatFormat(tokenizer, ...).encode(messages, add_generation_prompt)`."""
  return ChatFormat(tokenizer, thinking_mode=thinking_mode, system=system,
                    strip_history_thinking=strip_history_thinking).encode(
                        messages, add_generation_prompt)
