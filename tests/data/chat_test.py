"""Chat template: parity with transformers, assistant masks, rollouts."""

import numpy as np
import pytest

from m2.data import tokenizers as T
from m2.data.chat import CHAT_TEMPLATE, ChatFormat, encode_chat, split_thinking
from m2.data.records import Dialogue, Turn

CONVERSATIONS = [
    [{"role": "user", "content": "I have a headache."}],
    [{"role": "system", "content": "You are a careful doctor."},
     {"role": "user", "content": "I have a headache."},
     {"role": "assistant", "content": "<think>\nAsk about onset.\n</think>\n\nWhen did it start?"}],
    [{"role": "user", "content": "胸痛三天"},
     {"role": "assistant", "content": "<think>\nrule out ACS\n</think>\n\n持续多久了？"},
     {"role": "user", "content": "三天，活动后加重。"},
     {"role": "measurement", "content": "BP 150/95 mmHg; ECG: ST elevation V1-V4"},
     {"role": "assistant", "content": "Please go to the emergency department now.\n"}],
    [{"role": "user", "content": "\nleading newline"},
     {"role": "assistant", "content": "\n\nanswer after newlines"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think></think>y"}],
]


@pytest.fixture(scope="module")
def qwen(qwen_dir):
  from transformers import AutoTokenizer
  return T.HFTokenizer(qwen_dir), AutoTokenizer.from_pretrained(qwen_dir)


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_ids_and_masks_match_transformers(qwen, mode):
  tok, hf = qwen
  for strip in (True, False):
    for system in (None, "Be kind."):
      fmt = ChatFormat(tok, thinking_mode=mode, strip_history_thinking=strip, system=system)
      kw = dict(thinking_mode=mode, strip_history_thinking=strip)
      if system:
        kw["default_system"] = system
      for conv in CONVERSATIONS:
        for gen in (False, True):
          ours = fmt.encode(conv, add_generation_prompt=gen)
          ref = hf.apply_chat_template(conv, chat_template=CHAT_TEMPLATE, add_generation_prompt=gen,
                                       return_assistant_tokens_mask=True, return_dict=True, **kw)
          assert ours.ids.tolist() == ref["input_ids"]
          assert ours.mask.tolist() == ref["assistant_masks"]
          assert fmt.render(conv, gen) == hf.apply_chat_template(
              conv, chat_template=CHAT_TEMPLATE, add_generation_prompt=gen, tokenize=False, **kw)


def test_the_converted_folder_carries_the_template(qwen):
  tok, hf = qwen
  conv = CONVERSATIONS[1]
  assert hf.apply_chat_template(conv, tokenize=False, thinking_mode="off") == \
      ChatFormat(tok, thinking_mode="off").render(conv)


def test_generation_prompts_and_thinking_switch(qwen):
  tok, _ = qwen
  user = [{"role": "user", "content": "Hi"}]
  assert ChatFormat(tok, thinking_mode="off").render(user, True).endswith(
      "<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert ChatFormat(tok, thinking_mode="on").render(user, True).endswith(
      "<|im_start|>assistant\n<think>\n")
  assert ChatFormat(tok, thinking_mode="auto").render(user, True).endswith(
      "<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="thinking_mode"):
    ChatFormat(tok, thinking_mode="maybe")
  assert split_thinking("<think>\nr\n</think>\n\nanswer") == ("r", "answer")
  assert split_thinking("plain") == (None, "plain")


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_mask_is_exactly_the_completion_after_the_prompt(qwen, mode):
  """SFT/RL invariant: prompt ids are a prefix; the masked rest is what the
  model generates, ending with <|im_end|>; the role header is never trained."""
  tok, _ = qwen
  fmt = ChatFormat(tok, thinking_mode=mode)
  conv = CONVERSATIONS[1]
  full, prompt = fmt.encode(conv), fmt.prompt(conv[:-1])
  assert full.ids[:len(prompt)].tolist() == prompt.ids.tolist() and not prompt.mask.any()
  trained = full.ids[full.mask == 1]
  assert trained.tolist() == full.ids[len(prompt):-1].tolist()   # all but the final "\n"
  assert trained[-1] == tok.token_to_id("<|im_end|>")
  want = {"off": "When did it start?", "on": "Ask about onset.\n</think>\n\nWhen did it start?",
          "auto": "<think>\nAsk about onset.\n</think>\n\nWhen did it start?"}[mode]
  assert tok.decode(trained[:-1], skip_special_tokens=False) == want


def test_other_roles_and_history_are_masked_out(qwen):
  tok, _ = qwen
  fmt = ChatFormat(tok, thinking_mode="auto")
  e = fmt.encode(CONVERSATIONS[2])
  text = tok.decode(e.ids[e.mask == 1], skip_special_tokens=False)
  # History reasoning is stripped; the measurement and patient turns are not trained.
  assert text == "持续多久了？<|im_end|>Please go to the emergency department now.\n<|im_end|>"


def test_incremental_rollout_equals_full_encoding(qwen):
  """A multi-turn rollout built from the policy's own ids equals the full chat
  encoded with history reasoning kept, ids and masks alike."""
  tok, _ = qwen
  fmt = ChatFormat(tok, thinking_mode="on", strip_history_thinking=False)
  # (An empty reasoning would merge the prompt's "\n" with the model's: a
  # policy on "on" always writes some reasoning first.)
  conv = CONVERSATIONS[2][:4] + [{"role": "assistant", "content": "<think>\nSTEMI.\n</think>\n\n"
                                  "Please go to the emergency department now."}]
  seq = fmt.prompt(conv[:1])
  completion = lambda msg: tok.encode(fmt._completion(msg["content"]) + "<|im_end|>")  # noqa
  seq = fmt.append_completion(seq, completion(conv[1]))
  seq = fmt.append_messages(seq, conv[2:4])
  # A truncated completion (no <|im_end|>) is closed, the closing token not trained.
  last = tok.encode(fmt._completion(conv[4]["content"]))
  seq = fmt.append_completion(seq, last)
  full = fmt.encode(conv)
  assert seq.ids.tolist() == full.ids.tolist()
  assert seq.mask.tolist()[:-2] == full.mask.tolist()[:-2] and seq.mask[-2] == 0
  assert fmt.stop_ids == (151645, 151643)
  with pytest.raises(ValueError, match="append_completion"):
    fmt.append_messages(seq, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("backend", ["sentencepiece", "byte"])
def test_dialogue_sft_masks_on_small_tokenizers(backend, tmp_path):
  """Any tokenizer works; without special ids (byte) the markers are text."""
  if backend == "byte":
    tok = T.ByteTokenizer()
  else:
    tok = T.train_sentencepiece(["Doctor: how are you?\nPatient: my knee hurts"] * 50,
                                str(tmp_path / "m.model"), vocab_size=300)
  dialogue = Dialogue("d:1", "test", (Turn("patient", "My knee hurts."),
                                      Turn("doctor", "Since when?"), Turn("patient", "Monday."),
                                      Turn("doctor", "Let me examine it.")))
  e = encode_chat(tok, dialogue.to_messages(), thinking_mode="off")
  assert e.ids.dtype == np.int32 and len(e.ids) == len(e.mask)
  # The trained tokens are exactly the doctor's turns with their end markers.
  runs, cur = [], []
  for i, m in zip(e.ids.tolist(), e.mask.tolist()):
    if m:
      cur.append(i)
    elif cur:
      runs, cur = runs + [tok.decode(cur)], []
  assert [r.replace("<|im_end|>", "") for r in runs] == ["Since when?", "Let me examine it."]
  assert tok.decode(e.ids) == ChatFormat(tok, thinking_mode="off").render(dialogue.to_messages())
