"""Tokenizers. `ByteTokenizer` needs no trained vocabulary: UTF-8 bytes shifted
past three special ids. It lets the tiny pipeline run on any text with no
files; the data issue adds SentencePiece and HF tokenizer.json backends behind
the same interface."""

from __future__ import annotations

import numpy as np


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
    import json
    import os

    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer.json in {folder}")
    self._tok = Tokenizer.from_file(path)
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

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str):
  """"byte" for ByteTokenizer, else a folder holding tokenizer.json."""
  return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)
