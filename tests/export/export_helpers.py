"""Helpers shared by the export tests."""

import importlib.util
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_export_config(cache: str, steps: int = 60):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs/tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stages = ("midtrain",)
  c.model.update(preset="", vocab_size=320, num_layers=2, embed_dim=128, num_heads=2,
                 num_kv_heads=1, head_dim=64, mlp_dim=256)
  c.data.update(tokenizer="byte", cache_dir=cache, math_items=200)
  c.midtrain.domains.medical = ("mts_dialog",)
  c.midtrain.mix = dict(medical=1.0, general=0.0, math=0.0)
  c.midtrain.domains.math = ()
  c.midtrain.mix_batches = 0
  c.midtrain.train.update(steps=steps, batch_size=8, seq_len=128, log_every=20,
                          save_every=steps, eval_every=0, keep_checkpoints=1)
  c.midtrain.train.optimizer.update(learning_rate=3e-3, warmup_steps=5, decay_steps=steps - 5)
  return c




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
