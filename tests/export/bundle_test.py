"""export.bundle / draft / serve_local: one command -> int4 target + draft + serve.sh + budget."""

import json
import os
import urllib.request

import pytest

from export import bundle as B
from export import to_hf


@pytest.fixture(scope="module")
def bundled(trained_run, tmp_path_factory):
  from export.draft import DraftConfig
  from export.quantize import QuantConfig, medical_texts
  out = tmp_path_factory.mktemp("bundle") / "tiny"
  B.bundle(trained_run, str(out),
           quant=QuantConfig(method="gptq", calib_samples=16, calib_seq_len=128),
           draft_cfg=DraftConfig(layers=1, prompts=32, prompt_len=32, new_tokens=48, steps=40,
                                 batch_size=16),
           calib_texts=medical_texts("train", limit=300), draft_eval_prompts=2,
           quality_windows=4)
  return out


def test_bundle_folder(bundled):
  names = set(os.listdir(bundled))
  assert {"target", "draft", "tokenizer.json", "tokenizer_config.json", to_hf.TOKENIZER_CODE,
          "serve.sh", "README.md", "budget.json"} <= names
  assert not [n for n in names if n.startswith(".")]
  # vLLM and SGLang read target/'s tokenizer with AutoTokenizer: m2's ids, even for text
  # that Qwen2Tokenizer's NFC would change (a decomposed accent).
  from transformers import AutoTokenizer

  from m2.data.tokenizers import ByteTokenizer
  text = "Patient: I've had a fever since Tuesday, cafe\u0301."
  for folder in (bundled / "target", bundled / "draft", bundled):
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                        trust_remote_code=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)
  target = json.loads((bundled / "target" / "config.json").read_text())
  assert target["quantization_config"]["format"] == "pack-quantized"
  draft = json.loads((bundled / "draft" / "config.json").read_text())
  assert draft["num_hidden_layers"] == 1 and draft["vocab_size"] == target["vocab_size"]
  script = (bundled / "serve.sh").read_text()
  assert os.access(bundled / "serve.sh", os.X_OK)
  assert "--tokenizer" not in script   # the target folder's own tokenizer serves
  for needle in ("vllm serve", "--quantization compressed-tensors", "--kv-cache-dtype fp8",
                 "--speculative-config", "sglang.launch_server", "--speculative-draft-model-path",
                 "--max-model-len", "--context-length"):
    assert needle in script, needle
  budget = json.loads((bundled / "budget.json").read_text())
  # The budget's weight bytes are the bytes the quantizer wrote.
  check = budget["file_check"]
  assert check["relative_error"] < 0.02, check
  assert check["file_bytes"] > check["tensor_bytes"]
  readme = (bundled / "README.md").read_text()
  assert "Qwen2.5-32B" in readme and "Largest context" in readme
  # The int4 quality table: the dense reference, RTN and the GPTQ target.
  rows = json.loads((bundled / "quality.json").read_text())["rows"]
  assert [r["method"] for r in rows] == ["fp32", "bf16", "rtn", "gptq"]
  assert "int4 quality" in readme and all(r["method"] in readme for r in rows)


def test_draft_is_exact_and_accepted(bundled):
  report = json.loads((bundled / "budget.json").read_text())["draft_report"]
  spec = report["m2_speculative"]
  assert spec["identical_to_plain_greedy"]       # speculative decoding changes no token
  assert spec["k"] == 4 and 1.0 <= spec["tokens_per_round"] <= 5.0
  # Distillation fit the target's samples: far below the byte vocabulary's ln(259).
  assert report["final"]["loss"] < 2.0


def test_qwen2_5_32b_fits_one_24gb_gpu():
  hf = B.qwen_32b_config()
  plan = B.ServePlan(context=16384, batch=1, kv_cache_dtype="fp8")
  b = B.memory_budget(hf, plan, {**hf, "num_hidden_layers": 1})
  # Baichuan-M2-32B-GPTQ-Int4 is about 19.5 GB on disk.
  assert 18.5e9 < b["weights"] < 20.0e9
  assert b["fits"] and b["total"] <= b["usable"] <= 24 * B.GiB
  assert 16384 <= b["max_context"] < 65536
  at_max = B.memory_budget(hf, B.ServePlan(context=b["max_context"]), {**hf,
                                                                       "num_hidden_layers": 1})
  over = B.memory_budget(hf, B.ServePlan(context=b["max_context"] + 256),
                         {**hf, "num_hidden_layers": 1})
  assert at_max["fits"] and not over["fits"]
  # bf16 KV halves the context that fits.
  bf16 = B.memory_budget(hf, B.ServePlan(kv_cache_dtype="bf16"), {**hf, "num_hidden_layers": 1})
  assert abs(bf16["max_context"] * 2 - b["max_context"]) <= 2
  assert "Fits: yes" in B.format_budget("32B", b)


def test_serve_local_streams_an_openai_chat_reply(bundled):
  import torch

  from export import serve_local
  engine = serve_local.ChatEngine(bundled / "target", bundled / "draft")
  server = serve_local.serve(engine, "127.0.0.1", 0)
  url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
  messages = [{"role": "user", "content": "Doctor: Any fever or chills?"}]
  try:
    def post(body):
      req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
      return urllib.request.urlopen(req, timeout=120)

    with post({"messages": messages, "max_tokens": 16, "stream": True}) as r:
      assert r.headers["Content-Type"] == "text/event-stream"
      events = [e[len("data: "):] for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) > 3 and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    with post({"messages": messages, "max_tokens": 16}) as r:
      reply = json.loads(r.read())
    assert reply["choices"][0]["message"]["content"] == streamed
    assert reply["usage"]["completion_tokens"] == 16 or reply["choices"][0][
        "finish_reason"] == "stop"
    # The same greedy text the target makes without the server or the draft.
    ids = engine.prompt_ids(messages)
    with torch.no_grad():
      plain = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                    do_sample=False)
    assert streamed == engine.tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    # OpenAI clients may send content as a list of text parts.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Doctor: Any fever"},
                                          {"type": "text", "text": " or chills?"}]}]
    with post({"messages": parts, "max_tokens": 16}) as r:
      assert json.loads(r.read())["choices"][0]["message"]["content"] == streamed
    for bad, field in (("hi", "messages"), ([{"role": "user", "content": None}], "content"),
                       ([{"role": "user", "content": [{"type": "image_url"}]}], "content")):
      try:
        post({"messages": bad})
        raise AssertionError(f"a malformed request was accepted: {bad}")
      except urllib.error.HTTPError as err:
        assert err.code == 400 and field in json.loads(err.read())["error"]["message"]
  finally:
    server.shutdown()


def test_the_draft_drives_transformers_assisted_generation(bundled, exported):
  """export.draft --target_hf: transformers' generate(assistant_model=draft) on CPU, timed
  against plain greedy generate; the draft only proposes, so the tokens are the target's."""
  from export.draft import assisted_generation_stats
  stats = assisted_generation_stats(exported, bundled / "draft", [[80, 97, 116], [68, 114]], 12)
  assert stats["identical_to_plain_greedy"] and stats["prompts"] == 2
  assert stats["speedup"] == pytest.approx(stats["plain_s"] / stats["assisted_s"])
