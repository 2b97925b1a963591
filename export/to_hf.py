r"""An m2 run's orbax checkpoint -> a transformers folder (Qwen2/Qwen3ForCausalLM).

  python -m export.to_hf --workdir=runs/tiny --out=exports/tiny
  python -m export.to_hf --workdir=runs/tiny --stage=sft --dtype=bfloat16 --out=... --overwrite

Writes config.json, model.safetensors (or shards + model.safetensors.index.json
above --max_shard_bytes), generation_config.json and tokenizer files
(tokenizer.json, tokenizer_config.json with the chat template, and
tokenization_m2.py) that `AutoTokenizer.from_pretrained` loads offline with
exactly tokenizer.json's ids (see `write_tokenizer`), as vLLM and SGLang do.

The checkpoint's own meta says the architecture and the tokenizer; the weights
go through `m2/model/hf.py` (the one name map), one output shard at a time. The
folder is written to a temporary sibling and renamed into place, so a failed
export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# tokenizer_config.json's auto_map names this module's class (see write_tokenizer).
TOKENIZER_CODE = "tokenization_m2.py"
TOKENIZER_CLASS_REF = "tokenization_m2.M2Tokenizer"
_TOKENIZER_CODE_TEXT = '''"""The tokenizer of an m2 export: tokenizer.json exactly as written.

tokenizer_config.json's auto_map names this class so that AutoTokenizer does not
swap in the model type's tokenizer class (Qwen2Tokenizer rebuilds the normaliser
and pre-tokeniser, which changes the ids of a SentencePiece vocabulary). With
trust_remote_code=True transformers loads this class; without it, the plain fast
tokenizer of tokenizer_class. Both read tokenizer.json unchanged.
"""

from transformers import PreTrainedTokenizerFast


class M2Tokenizer(PreTrainedTokenizerFast):
  # No __init__ of its own: transformers then builds the backend from tokenizer.json
  # as is (a class with its own __init__ is rebuilt from the vocabulary and merges).
  pass
'''


# --- reading a run --------------------------------------------------------------

def find_stage_dir(workdir: str, stage: str | None = None) -> pathlib.Path:
  """The stage directory (holding checkpoints/) of a run.

  `workdir` may be a stage dir itself or a run dir with one dir per stage; then
  `stage` picks one, or the stage whose latest checkpoint is newest.
  """
  root = pathlib.Path(workdir)
  if not root.is_dir():
    raise FileNotFoundError(f"--workdir {root} does not exist")
  if (root / CHECKPOINTS).is_dir() and stage is None:
    return root
  if stage is not None:
    d = root / stage
    if not (d / CHECKPOINTS).is_dir():
      raise FileNotFoundError(f"{d}: no {CHECKPOINTS}/ (stage {stage!r} has not saved yet)")
    return d
  stages = [d for d in root.iterdir() if (d / CHECKPOINTS).is_dir() and _steps(d / CHECKPOINTS)]
  if not stages:
    raise FileNotFoundError(f"{root}: no stage with checkpoints (expected {root}/<stage>/"
                            f"{CHECKPOINTS}/<step>/)")
  return max(stages, key=lambda d: (d / CHECKPOINTS / str(max(_steps(d / CHECKPOINTS)))
                                    ).stat().st_mtime)


def _steps(ckpt_dir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.iterdir()
                if p.name.isdigit() and (p / "state").is_dir())


def read_checkpoint(stage_dir, step: int | None = None):
  """(ModelConfig, params as a nested dict of host numpy arrays, meta dict, step).

  Only the parameters are read (not the optimizer state), onto the host, so
  the checkpoint restores whatever mesh saved it.
  """
  import jax
  import orbax.checkpoint as ocp

  from m2.model.config import ModelConfig

  ckpt_dir = pathlib.Path(stage_dir) / CHECKPOINTS
  steps = _steps(ckpt_dir) if ckpt_dir.is_dir() else []
  if not steps:
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoint steps")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{ckpt_dir}: no step {step} (have {steps})")
  step_dir = ckpt_dir / str(step)
  meta_file = step_dir / "meta" / "metadata"
  if not meta_file.is_file():
    raise ValueError(f"{step_dir}: no meta item; cannot tell the model architecture")
  meta = json.loads(meta_file.read_text())
  if "model" not in meta:
    raise ValueError(f"{meta_file}: no 'model' entry (was this written by m2.train.loop?)")
  model_fields = dict(meta["model"])
  if model_fields.get("family") not in ("qwen2", "qwen3"):
    raise ValueError(f"{meta_file}: unknown model family {model_fields.get('family')!r}; "
                     f"export writes Qwen2ForCausalLM or Qwen3ForCausalLM only")
  cfg = ModelConfig(**model_fields)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
  if "params" not in tree:
    raise ValueError(f"{step_dir}/state has no params (keys: {sorted(tree)})")
  want = {"params": tree["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want)
  params = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
      item=want, restore_args=restore_args, partial_restore=True))["params"]
  return cfg, params, meta, step


# --- tokenizer ------------------------------------------------------------------

def write_tokenizer(tokenizer, out_dir, *, chat_template: str | None = None,
                    model_max_length: int = 32768) -> dict:
  """Writes tokenizer.json, tokenizer_config.json and tokenization_m2.py.

  Byte and SentencePiece tokenizers become equivalent `tokenizers` BPE models;
  an HF tokenizer folder is copied. Returns the special-token ids:
  {"bos": .., "eos": .., "pad": .., "stop": [..]}.

  `AutoTokenizer` must read tokenizer.json as written, but transformers 5 maps
  model_type "qwen2" (config.json) to Qwen2Tokenizer whatever tokenizer_class
  says (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS in tokenization_auto.py), and
  Qwen2Tokenizer swaps in Qwen's NFC + byte-level rules: wrong ids for a
  SentencePiece vocabulary, and for non-NFC text with the byte tokenizer. An
  "auto_map" entry in tokenizer_config.json skips that override: without
  trust_remote_code, transformers 5 then ignores the auto_map for qwen2 and
  loads tokenizer_class (PreTrainedTokenizerFast = TokenizersBackend, the file
  as is); with it, the auto_map's class, a plain subclass of the same (written
  to tokenization_m2.py). transformers 4 loads either unchanged too.
  """
  from m2.data import tokenizers as toks
  from m2.data.chat import CHAT_TEMPLATE, IM_END

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  chat_template = CHAT_TEMPLATE if chat_template is None else chat_template
  if isinstance(tokenizer, toks.HFTokenizer):
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(tokenizer.folder, f))]
    if missing:
      raise FileNotFoundError(f"tokenizer folder {tokenizer.folder} lacks {missing}; "
                              f"export needs {list(TOKENIZER_FILES)}")
    shutil.copy(os.path.join(tokenizer.folder, "tokenizer.json"), out / "tokenizer.json")
    config = json.loads(pathlib.Path(tokenizer.folder, "tokenizer_config.json").read_text())
    # The template m2 trained with, not the source folder's (Qwen's adds a system prompt).
    config["chat_template"] = chat_template
    backend = None
    names = {"bos": config.get("bos_token"), "eos": config.get("eos_token"),
             "pad": config.get("pad_token")}
  elif isinstance(tokenizer, toks.ByteTokenizer):
    backend, names = _byte_backend(tokenizer)
  elif isinstance(tokenizer, toks.SentencePieceTokenizer):
    backend, names = _sentencepiece_backend(tokenizer.model_file)
  else:
    raise ValueError(f"cannot export tokenizer of type {type(tokenizer).__name__}; "
                     f"supported: byte, SentencePiece, HF tokenizer.json folders")
  if backend is not None:
    backend.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": names["bos"], "eos_token": names["eos"], "pad_token": names["pad"],
        "unk_token": names.get("unk"),
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
        "chat_template": chat_template,
    }
  if "auto_map" not in config:   # a copied folder's own auto_map (its code) stays as it was
    config["auto_map"] = {"AutoTokenizer": [TOKENIZER_CLASS_REF, TOKENIZER_CLASS_REF]}
    (out / TOKENIZER_CODE).write_text(_TOKENIZER_CODE_TEXT)
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
  ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
  stop = [tokenizer.eos_id]
  im_end = tokenizer.token_to_id(IM_END) if hasattr(tokenizer, "token_to_id") else None
  if im_end is not None and im_end not in stop:
    stop.append(im_end)
  ids["stop"] = stop
  return ids


def _byte_backend(tokenizer):
  """ByteTokenizer as a byte-level BPE without merges: each UTF-8 byte b is id b + 3."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  from m2.data.tokenizers import _bytes_to_unicode

  specials = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 as in m2's ByteTokenizer
  if (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) != (0, 1, 2):
    raise ValueError("ByteTokenizer special ids changed; update export/to_hf.py")
  vocab = {s: i for i, s in enumerate(specials)}
  vocab.update({ch: tokenizer._offset + b for b, ch in _bytes_to_unicode().items()})
  backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  return backend, {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}


def _sentencepiece_backend(model_file: str):
  """A SentencePiece BPE model as a `tokenizers` BPE (same pieces, merges by rank).

  m2 trains SentencePiece with identity normalisation, no dummy prefix and
  byte fallback, so the HF side is: spaces -> "▁", BPE, byte-fallback decode.
  """
  from sentencepiece import sentencepiece_model_pb2 as pb
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

  proto = pb.ModelProto()
  proto.ParseFromString(pathlib.Path(model_file).read_bytes())
  if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
    raise ValueError(f"{model_file}: only SentencePiece BPE models export (this one is "
                     f"{pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)})")
  if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.precompiled_charsmap:
    raise ValueError(f"{model_file}: export expects identity normalisation without a dummy "
                     f"prefix (as m2.data.tokenizers.train_sentencepiece trains)")
  pieces = [p.piece for p in proto.pieces]
  vocab = {p: i for i, p in enumerate(pieces)}
  # SentencePiece BPE ranks pieces by id (score); every split of a piece into two
  # pieces is a merge at that piece's rank (as transformers' converter does).
  normal = pb.ModelProto.SentencePiece.NORMAL
  mergeable = {p.piece for p in proto.pieces if p.type == normal}
  merges = []
  for i, p in enumerate(proto.pieces):
    if p.type != normal:
      continue
    splits = [(p.piece[:c], p.piece[c:]) for c in range(1, len(p.piece))
              if p.piece[:c] in mergeable and p.piece[c:] in mergeable]
    merges += [(i, a, b) for a, b in sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))]
  merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])))
  merges = [(a, b) for _, a, b in merges]
  unk = pieces[proto.trainer_spec.unk_id]
  backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=unk,
                                 fuse_unk=True))
  backend.normalizer = normalizers.Replace(" ", "▁")
  backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                       decoders.Fuse()])
  control = pb.ModelProto.SentencePiece.CONTROL
  user = pb.ModelProto.SentencePiece.USER_DEFINED
  backend.add_tokens([AddedToken(p.piece, special=p.type == control, normalized=False)
                      for p in proto.pieces if p.type in (control, user)])
  backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                              for p in proto.pieces if p.type == control])
  spec = proto.trainer_spec
  return backend, {"pad": pieces[spec.pad_id], "bos": pieces[spec.bos_id],
                   "eos": pieces[spec.eos_id], "unk": unk}


def load_run_tokenizer(meta: dict, override: str | None = None):
  """The tokenizer a run trained with (meta["tokenizer"]) or `override`."""
  from m2.data.tokenizers import load_tokenizer

  spec = override or meta.get("tokenizer")
  if not spec:
    raise ValueError("the checkpoint's meta names no tokenizer; pass --tokenizer "
                     "(byte, sp:<vocab>, qwen2.5, or a folder with tokenizer.json)")
  if os.path.isdir(spec):
    missing = [f for f in ("tokenizer.json",) if not os.path.isfile(os.path.join(spec, f))]
    if missing and not os.path.isfile(os.path.join(spec, "tokenizer.model")):
      raise FileNotFoundError(f"tokenizer folder {spec} has no tokenizer.json or "
                              f"tokenizer.model")
  return load_tokenizer(spec)


# --- atomic output --------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
  """Yields a temporary sibling of `out`; on success it replaces `out`.

  An existing non-empty `out` is an error unless `overwrite`. On any error the
  temporary folder is removed and `out` is left as it was.
  """
  out = pathlib.Path(out).absolute()
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out {out} exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"--out {out} already has files; pass --overwrite to replace them")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  tmp.chmod(0o755)  # mkdtemp's 0700 would make the export private to this user
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if out.exists():
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
  os.rename(tmp, out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# --- export ---------------------------------------------------------------------

def write_hf_folder(cfg, params, folder, tokenizer, *, dtype: str | None = None,
                    max_shard_bytes: int | None = None, generation: dict | None = None) -> dict:
  """Writes weights, config, generation config and tokenizer into `folder` (exists).

  A quantization-aware model (`cfg.quant`) is written as the dense weights it computes
  with, so transformers' logits equal m2's.
  """
  from m2.model import hf, quant

  if cfg.quant != "none":
    log.info("writing the %s fake-quantized weights the model computes with", cfg.quant)
    params, cfg = quant.computed_weights(params, cfg.quant), cfg.replace(quant="none")

  ids = write_tokenizer(tokenizer, folder, model_max_length=cfg.max_position_embeddings)
  generation_config = {"bos_token_id": ids["bos"], "eos_token_id": ids["stop"],
                       "pad_token_id": ids["pad"], **(generation or {})}
  hf.save_hf_checkpoint(cfg, params, folder, dtype=dtype,
                        max_shard_bytes=max_shard_bytes or hf.DEFAULT_MAX_SHARD_BYTES,
                        generation_config=generation_config)
  # transformers reads the special ids from config.json too.
  config_file = pathlib.Path(folder) / hf.CONFIG_FILE
  config = json.loads(config_file.read_text())
  config.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
  config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return ids


def export(workdir: str, out: str, *, stage: str | None = None, step: int | None = None,
           dtype: str | None = None, tokenizer: str | None = None, overwrite: bool = False,
           max_shard_bytes: int | None = None) -> pathlib.Path:
  """Exports a run's checkpoint to an HF folder at `out`. Returns the folder."""
  stage_dir = find_stage_dir(workdir, stage)
  cfg, params, meta, step = read_checkpoint(stage_dir, step)
  tok = load_run_tokenizer(meta, tokenizer)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
  with atomic_dir(out, overwrite) as tmp:
    write_hf_folder(cfg, params, tmp, tok, dtype=dtype, max_shard_bytes=max_shard_bytes)
    _write_json(tmp / "m2_export.json", {"workdir": os.path.abspath(workdir),
                                         "stage_dir": str(stage_dir), "step": step,
                                         "meta": meta})
  log.info("exported %s step %d -> %s", stage_dir, step, out)
  return pathlib.Path(out)


def _write_json(path, data) -> None:
  pathlib.Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv=None):
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run dir (or one stage dir) of m2.main")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--stage", default=None, help="stage to export (default: newest checkpoint)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
  p.add_argument("--tokenizer", default=None, help="override the run's tokenizer spec")
  p.add_argument("--max_shard_bytes", type=int, default=None)
  p.add_argument("--overwrite", action="store_true")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  folder = export(a.workdir, a.out, stage=a.stage, step=a.step, dtype=a.dtype,
                  tokenizer=a.tokenizer, overwrite=a.overwrite, max_shard_bytes=a.max_shard_bytes)
  print(folder)


if __name__ == "__main__":
  main()
