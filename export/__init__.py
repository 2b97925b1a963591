"""Deployables from m2 runs: HF safetensors, int4 weights, a draft model, a 24 GB bundle.

`export/` reads checkpoints and writes files; the m2 library never imports it.
  to_hf.py       orbax run -> transformers folder (config, safetensors, tokenizer)
  quantize.py    W4A16 int4 (RTN / GPTQ) -> compressed-tensors pack-quantized folder
  draft.py       a 1-2 layer draft distilled on the target's own samples
  bundle.py      int4 target + draft + serve.sh + memory budget README
  serve_local.py OpenAI-compatible streaming endpoint with transformers
"""
