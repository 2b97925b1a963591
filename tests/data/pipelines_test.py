"""TFDS builders and grain pipelines: de-identified, split, deterministic, resumable,
masks only on assistant tokens, and the configured mix realised."""

import dataclasses
import json
import re
import sys

import numpy as np
import pytest

from m2.data import loaders, mixture, pipelines, tfds_builders
from m2.data.chat import ChatFormat
from m2.data.records import Message
from m2.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
PHI_NOTE = ("Patient John Smith (MRN 48213907) called from (617) 555-0143 on 03/14/2019; "
            "email jsmith@example.com. 45-year-old with BP 150/95 mmHg, started aspirin 325 mg "
            "for 3 days.")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  notes = tmp_path_factory.mktemp("notes")
  (notes / "a.txt").write_text(PHI_NOTE)
  (notes / "b.jsonl").write_text(json.dumps({"text": "General text about the weather."}) + "\n")
  return pipelines.DataConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), math_items=400,
                              heldout_fraction=0.05, exclude_splits=("mts_dialog:test1",)), notes


@pytest.fixture(scope="module")
def docs(cfg):
  cfg, notes = cfg
  return pipelines.prepare_data("documents", ("mts_dialog", "math", f"notes={notes}/*"), cfg)


def _ids(rows):
  return [r["id"].decode() for r in rows]


def test_documents_are_prepared_once_with_disjoint_heldout_and_no_test_split(cfg, docs,
                                                                             monkeypatch):
  assert "tensorflow" not in sys.modules          # TFDS array_record, without TensorFlow
  assert {s for s in docs.builder.info.splits} >= {"mts_dialog", "mts_dialog_heldout", "math"}
  mts = docs.report["sources"]["mts_dialog"]
  assert mts["loaded"] == 1701 and mts["excluded"] == 200   # MTS test set 1
  assert mts["train"] + mts["heldout"] == 1501 and 40 <= mts["heldout"] <= 110
  train, held = _ids(docs.source("mts_dialog")), _ids(docs.source("mts_dialog", heldout=True))
  assert len(train) == mts["train"] and not set(train) & set(held)
  assert not any(i.startswith("mts:test1:") for i in train + held)
  assert all(tfds_builders.is_heldout(i, 0.05) for i in held)
  assert not any(tfds_builders.is_heldout(i, 0.05) for i in train)
  # A second prepare reads the cache instead of the sources.
  monkeypatch.setattr(tfds_builders, "collect", lambda *a, **k: pytest.fail("re-collected"))
  again = pipelines.prepare_data("documents", ("mts_dialog", "math", f"notes={cfg[1]}/*"), cfg[0])
  assert again.directory == docs.directory and _ids(again.source("math")) == _ids(
      docs.source("math"))


def test_phi_is_gone_before_training_and_clinical_numbers_stay(docs):
  rows = list(docs.source("notes")) + list(docs.source("notes", heldout=True))
  text = next(r["text"].decode() for r in rows if b"aspirin" in r["text"])
  for phi in ("John", "Smith", "48213907", "555-0143", "03/14/2019", "jsmith@example.com"):
    assert phi not in text
  for kept in ("45-year-old", "150/95 mmHg", "325 mg", "3 days"):
    assert kept in text
  phi = docs.report["sources"]["notes"]["phi_replaced"]
  assert phi["NAME"] >= 2 and phi["PHONE"] == phi["DATE"] == phi["EMAIL"] == 1


@pytest.mark.parametrize("split,error", [("mts_dialog:test_1", r"mts_dialog has no such split"),
                                         ("mts_dialg:test1", "unknown source")])
def test_a_misspelled_test_split_to_exclude_is_refused(cfg, split, error):
  # Else the test set it meant would go into training.
  with pytest.raises(ValueError, match=error):
    pipelines.prepare_data("documents", ("mts_dialog",),
                           dataclasses.replace(cfg[0], exclude_splits=(split,)))


def test_general_text_counts_undecodable_lines_and_skips_folders(cfg, tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "c.txt").write_text("A nested note about sleep.")
  (tmp_path / "d.jsonl").write_bytes(json.dumps({"text": "A good line."}).encode() + b"\n"
                                     + b'{"text": "latin-1 \xe9"}\n')
  (tmp_path / "e.txt").write_bytes(b"caf\xe9")
  got = pipelines.prepare_data("documents", (f"gen={tmp_path}/**",), cfg[0])
  assert got.report["sources"]["gen"]["loaded"] == 2
  assert got.report["sources"]["gen"]["skipped"] == 2


@pytest.mark.parametrize("kind", tfds_builders.KINDS)
def test_healthbench_never_enters_training(cfg, kind):
  with pytest.raises(loaders.EvalOnlyError):
    pipelines.prepare_data(kind, ("healthbench",), cfg[0])


def _lm(docs, seed=0, **kw):
  mix = mixture.Mixture({"medical": 1, "math": 1}, {"medical": ("mts_dialog",), "math": ("math",)})
  kw.setdefault("mixture", mix.resolve(docs.sources))
  return pipelines.lm_dataset(docs.sources_dict(), TOK, batch_size=4, seq_len=64, seed=seed, **kw)


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_lm_batches_are_deterministic_and_resume_exactly(docs):
  first = [b for _, b in zip(range(5), _lm(docs))]
  assert all(_same(a, b) for a, b in zip(first, _lm(docs)))
  assert not _same(first[0], next(iter(_lm(docs, seed=1))))
  it = iter(_lm(docs))
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))   # what a checkpoint stores
  expected = [next(it) for _ in range(4)]
  resumed = iter(_lm(docs))
  resumed.set_state(state)
  assert all(_same(a, next(resumed)) for a in expected)


def test_lm_rows_pack_documents_with_segments_and_positions(docs):
  batches = [b for _, b in zip(range(10), _lm(docs))]
  assert {k: v.shape for k, v in batches[0].items()} == {
      k: (4, 64) for k in ("inputs", "targets", "positions", "segments", "loss_mask")}
  b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  seg, pos = b["segments"], b["positions"]
  starts = np.diff(seg, axis=1) != 0
  assert starts.any()                                   # several documents share a row
  np.testing.assert_array_equal(pos[:, 1:][starts], 0)  # positions restart at a new document
  np.testing.assert_array_equal(pos[:, 1:][~starts], pos[:, :-1][~starts] + 1)
  # The last target of a document (its input's next token starts another) is not trained.
  np.testing.assert_array_equal(b["loss_mask"][:, :-1][starts], 0)
  assert (b["inputs"][:, 1:][starts & (pos[:, 1:] == 0)] == TOK.bos_id).mean() > 0.5


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_mix_ratios_are_realised_in_tokens(docs, ratio):
  # MTS documents are ~8x longer than math ones: document weights must compensate.
  mix = mixture.Mixture({"medical": ratio, "general": 2, "math": 1},
                        {"medical": ("mts_dialog",), "general": (), "math": ("math",)})
  resolved = mix.resolve(docs.sources)
  assert resolved.dropped == {"general": "no sources listed"}
  # ~800k tokens: the first documents of a shuffle are not an average sample of lengths.
  data = pipelines.lm_dataset(docs.sources_dict(), TOK, batch_size=16, seq_len=256,
                              mixture=resolved, keep_sources=True)
  batches = [b for _, b in zip(range(200), data)]
  report = mixture.mix_report(mixture.count_tokens(batches, list(docs.sources)), resolved)
  target = ratio / (ratio + 1)
  assert report["domains"]["medical"]["target"] == pytest.approx(target)
  assert report["domains"]["medical"]["realised"] == pytest.approx(target, abs=0.03)
  assert report["tokens"] == sum(int(b["loss_mask"].sum()) for b in batches)


# ----------------------------------------------------------------------- SFT


def _chat(n_turns, user_len=5, reply_len=7):
  msgs = []
  for i in range(n_turns):
    msgs += [Message("user", "u" * user_len), Message("assistant", "A" * (reply_len + i % 3))]
  return msgs


CHATS = [_chat(1), _chat(2), [Message("assistant", "AAAA"), Message("user", "uu")], _chat(12),
         _chat(3, 20, 30)]


def test_chat_windows_split_long_chats_and_train_every_reply_once():
  fmt = ChatFormat(TOK, thinking_mode="off")
  stats = pipelines.WindowStats()
  windows = pipelines.chat_windows(fmt, _chat(12), 120, stats)
  assert len(windows) > 1 and all(len(w) <= 120 for w in windows)
  assert stats.truncated == 0 and stats.windows == len(windows)
  trained = "".join(TOK.decode(w.ids[w.mask > 0]) for w in windows)
  replies = [m.content for m in _chat(12) if m.role == "assistant"]
  assert trained == "".join(r + "<|im_end|>" for r in replies)
  # One exchange longer than the window keeps the start of the reply.
  long = [Message("user", "u" * 300), Message("assistant", "A" * 50)]
  (w,) = pipelines.chat_windows(fmt, long, 120, stats)
  assert len(w) == 120 and stats.truncated == 1
  assert TOK.decode(w.ids[w.mask > 0]) == "A" * 50 + "<|im_end|>"


@pytest.mark.parametrize("pack", [True, False])
def test_sft_loss_mask_is_exactly_the_assistant_tokens(pack):
  fmt = ChatFormat(TOK, thinking_mode="off")
  ds = pipelines.sft_dataset(CHATS, fmt, batch_size=4, seq_len=96, pack=pack)
  for b in [b for _, b in zip(range(6), ds)]:
    targets, mask, seg = b["targets"], b["loss_mask"], b["segments"]
    for r in range(len(targets)):
      # Every maximal run of trained targets is one whole reply: "A...A<|im_end|>".
      edges = np.flatnonzero(np.diff(np.r_[0, mask[r], 0]))
      for start, end in zip(edges[::2], edges[1::2]):
        assert re.fullmatch(r"A+<\|im_end\|>", TOK.decode(targets[r, start:end]))
      a = ord("A") + 3
      assert (mask[r][targets[r] == a] == 1).all() and not mask[r][targets[r] == ord("u") + 3].any()
      assert not mask[r][seg[r] == 0].any()
    if not pack:
      assert (np.diff((seg > 0).astype(int), axis=1) <= 0).all()   # one window, then padding


def test_sft_batches_are_deterministic_and_resume_exactly():
  fmt = ChatFormat(TOK, thinking_mode="on")
  make = lambda seed=0: pipelines.sft_dataset(CHATS * 3, fmt, batch_size=2, seq_len=64,  # noqa
                                              seed=seed)
  it = iter(make())
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(5)]
  again = iter(make())
  for _ in range(5):
    next(again)
  assert all(_same(a, next(again)) for a in expected)
  resumed = iter(make())
  resumed.set_state(state)
  assert all(_same(a, next(resumed)) for a in expected)
  assert not all(_same(a, b) for a, b in zip(expected, [b for _, b in zip(range(10), make(1))][5:]))


def test_sft_from_prepared_dialogues(cfg):
  chats = pipelines.prepare_data("chats", ("mts_dialog",), cfg[0])
  assert chats.report["sources"]["mts_dialog"]["no_assistant_turn"] == 1   # counted, not lost
  row = json.loads(chats.source("mts_dialog")[0]["messages"])
  assert {m["role"] for m in row} <= {"user", "assistant"}
  fmt = ChatFormat(TOK, thinking_mode="off")
  stats = pipelines.window_stats(chats.sources_dict(heldout=True), fmt, 255)
  assert stats.chats == chats.report["sources"]["mts_dialog"]["heldout"] and stats.windows
  b = next(iter(pipelines.sft_dataset(chats.sources_dict(), fmt, batch_size=4, seq_len=255)))
  assert 0 < b["loss_mask"].sum() < (b["segments"] > 0).sum()


# ------------------------------------------------------------------------ RL


def test_rl_prompts_carry_ids_text_gold_answer_and_source(cfg, caplog):
  prompts = pipelines.prepare_data("prompts", ("pubmedqa", "math"), cfg[0])
  fmt = ChatFormat(TOK)
  make = lambda: pipelines.rl_prompts(prompts.sources_dict(), fmt, batch_size=8,  # noqa: E731
                                      max_prompt_len=1500, seed=3)
  it = iter(make())
  batch = next(it)
  assert set(batch) == {"id", "source", "prompt", "answer", "answer_text", "prompt_ids", "item"}
  assert all(len(v) == 8 for v in batch.values())
  for i in range(8):
    item = batch["item"][i]
    assert batch["answer"][i] == item.answer and batch["source"][i] == item.source
    assert batch["prompt"][i] == item.prompt()
    assert batch["prompt_ids"][i] == fmt.prompt([Message("user", item.prompt())]).ids.tolist()
    assert TOK.decode(batch["prompt_ids"][i]).endswith("<|im_start|>assistant\n")
  assert {"pubmedqa", "math"} >= set(batch["source"])
  state = json.loads(json.dumps(it.get_state()))
  nxt = next(it)
  resumed = iter(make())
  resumed.set_state(state)
  assert next(resumed)["id"] == nxt["id"]
  assert "longer than 1500 tokens and left out" in caplog.text   # long abstracts, counted


def test_qa_chats_train_exactly_the_gold_answer_the_rule_reward_reads(cfg):
  from m2.rl import rewards
  prompts = pipelines.prepare_data("prompts", ("pubmedqa", "math"), cfg[0])
  chats = pipelines.qa_chats(prompts.sources_dict())
  assert set(chats) == {"pubmedqa", "math"}
  for name, pool in chats.items():
    for i in range(3):
      item = pipelines._qa_item(prompts.source(name)[i])
      user, reply = pool[i]
      assert (user.role, user.content) == ("user", item.prompt())
      assert reply.role == "assistant" and rewards.is_correct(item, reply.content)
  fmt = ChatFormat(TOK)
  batch = next(iter(pipelines.sft_dataset(chats, fmt, batch_size=4, seq_len=1024, pack=False)))
  for targets, mask in zip(batch["targets"], batch["loss_mask"]):
    assert re.fullmatch(r"Answer: \S+<\|im_end\|>", TOK.decode(targets[mask == 1]))
