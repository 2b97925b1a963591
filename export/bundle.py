r"""One command: an m2 run -> a folder to serve on one 24 GB consumer GPU.

  python -m export.bundle --workdir=runs/tiny --out=bundles/tiny
  python -m export.bundle --budget_only --preset=qwen2_5_32b      # the 32B memory plan

The folder holds
  target/     the int4 (W4A16, GPTQ, group 128) target, compressed-tensors pack-quantized
  draft/      a distilled 1-layer draft (bf16 safetensors) sharing the tokenizer
  tokenizer.json, tokenizer_config.json, tokenization_m2.py   (also in target/, draft/)
  serve.sh    vLLM and SGLang command lines (quantization, speculative decoding,
              max model length, fp8 KV cache) sized by the memory budget
  README.md   the memory budget, computed from the model config
  budget.json the same numbers

The pipeline's `export` stage (export/stage.py) writes the same bundle into
workdir/export/ with `write_bundle_files`, its target folder named int4/.

Memory budget (bytes, from config.json alone):
  weights     every quantized linear: out*in*bits/8 packed + out*in/group bf16
              scales (+ packed zero points when asymmetric) + its shape vector;
              embeddings, LM head, norms and biases dense in bf16.
  draft       the draft's layers; it shares the target's embeddings and LM head
              (EAGLE-style heads reuse them in vLLM / SGLang), so they count once.
  KV cache    layers * 2 * kv_heads * head_dim * bytes(kv dtype) per token, for
              target and draft, times context * batch.
  activations one prefill chunk of `chunk_tokens`: residual, q/k/v/o and the
              gate/up/down intermediates in bf16, plus fp32 logits of the batch.
  overhead    CUDA context, cuBLAS/Marlin workspaces, CUDA graphs and allocator
              slack: a stated constant (default 1.25 GiB, from vLLM's startup
              logs on 24 GB cards; not measured here).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil

log = logging.getLogger(__name__)

GiB = 1 << 30
RTX_4090_BYTES = 24 * GiB
_KV_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "auto": 2}
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ServePlan:
  gpu_bytes: int = RTX_4090_BYTES
  gpu_memory_utilization: float = 0.95   # the share vLLM may use
  overhead_bytes: int = int(1.25 * GiB)
  kv_cache_dtype: str = "fp8"
  batch: int = 1
  context: int = 16384
  chunk_tokens: int = 2048              # prefill chunk (max_num_batched_tokens)
  bits: int = 4
  group_size: int = 128
  symmetric: bool = True
  num_draft_tokens: int = 4


def _heads(hf: dict) -> tuple[int, int, int]:
  """(query heads, kv heads, head_dim), as transformers reads config.json."""
  h = hf["num_attention_heads"]
  head_dim = 128 if hf["model_type"] == "qwen3" else hf["hidden_size"] // h  # the defaults
  return h, hf.get("num_key_value_heads") or h, hf.get("head_dim") or head_dim


def linear_shapes(hf: dict) -> list[tuple[int, int]]:
  """(out, in) of every quantized linear layer of one decoder layer."""
  e, m = hf["hidden_size"], hf["intermediate_size"]
  h, kv, d = _heads(hf)
  return [(h * d, e), (kv * d, e), (kv * d, e), (e, h * d), (m, e), (m, e), (e, m)]


def dense_params(hf: dict, *, include_embeddings: bool = True) -> int:
  """Parameters that stay dense: embeddings, LM head, norms, biases."""
  e, layers, v = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
  h, kv, d = _heads(hf)
  per_layer = 2 * e
  if hf["model_type"] == "qwen2":
    per_layer += (h + 2 * kv) * d          # q/k/v biases
  if hf["model_type"] == "qwen3":
    per_layer += 2 * d                     # q/k norms
  n = layers * per_layer
  if include_embeddings:
    n += v * e * (1 if hf.get("tie_word_embeddings") else 2) + e
  return n


def quantized_linear_bytes(out: int, n_in: int, bits: int, group: int, symmetric: bool) -> int:
  """Bytes of one pack-quantized linear, exactly as export.quantize writes it."""
  groups = math.ceil(n_in / group)
  packed = out * math.ceil(n_in * bits / 32) * 4
  scales = out * groups * 2
  zeros = 0 if symmetric else math.ceil(out * bits / 32) * groups * 4
  return packed + scales + zeros + 2 * 8       # + the int64 weight_shape


def weight_bytes(hf: dict, plan: ServePlan, dense_bytes: int = 2, *,
                 quantized: bool = True, include_embeddings: bool = True) -> int:
  layers = hf["num_hidden_layers"]
  if quantized:
    lin = sum(quantized_linear_bytes(o, i, plan.bits, plan.group_size, plan.symmetric)
              for o, i in linear_shapes(hf))
  else:
    lin = sum(o * i for o, i in linear_shapes(hf)) * dense_bytes
  return layers * lin + dense_params(hf, include_embeddings=include_embeddings) * dense_bytes


def kv_bytes_per_token(hf: dict, kv_dtype: str) -> int:
  _, kv, d = _heads(hf)
  return hf["num_hidden_layers"] * 2 * kv * d * _KV_BYTES[kv_dtype]


def activation_bytes(hf: dict, plan: ServePlan) -> int:
  e, m, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
  h, kv, d = _heads(hf)
  per_token = 2 * e + (h + 2 * kv) * d + h * d + 3 * m      # residual x2, qkv, attn, gate/up/silu
  return plan.chunk_tokens * per_token * 2 + plan.batch * (plan.num_draft_tokens + 1) * v * 4


def memory_budget(hf: dict, plan: ServePlan, draft_hf: dict | None = None) -> dict:
  """The budget lines (bytes) and the largest context that fits at `plan.batch`."""
  weights = weight_bytes(hf, plan)
  draft = 0
  kv_token = kv_bytes_per_token(hf, plan.kv_cache_dtype)
  if draft_hf is not None:
    draft = weight_bytes(draft_hf, plan, quantized=False, include_embeddings=False)
    kv_token += kv_bytes_per_token(draft_hf, plan.kv_cache_dtype)
  usable = int(plan.gpu_bytes * plan.gpu_memory_utilization)
  acts = activation_bytes(hf, plan)
  fixed = weights + draft + acts + plan.overhead_bytes
  kv = kv_token * plan.context * plan.batch
  free_for_kv = usable - fixed
  max_context = max(0, free_for_kv // (kv_token * plan.batch))
  unshared = 0 if draft_hf is None else (
      dense_params(draft_hf) - dense_params(draft_hf, include_embeddings=False)) * 2
  return {"weights": weights, "draft": draft, "kv_cache": kv, "activations": acts,
          "draft_embeddings_if_not_shared": unshared,
          "overhead": plan.overhead_bytes, "total": fixed + kv, "usable": usable,
          "gpu": plan.gpu_bytes, "fits": fixed + kv <= usable,
          "kv_bytes_per_token": kv_token, "context": plan.context, "batch": plan.batch,
          "max_context": int(min(max_context, hf.get("max_position_embeddings", 1 << 30))),
          "max_context_unclipped": int(max_context), "plan": dataclasses.asdict(plan)}


def format_budget(name: str, b: dict) -> str:
  gib = lambda x: f"{x / GiB:8.2f} GiB"   # noqa: E731
  p = b["plan"]
  rows = [
      f"Memory budget: {name}, one {b['gpu'] / GiB:.0f} GiB GPU, "
      f"{p['gpu_memory_utilization']:.0%} usable, batch {b['batch']}, context {b['context']:,}, "
      f"KV cache {p['kv_cache_dtype']}",
      "",
      "| item | bytes |", "|---|---:|",
      f"| int{p['bits']} weights + scales (group {p['group_size']}), dense embeddings/head "
      f"| {gib(b['weights'])} |",
      *([f"| draft layers (bf16, shares embeddings/head) | {gib(b['draft'])} |"]
        if b["draft"] else []),
      f"| KV cache ({b['kv_bytes_per_token']:,} B/token x {b['context']:,} x {b['batch']}) "
      f"| {gib(b['kv_cache'])} |",
      f"| activations (prefill chunk {p['chunk_tokens']} tokens) | {gib(b['activations'])} |",
      f"| CUDA context + runtime overhead (assumed) | {gib(b['overhead'])} |",
      f"| **total** | **{gib(b['total'])}** |",
      f"| usable ({p['gpu_memory_utilization']:.0%} of the GPU) | {gib(b['usable'])} |",
      "",
      f"Fits: {'yes' if b['fits'] else 'NO'}. Largest context at batch {b['batch']}: "
      f"{b['max_context']:,} tokens"
      + (f" (memory alone would allow {b['max_context_unclipped']:,}; the model's "
         f"max_position_embeddings caps it)" if b["max_context_unclipped"] > b["max_context"]
         else "") + ".",
  ]
  if b["draft"]:
    # Without a draft there is no second copy of the embeddings to warn about.
    shared = b["draft_embeddings_if_not_shared"]
    rows += [
        "",
        f"The draft's embeddings and LM head are counted once, with the target's. An engine "
        f"that loads the draft as a separate model keeps a second copy: "
        f"+{shared / GiB:.2f} GiB, which comes out of the KV cache "
        f"(about {shared // max(b['kv_bytes_per_token'] * b['batch'], 1):,}"
        f" tokens of context).",
    ]
  return "\n".join(rows)


def serve_script(plan: ServePlan, max_len: int, *, target: str = "target",
                 draft: str | None = "draft") -> str:
  """serve.sh for the folders `target` and `draft` (None: no speculative decoding)."""
  kv_sglang = {"fp8": "fp8_e5m2", "bf16": "auto", "fp16": "auto", "auto": "auto"}[
      plan.kv_cache_dtype]
  vllm_spec = sglang_spec = local_spec = ""
  if draft is not None:
    spec = (f'{{"method": "draft_model", "model": "\'"$DIR/{draft}"\'", '
            f'"num_speculative_tokens": {plan.num_draft_tokens}}}')
    vllm_spec = f"      --speculative-config '{spec}' \\\n"
    sglang_spec = f"""      --speculative-algorithm STANDALONE \\
      --speculative-draft-model-path "$DIR/{draft}" \\
      --speculative-num-steps {plan.num_draft_tokens} \\
      --speculative-eagle-topk 1 \\
      --speculative-num-draft-tokens {plan.num_draft_tokens + 1} \\
"""
    local_spec = f' --draft "$DIR/{draft}"'
  what = f"int{plan.bits} target + draft model" if draft is not None else f"int{plan.bits} target"
  return f"""#!/usr/bin/env bash
# Serve this bundle on one 24 GB GPU (RTX 4090, sm_89): {what}.
# max model length {max_len} comes from README.md's memory budget (batch {plan.batch}).
# Usage: ./serve.sh vllm | ./serve.sh sglang     (port 8000)
# The tokenizer is {target}/'s own: its tokenizer_config.json's auto_map makes AutoTokenizer
# read tokenizer.json as written (see export/to_hf.py write_tokenizer).
set -euo pipefail
DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
ENGINE="${{1:-vllm}}"
case "$ENGINE" in
  vllm)
    exec vllm serve "$DIR/{target}" \\
      --quantization compressed-tensors \\
      --dtype bfloat16 \\
      --max-model-len {max_len} \\
      --kv-cache-dtype {plan.kv_cache_dtype} \\
      --gpu-memory-utilization {plan.gpu_memory_utilization} \\
      --max-num-seqs {plan.batch} \\
      --max-num-batched-tokens {plan.chunk_tokens} \\
{vllm_spec}      --port 8000
    ;;
  sglang)
    exec python -m sglang.launch_server --model-path "$DIR/{target}" \\
      --quantization compressed-tensors \\
      --dtype bfloat16 \\
      --context-length {max_len} \\
      --kv-cache-dtype {kv_sglang} \\
      --mem-fraction-static {plan.gpu_memory_utilization - 0.05:.2f} \\
      --max-running-requests {plan.batch} \\
      --chunked-prefill-size {plan.chunk_tokens} \\
{sglang_spec}      --port 8000
    ;;
  local)
    exec python -m export.serve_local --model "$DIR/{target}"{local_spec} --port 8000
    ;;
  *) echo "usage: $0 vllm|sglang|local" >&2; exit 2 ;;
esac
"""


def file_weight_bytes(folder) -> dict:
  """Sizes of a folder's safetensors files: on disk and tensor data only (no header)."""
  import struct
  on_disk = data = 0
  for f in sorted(pathlib.Path(folder).glob("*.safetensors")):
    size = f.stat().st_size
    with open(f, "rb") as fh:
      header = struct.unpack("<Q", fh.read(8))[0]
    on_disk += size
    data += size - 8 - header
  return {"file_bytes": on_disk, "tensor_bytes": data}


def qwen_32b_config() -> dict:
  from m2.model.config import preset
  return preset("qwen2_5_32b", max_position_embeddings=131072).to_hf_config()


def bundle(workdir: str, out: str, *, stage: str | None = None, overwrite: bool = False,
           plan: ServePlan = ServePlan(), quant=None, draft_cfg=None,
           calib_texts=None, draft_eval_prompts: int = 8, quality_windows: int = 16,
           quality_eval_limit: int = 0) -> pathlib.Path:
  """Exports, quantizes and distils a draft into `out`; writes serve.sh and README.md
  (with the int4 quality table of export.quantize.quality_report unless
  `quality_windows` is 0; `quality_eval_limit` > 0 adds HealthBench scores)."""
  from export import draft as draft_lib
  from export import quantize, to_hf

  quant = quant or quantize.QuantConfig(method="gptq", bits=plan.bits,
                                        group_size=plan.group_size, symmetric=plan.symmetric)
  draft_cfg = draft_cfg or draft_lib.DraftConfig()
  with to_hf.atomic_dir(out, overwrite) as tmp:
    dense = tmp / ".dense"
    to_hf.export(workdir, str(dense), stage=stage)
    quantize.quantize_folder(dense, tmp / "target", quant, calib_texts=calib_texts)
    quality = ""
    if quality_windows:
      configs = {"rtn": dataclasses.replace(quant, method="rtn")}
      if quant.method == "gptq":
        configs["gptq"] = quant
      rows = quantize.quality_report(dense, configs, held_windows=quality_windows,
                                     seq_len=quant.calib_seq_len, calib_texts=calib_texts,
                                     eval_limit=quality_eval_limit)
      quality = quantize.format_report(rows)
      (tmp / "quality.json").write_text(json.dumps({"rows": rows}, indent=1))
    report = draft_lib.build_draft(workdir, str(tmp / "draft"), draft_cfg, stage=stage,
                                   train_dir=str(tmp / ".draft_train"),
                                   eval_prompts=draft_eval_prompts, k=plan.num_draft_tokens)
    shutil.rmtree(dense)
    shutil.rmtree(tmp / ".draft_train", ignore_errors=True)
    write_bundle_files(tmp, plan, draft_report=report, quality=quality, method=quant.method)
  return pathlib.Path(out)


def write_bundle_files(root, plan: ServePlan, *, target: str = "target",
                       draft: str | None = "draft", draft_report: dict | None = None,
                       quality: str = "", method: str = "gptq",
                       notes: tuple[str, ...] = ()) -> dict:
  """The serving files of a bundle around folders already in `root`: the int4 target
  `root/target` and the draft `root/draft` (None: a bundle without speculative
  decoding). Copies the tokenizer files to `root` and writes serve.sh, budget.json and
  README.md (`quality`: export.quantize.format_report's table; `notes`: extra README
  lines about the folder). Returns budget.json's content."""
  from export import to_hf

  root = pathlib.Path(root)
  for f in (*to_hf.TOKENIZER_FILES, to_hf.TOKENIZER_CODE):
    shutil.copy(root / target / f, root / f)
  hf = json.loads((root / target / "config.json").read_text())
  draft_hf = None if draft is None else json.loads((root / draft / "config.json").read_text())
  budget = memory_budget(hf, plan, draft_hf)
  big_hf = qwen_32b_config()
  # The 32B plan mirrors this bundle: a 1-layer draft when it ships one.
  big = memory_budget(big_hf, plan, None if draft is None else {**big_hf,
                                                               "num_hidden_layers": 1})
  files = file_weight_bytes(root / target)
  check = {**files, "budget_weights": budget["weights"],
           "relative_error": abs(files["tensor_bytes"] - budget["weights"])
           / files["tensor_bytes"]}
  max_len = max(1, min(budget["max_context"], hf.get("max_position_embeddings", 32768)))
  script = root / "serve.sh"
  script.write_text(serve_script(plan, max_len, target=target, draft=draft))
  script.chmod(0o755)
  content = {"this_model": budget, "qwen2_5_32b": big, "file_check": check,
             "max_model_len": max_len, "target": target, "draft": draft}
  if draft is not None:
    content["draft_report"] = draft_report or {}
  (root / "budget.json").write_text(json.dumps(content, indent=2))
  draft_layers = None if draft_hf is None else draft_hf["num_hidden_layers"]
  (root / "README.md").write_text(_readme(budget, big, check, draft_report or {}, plan,
                                          draft_layers, quality, target=target, draft=draft,
                                          method=method, notes=notes))
  return content


def _readme(budget, big, check, report, plan, draft_layers: int | None, quality: str = "", *,
            target: str = "target", draft: str | None = "draft", method: str = "gptq",
            notes: tuple[str, ...] = ()) -> str:
  if quality:
    quality = f"""
## int4 quality (held-out MTS-Dialog test1; KL and agreement against the dense model)

```
{quality}
```
"""
  if draft is None:
    draft_line = "- no draft model: serve.sh runs the target alone (no speculative decoding)."
    big_name = f"Qwen2.5-32B, int{plan.bits} {method.upper()}"
  else:
    spec = report.get("m2_speculative", {})
    draft_line = f"""- `{draft}/`: distilled {draft_layers}-layer draft sharing the tokenizer;
  m2 speculative sampler at k={spec.get('k')}: {spec.get('tokens_per_round', float('nan')):.2f}
  tokens per round, {spec.get('speedup', float('nan')):.2f}x wall speed-up (CPU, batch 1)."""
    big_name = f"Qwen2.5-32B, int{plan.bits} {method.upper()} + 1-layer draft"
  extra = "".join(f"\n- {n}" for n in notes)
  assisted = "" if draft is None else " + assisted generation"
  return f"""# m2 consumer-GPU bundle

`./serve.sh vllm`, `./serve.sh sglang` (one 24 GB GPU) or `./serve.sh local` (CPU fallback,
transformers{assisted}, OpenAI-compatible `/v1/chat/completions`).

- `{target}/`: int{plan.bits} W{plan.bits}A16 {method.upper()}, group {plan.group_size},
  compressed-tensors `pack-quantized` (vLLM loads it with Marlin kernels on sm_80+,
  e.g. RTX 4090 sm_89).
{draft_line}{extra}
{quality}
## This model

{format_budget('this model', budget)}

Weight bytes of the budget vs the files written: {check['budget_weights']:,} vs
{check['tensor_bytes']:,} tensor bytes ({check['file_bytes']:,} on disk with headers):
{check['relative_error']:.3%} apart.

## Qwen2.5-32B (the Baichuan-M2 base) on one 24 GB GPU

{format_budget(big_name, big)}

The engines' own numbers differ by their allocator and CUDA-graph settings; the
overhead line is an assumption, not a measurement. None of the serve.sh lines was
run here (no GPU in the build environment).
"""


def main(argv=None):
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir")
  p.add_argument("--out")
  p.add_argument("--stage", default=None)
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--context", type=int, default=ServePlan.context)
  p.add_argument("--batch", type=int, default=ServePlan.batch)
  p.add_argument("--kv_cache_dtype", default=ServePlan.kv_cache_dtype, choices=sorted(_KV_BYTES))
  p.add_argument("--draft_steps", type=int, default=200)
  p.add_argument("--quality_windows", type=int, default=16,
                 help="held-out windows for the README's int4 quality table (0: none)")
  p.add_argument("--quality_eval_limit", type=int, default=0,
                 help="HealthBench examples to score dense / RTN / GPTQ on (0: none)")
  p.add_argument("--budget_only", action="store_true",
                 help="print the memory budget of --preset (default Qwen2.5-32B) and exit")
  p.add_argument("--preset", default="qwen2_5_32b")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  plan = ServePlan(context=a.context, batch=a.batch, kv_cache_dtype=a.kv_cache_dtype)
  if a.budget_only:
    from m2.model.config import preset
    hf = preset(a.preset, max_position_embeddings=131072).to_hf_config()
    b = memory_budget(hf, plan, {**hf, "num_hidden_layers": 1})
    print(format_budget(a.preset, b))
    print(json.dumps({"bench": "memory_budget", "preset": a.preset,
                      **{k: v for k, v in b.items() if k != "plan"}}))
    return
  if not (a.workdir and a.out):
    p.error("--workdir and --out are required (or --budget_only)")
  from export.draft import DraftConfig
  folder = bundle(a.workdir, a.out, stage=a.stage, overwrite=a.overwrite, plan=plan,
                  draft_cfg=DraftConfig(steps=a.draft_steps), quality_windows=a.quality_windows,
                  quality_eval_limit=a.quality_eval_limit)
  print(folder)


if __name__ == "__main__":
  main()
