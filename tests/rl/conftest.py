"""Shared fixtures: a small chat-capable SentencePiece tokenizer and a tiny policy."""

import dataclasses

import pytest


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
  from m2.data import tokenizers as T
  docs = T.training_corpus(sources=("mts_dialog",))[::8]
  return T.train_sentencepiece(docs, str(tmp_path_factory.mktemp("rl_sp") / "rl.model"),
                               vocab_size=384)


@pytest.fixture(scope="session")
def tiny_policy_cfg(sp_tokenizer):
  from m2.model.config import preset
  return dataclasses.replace(preset("tiny"), vocab_size=sp_tokenizer.vocab_size, num_layers=1,
                             embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
