r"""CPU / consumer-GPU fallback server: transformers + an assistant (draft) model behind an
OpenAI-compatible `/v1/chat/completions` endpoint that streams tokens (server-sent events).

  python -m export.serve_local --model bundles/tiny/target --draft bundles/tiny/draft --port 8000
  curl -N localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user",
       "content": "I have a cough."}], "stream": true, "max_tokens": 64}'

An int4 compressed-tensors folder is decompressed on load (CPU has no int4
kernels); generation is greedy unless `temperature` > 0, and uses transformers'
assisted generation (`assistant_model=`) when a draft is given. The standard
library's ThreadingHTTPServer serves; one generation runs at a time.
"""

from __future__ import annotations

import json
import logging
import pathlib
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


def _text(content) -> str:
  """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(
      isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
      for p in content):
    return "".join(p["text"] for p in content)
  raise ValueError(f"message content must be a string or a list of text parts, got "
                   f"{json.dumps(content)[:80]}")


def load_causal_lm(folder, device: str = "cpu"):
  import torch
  from transformers import AutoModelForCausalLM, CompressedTensorsConfig

  config = json.loads((pathlib.Path(folder) / "config.json").read_text())
  kw = {}
  if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
    kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
  dtype = torch.float32 if device == "cpu" else torch.bfloat16
  return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw).to(device).eval()


class ChatEngine:
  """Tokenizer + target (+ draft) and one lock: what the HTTP handler calls."""

  def __init__(self, model_dir, draft_dir=None, device: str = "cpu", name: str = "m2"):
    from transformers import AutoTokenizer

    self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if not self.tokenizer.chat_template:
      raise ValueError(f"{model_dir}: tokenizer_config.json has no chat_template")
    self.model = load_causal_lm(model_dir, device)
    self.draft = load_causal_lm(draft_dir, device) if draft_dir else None
    self.device = device
    self.name = name
    self.lock = threading.Lock()

  def prompt_ids(self, messages):
    import torch
    ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
      ids = ids["input_ids"]
    return torch.as_tensor([list(ids)], device=self.device)

  def generate(self, messages, max_tokens: int = 256, temperature: float = 0.0,
               streamer=None):
    """Returns (completion text, prompt tokens, completion tokens, finish reason)."""
    import torch

    input_ids = self.prompt_ids(messages)
    kw = dict(max_new_tokens=max_tokens, do_sample=temperature > 0,
              pad_token_id=self.tokenizer.pad_token_id)
    if temperature > 0:
      kw["temperature"] = temperature
    if self.draft is not None:
      kw["assistant_model"] = self.draft
    with self.lock, torch.no_grad():
      out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                streamer=streamer, **kw)
    new = out[0, input_ids.shape[1]:].tolist()
    eos = self.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    finish = "stop" if new and new[-1] in eos else "length"
    text = self.tokenizer.decode(new, skip_special_tokens=True)
    return text, input_ids.shape[1], len(new), finish


def _chunk(rid, created, model, delta, finish=None):
  return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def make_handler(engine: ChatEngine):
  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route access logs to logging, not stderr
      log.info("%s " + fmt, self.address_string(), *args)

    def _json(self, code: int, obj) -> None:
      body = json.dumps(obj).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
      self._json(code, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self):
      if self.path.rstrip("/") == "/v1/models":
        self._json(200, {"object": "list", "data": [{"id": engine.name, "object": "model"}]})
      else:
        self._error(404, f"no route {self.path}")

    def do_POST(self):
      if self.path.rstrip("/") != "/v1/chat/completions":
        return self._error(404, f"no route {self.path}")
      try:
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        messages = req["messages"]
        if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
          raise ValueError("messages must be a non-empty list of {role, content}")
        messages = [{**m, "content": _text(m["content"])} for m in messages]
        max_tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 256)
        temperature = float(req.get("temperature", 0.0))
        if max_tokens < 1 or temperature < 0:
          raise ValueError("max_tokens must be >= 1 and temperature >= 0")
      except (ValueError, KeyError, TypeError) as err:
        return self._error(400, f"bad request: {err}")
      rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
      if not req.get("stream"):
        text, n_prompt, n_new, finish = engine.generate(messages, max_tokens, temperature)
        return self._json(200, {
            "id": rid, "object": "chat.completion", "created": created, "model": engine.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                      "total_tokens": n_prompt + n_new}})
      from transformers import TextIteratorStreamer
      streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True,
                                      skip_special_tokens=True)
      result = {}

      def run():
        try:
          result["out"] = engine.generate(messages, max_tokens, temperature, streamer)
        except Exception as err:  # noqa: BLE001 - reported to the client below
          result["error"] = err
          streamer.end()

      worker = threading.Thread(target=run, daemon=True)
      worker.start()
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.send_header("Connection", "close")
      self.end_headers()

      def send(obj):
        self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
                         + b"\n\n")
        self.wfile.flush()

      send(_chunk(rid, created, engine.name, {"role": "assistant", "content": ""}))
      for piece in streamer:
        if piece:
          send(_chunk(rid, created, engine.name, {"content": piece}))
      worker.join()
      if "error" in result:
        send({"error": {"message": str(result["error"]), "type": "server_error"}})
      else:
        send(_chunk(rid, created, engine.name, {}, result["out"][3]))
      send(b"[DONE]")
      self.close_connection = True

  return Handler


def serve(engine: ChatEngine, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
  """A started server (in a daemon thread); `server.server_address` has the port."""
  server = ThreadingHTTPServer((host, port), make_handler(engine))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def main(argv=None):
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="HF folder (dense or int4 compressed-tensors)")
  p.add_argument("--draft", default=None, help="draft HF folder for assisted generation")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--device", default="cpu")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  engine = ChatEngine(a.model, a.draft, a.device)
  server = ThreadingHTTPServer((a.host, a.port), make_handler(engine))
  print(f"serving {a.model} on http://{a.host}:{server.server_address[1]}/v1/chat/completions")
  server.serve_forever()


if __name__ == "__main__":
  main()
