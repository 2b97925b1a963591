"""Grain pipelines: packed LM batches, SFT with assistant-only loss masks, RL prompt batches.

Each pipeline is a `grain.IterDataset`, deterministic given its seed. Its
iterator's `get_state()` is a small JSON dict that the train loop saves in
every checkpoint; `set_state` on a fresh iterator of the same pipeline
resumes at exactly the next batch.

    docs = prepare_data("documents", sources, data_cfg)          # TFDS, cached
    lm = lm_dataset(docs.sources_dict(), tok, batch_size=8, seq_len=256,
                    mixture=mix.resolve(docs.sources))
    sft = sft_dataset(chats.sources_dict(), ChatFormat(tok, thinking_mode="off"),
                      batch_size=8, seq_len=256)
    rl = rl_prompts(prompts.sources_dict(), ChatFormat(tok), batch_size=16)

LM and SFT batches are what `m2.train` consumes: numpy int32 [B, T] arrays
`inputs`, `targets`, `positions`, `segments` (0 = padding) and `loss_mask`.
Packed rows hold several documents; attention stays inside a segment and
positions restart at 0 in each, so the model never sees across documents. A
target is trained only when it continues its input's segment (and, for SFT,
when the assistant produced it: the ChatFormat mask shifted onto targets).

- LM: documents -> [bos, tokens, eos] -> a token-weighted domain mix
  (`m2.data.mixture`) -> concatenated and split into rows of T + 1 tokens
  (grain's ConcatThenSplit: no padding; a long document continues in the next
  row, from position 0).
- SFT: chats -> windows of whole messages that fit T + 1 tokens (a long
  consultation becomes several; a single exchange longer than that keeps the
  end of its context and the start of the reply) -> first-fit packed (or
  padded) rows.
- RL: QA items -> chat prompts with the generation prompt -> dicts of prompt
  ids, prompt text, gold answer and source, batched as lists (the sampler takes
  ragged prompts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from m2.data import records, tfds_builders
from m2.data.chat import ChatFormat, ChatTokens
from m2.data.mixture import Resolved, document_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """config.data: where records come from, how they are split, and the tokenizer."""
  data_dir: str = ""              # "": $M2_DATA_DIR or ../shared/data
  cache_dir: str = ""             # "": $M2_CACHE_DIR or ~/.cache/m2 (tokenizers, prepared data)
  tokenizer: str = "byte"         # see m2.data.tokenizers.load_tokenizer; "": the HF checkpoint's
  heldout_fraction: float = 0.02  # of every source's records, by a hash of the record id
  exclude_splits: tuple[str, ...] = ()   # "source:split" never used for training (test sets)
  math_items: int = 20000         # generated problems (m2.data.math), before the held-out split
  math_seed: int = 0
  read_threads: int = 0           # grain threads that read and tokenize (0: in the main thread)

  def __post_init__(self):
    self.settings()   # validates the fields it shares
    if not (isinstance(self.read_threads, int) and self.read_threads >= 0):
      raise ValueError(f"read_threads must be an int >= 0, got {self.read_threads!r}")

  def settings(self) -> tfds_builders.Settings:
    return tfds_builders.Settings(
        data_dir=self.data_dir, heldout_fraction=float(self.heldout_fraction),
        exclude_splits=tuple(self.exclude_splits), math_items=self.math_items,
        math_seed=self.math_seed)


def prepare_data(kind: str, sources: Sequence[str], cfg: DataConfig
                 ) -> tfds_builders.Prepared:
  """The de-identified, split TFDS data for `kind` ("documents", "chats", "prompts")."""
  return tfds_builders.prepare(kind, tuple(sources), cfg.settings(), cfg.cache_dir or None)


def resolve_tokenizer(cfg: DataConfig, hf_checkpoint: str = "") -> DataConfig:
  """`cfg` whose `tokenizer` names what the run uses: itself, else the HF checkpoint's
  folder, else "byte". Stage directories record it, so they reload with the same one."""
  return dataclasses.replace(cfg, tokenizer=cfg.tokenizer or hf_checkpoint or "byte")


def load_data_tokenizer(cfg: DataConfig, hf_checkpoint: str = ""):
  """The tokenizer `resolve_tokenizer` names. A SentencePiece spec ("sp:8192") is trained
  on this config's data into its cache."""
  from m2.data import tokenizers

  return tokenizers.load_tokenizer(resolve_tokenizer(cfg, hf_checkpoint).tokenizer,
                                   cache_dir=cfg.cache_dir or None, data_dir=cfg.data_dir or None)


def _read_options(threads: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(4 * threads, 1))


def _seed(seed: int, salt: int) -> int:
  """Distinct, stable shuffle seeds for the parts of one pipeline."""
  return (seed * 1_000_003 + salt) % 2**32


def _field(x, key: str):
  """A row's field as str: rows are TFDS dicts (bytes) or plain strings."""
  if isinstance(x, Mapping):
    x = x[key]
  return x.decode("utf-8") if isinstance(x, bytes) else x


def _shard(ds: grain.MapDataset, index: int, count: int) -> grain.MapDataset:
  if not 0 <= index < count:
    raise ValueError(f"shard_index {index} is not in [0, {count})")
  return ds if count == 1 else ds[index::count]


# ------------------------------------------------------------------------ LM


def document_tokens(tokenizer, text: str) -> np.ndarray:
  return np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)


def mean_document_tokens(docs: Sequence, tokenizer, chars: int | None = None,
                         sample: int = 256) -> float:
  """Mean tokens per document (bos and eos included), deterministically.

  The mean length in characters is exact (`chars`, the source's total, or
  counted here for up to 20k documents); tokens per character come from an
  evenly spaced sample, which varies far less between documents than length.
  """
  n = len(docs)
  if not n:
    return 0.0
  idx = np.unique(np.linspace(0, n - 1, min(sample, n)).astype(int))
  texts = [_field(docs[int(i)], "text") for i in idx]
  per_char = (sum(len(tokenizer.encode(t)) for t in texts)
              / max(sum(len(t) for t in texts), 1))
  if chars is None:
    chars = (sum(len(_field(docs[i], "text")) for i in range(n)) if n <= 20_000
             else sum(len(t) for t in texts) / len(texts) * n)
  return chars / n * per_char + 2


def _lm_element(tokenizer, source_index: int, row) -> dict:
  tokens = document_tokens(tokenizer, _field(row, "text"))
  return {"tokens": tokens, "sources": np.full(len(tokens), source_index, np.int32)}


def lm_dataset(docs: Mapping[str, Sequence], tokenizer, *, batch_size: int, seq_len: int,
               seed: int = 0, mixture: Resolved | None = None, keep_sources: bool = False,
               shard_index: int = 0, shard_count: int = 1, read_threads: int = 0,
               chars: Mapping[str, int] | None = None) -> grain.IterDataset:
  """Packed LM batches [B, T] from documents (str, or rows with "text") per source.

  With `mixture`, its domains are sampled to realise its token fractions;
  without, all sources form one pool in proportion to their size. The stream
  repeats (each epoch reshuffled). `keep_sources` adds "sources" [B, T]: the
  1-based index into `list(docs)` of each target's document (0: padding), for
  measuring the realised mix. Host `shard_index` of `shard_count` reads every
  `shard_count`-th document of each source. `chars` (source -> total
  characters, e.g. from the TFDS report) saves counting them for the mix weights.
  """
  names = list(docs)
  mixture = mixture or Resolved({"all": 1.0}, {"all": tuple(names)}, {})
  unknown = [s for s in mixture.sources if s not in docs]
  if unknown:
    raise ValueError(f"lm_dataset: the mixture names sources with no documents: {unknown}")
  parts, mean_tokens = [], {}
  for k, (domain, sources) in enumerate(mixture.domains.items()):
    pieces = [grain.MapDataset.source(docs[s]).map(
        functools.partial(_lm_element, tokenizer, names.index(s) + 1))
              for s in sources if len(docs[s])]
    if not pieces:
      raise ValueError(f"lm_dataset: domain {domain!r} has no documents in {list(sources)}")
    ds = grain.MapDataset.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    ds = _shard(ds, shard_index, shard_count)
    parts.append(ds.shuffle(seed=_seed(seed, k)).repeat())
    sizes = {s: len(docs[s]) for s in sources}
    mean_tokens[domain] = sum(
        sizes[s] * mean_document_tokens(docs[s], tokenizer, (chars or {}).get(s))
        for s in sources) / max(sum(sizes.values()), 1)
  if len(parts) == 1:
    mixed = parts[0]
  else:
    weights = document_weights(mixture.fractions, mean_tokens)
    log.info("lm mix: mean tokens per document %s -> document weights %s",
             {d: round(v, 1) for d, v in mean_tokens.items()},
             {d: round(v, 4) for d, v in weights.items()})
    mixed = grain.MapDataset.mix(parts, [weights[d] for d in mixture.domains])
  packed = grain.experimental.ConcatThenSplitIterDataset(
      mixed.to_iter_dataset(_read_options(read_threads)),
      length_struct={"tokens": seq_len + 1, "sources": seq_len + 1})
  return packed.batch(batch_size, drop_remainder=True).map(
      functools.partial(_lm_batch, keep_sources))


def _lm_batch(keep_sources: bool, ex: dict) -> dict:
  tokens, seg, pos = ex["tokens"], ex["tokens_segment_ids"], ex["tokens_positions"]
  # A target is trained only if it continues the same document as its input.
  same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  out = {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "positions": pos[:, :-1].astype(np.int32),
      "segments": seg[:, :-1].astype(np.int32),
      "loss_mask": same_doc.astype(np.int32),
  }
  if keep_sources:
    out["sources"] = ex["sources"][:, 1:].astype(np.int32)
  return out


# ----------------------------------------------------------------------- SFT


@dataclasses.dataclass
class WindowStats:
  """How chats became training windows (nothing is dropped without a count)."""
  chats: int = 0
  windows: int = 0
  truncated: int = 0          # one exchange longer than the window: context/reply cut
  no_assistant: int = 0       # chats with no assistant message: nothing to train on
  tokens: int = 0
  assistant_tokens: int = 0

  def summary(self) -> str:
    return (f"{self.chats} chats -> {self.windows} windows ({self.truncated} truncated, "
            f"{self.no_assistant} chats without an assistant turn); {self.tokens:,} tokens, "
            f"{self.assistant_tokens / max(self.tokens, 1):.0%} trained (assistant)")


def _messages(row) -> list:
  if isinstance(row, (Mapping, str, bytes)):
    return json.loads(_field(row, "messages"))
  return list(row)


def _truncate(tokens: ChatTokens, max_len: int) -> ChatTokens:
  """Cuts a window to `max_len`: keeps the start of the first reply and up to a
  quarter of the window of the context just before it (more if the reply is short)."""
  first = int(np.argmax(tokens.mask)) if tokens.mask.any() else len(tokens)
  reply = len(tokens) - first
  context = min(first, max(max_len - reply, max_len // 4))
  start = first - context
  return ChatTokens(tokens.ids[start:start + max_len], tokens.mask[start:start + max_len])


def chat_windows(fmt: ChatFormat, messages: Sequence, max_len: int,
                 stats: WindowStats | None = None) -> list[ChatTokens]:
  """Splits a chat at message boundaries into encoded windows of <= `max_len` tokens.

  Each window ends with an assistant message and starts where the previous
  one ended (with the chat's system message, if any, repeated); every
  assistant message is trained on exactly once.
  """
  stats = stats if stats is not None else WindowStats()
  msgs = [m if isinstance(m, records.Message) else records.Message(m["role"], m["content"])
          for m in messages]
  system = msgs[:1] if msgs and msgs[0].role == "system" else []
  body = msgs[len(system):]
  stats.chats += 1
  # Each message encoded alone bounds its length inside a window from above
  # (an assistant turn carries the generation prefix only when it is last).
  base = len(fmt.encode(system))
  sizes = np.cumsum([0] + [len(fmt.encode(system + [m])) - base for m in body])
  out, i = [], 0
  while i < len(body):
    ends = [j + 1 for j in range(i, len(body)) if body[j].role == "assistant"]
    if not ends:   # turns after the last reply have no target; a chat with no reply, none
      stats.no_assistant += not out
      break
    fitting = [j for j in ends if base + sizes[j] - sizes[i] <= max_len]
    j = fitting[-1] if fitting else ends[0]
    tokens = fmt.encode(system + body[i:j])
    if len(tokens) > max_len:
      tokens = _truncate(tokens, max_len)
      stats.truncated += 1
    out.append(tokens)
    stats.windows += 1
    stats.tokens += len(tokens)
    stats.assistant_tokens += int(tokens.mask.sum())
    i = j
  return out


def window_stats(chats: Mapping[str, Sequence] | Sequence, fmt: ChatFormat, seq_len: int
                 ) -> WindowStats:
  """What `sft_dataset` makes of `chats` in one epoch (for the stage's log)."""
  stats = WindowStats()
  for rows in (chats.values() if isinstance(chats, Mapping) else [chats]):
    for i in range(len(rows)):
      chat_windows(fmt, _messages(rows[i]), seq_len + 1, stats)
  return stats


class _Windows(grain.experimental.FlatMapTransform):
  """A chat's windows as separate elements (they were encoded in the threaded map)."""
  max_fan_out = 1 << 16

  def flat_map(self, element):
    return element


def _sft_windows(fmt: ChatFormat, max_len: int, row) -> list[dict]:
  return [{"ids": w.ids.astype(np.int32), "mask": w.mask.astype(np.int32)}
          for w in chat_windows(fmt, _messages(row), max_len)]


def _pad(length: int, ex: dict) -> dict:
  n = len(ex["ids"])
  pad = lambda x: np.pad(x, (0, length - n))  # noqa: E731
  return {"ids": pad(ex["ids"]), "mask": pad(ex["mask"]),
          "ids_segment_ids": pad(np.ones(n, np.int32)),
          "ids_positions": pad(np.arange(n, dtype=np.int32))}


def sft_dataset(chats: Mapping[str, Sequence] | Sequence, fmt: ChatFormat, *, batch_size: int,
                seq_len: int, seed: int = 0, pack: bool = True, shard_index: int = 0,
                shard_count: int = 1, read_threads: int = 0) -> grain.IterDataset:
  """SFT batches [B, T] whose loss_mask is 1 exactly on assistant-produced targets.

  `chats`: per source (or one sequence of) chats, each a list of messages or a
  row with "messages" (JSON). Windows are first-fit packed into rows (`pack`)
  or padded, one per row. The stream repeats, reshuffled each epoch.
  """
  pools = list(chats.values()) if isinstance(chats, Mapping) else [chats]
  pieces = [grain.MapDataset.source(p) for p in pools if len(p)]
  if not pieces:
    raise ValueError("sft_dataset: no chats")
  ds = grain.MapDataset.concatenate(pieces) if len(pieces) > 1 else pieces[0]
  ds = _shard(ds, shard_index, shard_count).shuffle(seed=_seed(seed, 0)).repeat()
  ds = ds.map(functools.partial(_sft_windows, fmt, seq_len + 1))
  it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(_read_options(read_threads)),
                                             _Windows())
  if pack:
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"ids": seq_len + 1, "mask": seq_len + 1},
        num_packing_bins=2 * batch_size, seed=_seed(seed, 1), shuffle_bins=True)
  else:
    it = it.map(functools.partial(_pad, seq_len + 1))
  return it.batch(batch_size, drop_remainder=True).map(_sft_batch)


def _sft_batch(ex: dict) -> dict:
  ids, mask = ex["ids"], ex["mask"]
  seg, pos = ex["ids_segment_ids"], ex["ids_positions"]
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  return {
      "inputs": ids[:, :-1].astype(np.int32),
      "targets": ids[:, 1:].astype(np.int32),
      "positions": pos[:, :-1].astype(np.int32),
      "segments": seg[:, :-1].astype(np.int32),
      # The assistant mask belongs to the token predicted: shift it onto targets.
      "loss_mask": (same & (mask[:, 1:] > 0)).astype(np.int32),
  }


# ------------------------------------------------------------------------ RL


def _qa_item(row) -> records.QAItem:
  if isinstance(row, records.QAItem):
    return row
  return records.from_dict(json.loads(_field(row, "record")))


def qa_messages(row) -> list[records.Message]:
  """A QA item as a one-turn chat: the RL prompt, and the gold answer in the form the
  rule reward reads ("Answer: B", "Answer: yes", "Answer: 42")."""
  item = _qa_item(row)
  return [records.Message("user", item.prompt()),
          records.Message("assistant", f"Answer: {item.answer}")]


def qa_chats(items: Mapping[str, Sequence]) -> dict[str, grain.MapDataset]:
  """Per source, QA items as chats for `sft_dataset` (read lazily, row by row)."""
  return {name: grain.MapDataset.source(pool).map(qa_messages)
          for name, pool in items.items() if len(pool)}


def prompt_examples(items: Mapping[str, Sequence] | Sequence, fmt: ChatFormat,
                    max_prompt_len: int = 1024) -> list[dict]:
  """Encoded prompts: {"id", "source", "prompt", "answer", "answer_text", "prompt_ids", "item"}.

  A prompt longer than `max_prompt_len` tokens is left out, counted and logged.
  """
  pools = list(items.values()) if isinstance(items, Mapping) else [items]
  out, too_long = [], 0
  for pool in pools:
    for i in range(len(pool)):
      item = _qa_item(pool[i])
      text = item.prompt()
      ids = fmt.prompt([records.Message("user", text)]).ids
      if len(ids) > max_prompt_len:
        too_long += 1
        continue
      out.append({"id": item.id, "source": item.source, "prompt": text, "answer": item.answer,
                  "answer_text": item.answer_text, "prompt_ids": ids.tolist(), "item": item})
  if too_long:
    log.warning("rl prompts: %d of %d prompts are longer than %d tokens and left out",
                too_long, too_long + len(out), max_prompt_len)
  if not out:
    raise ValueError("rl prompts: no prompt fits max_prompt_len")
  return out


def _collate(examples: Sequence[dict]) -> dict[str, list]:
  return {k: [e[k] for e in examples] for k in examples[0]}


def rl_prompts(items: Mapping[str, Sequence] | Sequence, fmt: ChatFormat, *,
               batch_size: int | None = None, seed: int = 0, max_prompt_len: int = 1024,
               repeat: bool = True, shard_index: int = 0, shard_count: int = 1
               ) -> grain.IterDataset:
  """Shuffled RL prompts: single examples (`prompt_examples`) or, with
  `batch_size`, dicts of lists (`prompt_ids` goes straight to `Sampler.generate`)."""
  ds = grain.MapDataset.source(prompt_examples(items, fmt, max_prompt_len))
  ds = _shard(ds, shard_index, shard_count).shuffle(seed=_seed(seed, 0))
  if repeat:
    ds = ds.repeat()
  it = ds.to_iter_dataset(_read_options(0))
  if batch_size:
    it = it.batch(batch_size, drop_remainder=True, batch_fn=_collate)
  return it

