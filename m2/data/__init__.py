"""Record schemas and loaders for every source, de-identification gate,
tokenizers and chat template, and the LM pipeline.

- `records`: PatientCase, Dialogue, QAItem, HealthBenchExample (frozen, validated).
- `loaders`: one loader per source in ../shared/data; `load_source(name)`.
- `deid`: the de-identification gate every record passes before training or
  simulator use; `gate(records)`.
- `tokenizers`: byte, SentencePiece (trained here) and HF tokenizer.json
  (including Qwen2.5's, converted offline); `load_tokenizer(spec)`.
- `chat`: Qwen ChatML with Baichuan-M2's thinking switch, ids plus assistant masks.
- `text`: plain-text corpora and the packed LM pipeline.
"""
