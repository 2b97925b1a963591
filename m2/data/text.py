"""Plain-text corpora and the packed language-modelling pipeline (grain).

`lm_dataset` turns documents into fixed-length packed batches with segment ids
and positions, the layout the model's attention expects. Its iterator state is
checkpointed with the run, so a resumed run sees exactly the batches it would
have seen.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Iterable, Sequence

import grain
import numpy as np

log = logging.getLogger(__name__)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_data_dir() -> str:
  """$M2_DATA_DIR, else the `shared/data` folder beside the repository."""
  return os.environ.get("M2_DATA_DIR") or os.path.join(os.path.dirname(_REPO), "shared", "data")


# source name -> (csv file under data_dir, text columns)
_CSV_SOURCES = {
    "mts_dialog": ("mts_dialog/MTS-Dialog-TrainingSet.csv", ("dialogue", "section_text")),
    "aci_bench": ("aci_bench/train.csv", ("dialogue", "note")),
}
TEXT_SOURCES = tuple(_CSV_SOURCES)


def read_texts(sources: Sequence[str], data_dir: str | None = None) -> list[str]:
  """Training documents of the named sources; empty fields are counted and logged."""
  data_dir = data_dir or default_data_dir()
  texts = []
  for name in sources:
    if name not in _CSV_SOURCES:
      raise ValueError(f"unknown text source {name!r}; known: {list(_CSV_SOURCES)}")
    rel, columns = _CSV_SOURCES[name]
    path = os.path.join(data_dir, rel)
    if not os.path.exists(path):
      raise FileNotFoundError(f"text source {name!r}: {path} not found "
                              f"(set M2_DATA_DIR or the config's data_dir)")
    empty, before = 0, len(texts)
    with open(path, newline="", encoding="utf-8") as f:
      for line, row in enumerate(csv.DictReader(f), start=2):
        missing = [c for c in columns if c not in row]
        if missing:
          raise ValueError(f"{path}:{line}: missing column(s) {missing}")
        for c in columns:
          if row[c] and row[c].strip():
            texts.append(row[c].strip())
          else:
            empty += 1
    log.info("text source %s: %d documents, %d empty fields skipped", name,
             len(texts) - before, empty)
  return texts


def lm_dataset(texts: Iterable[str], tokenizer, *, batch_size: int, seq_len: int,
               seed: int = 0) -> grain.IterDataset:
  """Shuffled, repeated, packed batches: inputs/targets/positions/segments/loss_mask [B, T]."""
  texts = list(texts)
  if not texts:
    raise ValueError("lm_dataset: no documents")

  def tokenize(text):
    return {"tokens": np.asarray([tokenizer.bos_id, *tokenizer.encode(text),
                                  tokenizer.eos_id], np.int32)}

  docs = grain.MapDataset.source(texts).shuffle(seed=seed).repeat().map(tokenize)
  packed = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
  return packed.batch(batch_size, drop_remainder=True).map(_to_model_batch)


def _to_model_batch(ex):
  tokens, seg, pos = ex["tokens"], ex["tokens_segment_ids"], ex["tokens_positions"]
  # A target is trained only if it continues the same document as its input.
  same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  return {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "positions": pos[:, :-1].astype(np.int32),
      "segments": seg[:, :-1].astype(np.int32),
      "loss_mask": same_doc.astype(np.int32),
  }
