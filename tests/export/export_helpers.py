"""Helpers shared by the export tests."""

import numpy as np


def m2_model(cfg, params):
  from flax import nnx

  from m2.model.transformer import Transformer
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def padded_batch(tokenizer, texts):
  """Left-padded tokens, positions and segments (0 = pad) for texts of unequal length."""
  ids = [tokenizer.encode(t) for t in texts]
  length = max(map(len, ids))
  tokens = np.zeros((len(ids), length), np.int32)
  segments, positions = np.zeros_like(tokens), np.zeros_like(tokens)
  for i, x in enumerate(ids):
    tokens[i, length - len(x):] = x
    segments[i, length - len(x):] = 1
    positions[i, length - len(x):] = np.arange(len(x))
  return tokens, positions, segments


TEXTS = ["Doctor: Any chest pain or shortness of breath?\nPatient: Only when I climb stairs.",
         "Patient: I've had a fever since Tuesday.", "Note: BP 120/80, HR 72."]
