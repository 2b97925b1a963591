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
