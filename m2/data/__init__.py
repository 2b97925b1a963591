"""Record schemas and loaders for every source, de-identification gate,
tokenizers and chat template, TFDS builders and grain pipelines.

- `records`: PatientCase, Dialogue, QAItem, HealthBenchExample (frozen, validated).
- `loaders`: one loader per source in ../shared/data; `load_source(name)`.
- `deid`: the de-identification gate every record passes before training or
  simulator use; `gate(records)`.
- `tokenizers`: byte, SentencePiece (trained here) and HF tokenizer.json
  (including Qwen2.5's, converted offline); `load_tokenizer(spec)`.
- `chat`: Qwen ChatML with Baichuan-M2's thinking switch, ids plus assistant masks.
- `math`: arithmetic and word problems with exact answers, from a seed.
- `tfds_builders`: the de-identified, split records as TFDS array_record data
  (documents, chats, prompts), prepared once into the cache.
- `mixture`: domain mixes as token ratios over named sources; realised mix.
- `pipelines`: grain pipelines: packed LM, SFT with assistant-only masks, RL prompts.
"""
