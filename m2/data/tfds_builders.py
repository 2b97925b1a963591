"""TFDS builders for the unified datasets: array_record files, no TensorFlow.

Three builders hold what the pipelines read, one per use:

  m2_documents  {"id", "source", "text"}      LM text of every trainable record, plus math
  m2_chats      {"id", "source", "messages"}  dialogues as chat messages (JSON; doctor = assistant)
  m2_prompts    {"id", "source", "record"}    QA items with gold answers (JSON of records.to_dict)

Each source gets two splits: "<source>" (training) and "<source>_heldout"
(never trained on). A record is held out when a hash of its id falls under
`heldout_fraction`, so a record keeps its side across runs, seeds and the
three builders (MediQ's cases and QA items share ids). Records of
`exclude_splits` ("pubmedqa:test", ...: benchmark test sets) are left out of
both. Before anything is written, every record passes the de-identification
gate (`m2.data.deid.gate`), which, like the loaders, refuses HealthBench.

    data = prepare("documents", ("mts_dialog", "math"), cache_dir=...)
    data.report["sources"]["mts_dialog"]          # loaded, skipped, excluded, train, heldout, PHI
    source = data.source("mts_dialog")            # random access; grain.MapDataset.source(source)

`prepare` writes once per fingerprint (the source files, the settings and the
code of the record, loader, de-id and math modules) under
`<cache_dir>/datasets/<kind>-<fingerprint>/` and reuses it afterwards; a
different setting or changed data gets a new folder. Writing uses
tensorflow-datasets' `GeneratorBasedBuilder` with `file_format="array_record"`
and reading its `as_data_source()`, neither of which imports TensorFlow.

Source names: any training source of `m2.data.loaders` of the right record
type, "math" (documents and prompts: `m2.data.math.generate_math`), and, for
documents, general text as "name=glob": `.txt` files are one document each,
`.jsonl` files one document per line with a "text" field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
from typing import Any, ClassVar, Mapping, Sequence

from m2.data import deid, deid_lexicon, loaders, records
from m2.data import math as mathgen

log = logging.getLogger(__name__)

KINDS = ("documents", "chats", "prompts")
HELDOUT = "_heldout"
_KIND_TYPES = {"documents": None, "chats": records.Dialogue, "prompts": records.QAItem}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class TextDocument:
  """Plain text from a general (non-medical) corpus file; passes the de-id gate too."""
  EVAL_ONLY: ClassVar[bool] = False
  id: str
  source: str
  text: str
  split: str = ""
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

  def to_document(self) -> str:
    return self.text


def is_heldout(record_id: str, fraction: float) -> bool:
  """Whether a record is held out: a hash of its id, stable across runs and seeds."""
  h = int.from_bytes(hashlib.sha1(record_id.encode("utf-8")).digest()[:8], "big")
  return h < fraction * 2.0**64


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the prepared data depends on besides the source names."""
  data_dir: str = ""
  heldout_fraction: float = 0.02
  exclude_splits: tuple[str, ...] = ()
  math_items: int = 20000
  math_seed: int = 0
  policy: str = "skip"

  def __post_init__(self):
    if not 0 <= self.heldout_fraction < 1:
      raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
    for s in self.exclude_splits:
      if s.count(":") != 1:
        raise ValueError(f"exclude_splits entries are 'source:split', got {s!r}")
      if s.split(":")[0] not in loaders.SOURCES:
        raise ValueError(f"exclude_splits: unknown source in {s!r}; known: "
                         f"{list(loaders.SOURCES)}")
    if self.math_items < 1:
      raise ValueError(f"math_items must be positive, got {self.math_items}")
    if self.policy not in loaders.POLICIES:
      raise ValueError(f"policy must be one of {loaders.POLICIES}, got {self.policy!r}")


def _general_spec(spec: str) -> tuple[str, str] | None:
  """("name", "glob") for a "name=glob" general-text source, else None."""
  if "=" not in spec:
    return None
  name, pattern = spec.split("=", 1)
  if not _NAME_RE.match(name) or name in loaders.SOURCES or name == "math":
    raise ValueError(f"general source {spec!r}: the name must be new and match [a-z][a-z0-9_]*")
  return name, os.path.expanduser(pattern)


def source_name(spec: str) -> str:
  general = _general_spec(spec)
  return general[0] if general else spec


def check_sources(kind: str, sources: Sequence[str]) -> None:
  """Raises ValueError naming a source that `kind` cannot hold (or HealthBench)."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if not sources:
    raise ValueError(f"{kind}: no sources")
  names = [source_name(s) for s in sources]
  if len(set(names)) != len(names):
    raise ValueError(f"{kind}: duplicate source names in {list(sources)}")
  want = _KIND_TYPES[kind]
  for spec, name in zip(sources, names):
    if name == "math":
      if kind == "chats":
        raise ValueError("chats: 'math' makes QA items, not dialogues")
      continue
    if _general_spec(spec):
      if kind != "documents":
        raise ValueError(f"{kind}: general text {spec!r} only goes into documents")
      continue
    if name not in loaders.SOURCES:
      raise ValueError(f"{kind}: unknown source {name!r}; known: {list(loaders.SOURCES)}, "
                       f"'math', or 'name=glob' for general text")
    src = loaders.SOURCES[name]
    if src.eval_only:
      raise loaders.EvalOnlyError(f"source {name!r} is evaluation-only (HealthBench): it never "
                                  f"enters training data")
    if want is not None and src.record_type is not want:
      raise ValueError(f"{kind}: source {name!r} holds {src.record_type.__name__}, "
                       f"not {want.__name__}")


# ---------------------------------------------------------------- collecting


def _read_general(name: str, pattern: str, policy: str) -> tuple[list, loaders.LoadReport]:
  """TextDocuments from .txt files (one each) and .jsonl files (a "text" per line)."""
  report = loaders.LoadReport(name)
  files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
  if not files:
    raise FileNotFoundError(f"general source {name!r}: no files match {pattern!r}")
  out = []

  def bad(location, reason):
    if policy == "raise":
      raise loaders.RecordError(location, reason)
    report.skipped += 1
    report.skips.append(loaders.Skip(location, reason))
    log.warning("%s: skipped %s: %s", name, location, reason)

  for path in files:
    report.files.append(path)
    rel = os.path.relpath(path, os.path.dirname(pattern.split("*")[0]) or ".")
    if path.endswith(".jsonl"):
      with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
          try:
            line = raw.decode("utf-8")
          except UnicodeDecodeError as e:
            bad(f"{path}:{n}", f"not UTF-8: byte {e.start}")
            continue
          if not line.strip():
            continue
          try:
            text = json.loads(line)["text"]
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            bad(f"{path}:{n}", f"no 'text' field: {type(e).__name__}")
            continue
          if not isinstance(text, str) or not text.strip():
            bad(f"{path}:{n}", "empty field: text")
            continue
          out.append(TextDocument(f"{name}:{rel}:{n}", name, text.strip()))
    else:
      try:
        with open(path, encoding="utf-8", errors="strict") as f:
          text = f.read().strip()
      except UnicodeDecodeError as e:
        bad(path, f"not UTF-8: byte {e.start}")
        continue
      if text:
        out.append(TextDocument(f"{name}:{rel}", name, text))
      else:
        bad(path, "empty field: file is empty")
  report.loaded = len(out)
  return out, report


def _load(spec: str, settings: Settings) -> tuple[list, dict]:
  """(records, report) for one source, before de-identification and splitting."""
  general = _general_spec(spec)
  if general:
    recs, report = _read_general(*general, settings.policy)
    return recs, {"loaded": report.loaded, "skipped": report.skipped}
  if spec == "math":
    items = mathgen.generate_math(settings.math_items, settings.math_seed)
    return items, {"loaded": len(items), "skipped": 0}
  recs, report = loaders.load_source(spec, settings.data_dir or None, policy=settings.policy,
                                     purpose="train")
  return recs, {"loaded": report.loaded, "skipped": report.skipped}


def _example(kind: str, record) -> dict | None:
  """The builder's row for a de-identified record, or None if it has nothing for `kind`."""
  if kind == "documents":
    return {"id": record.id, "source": record.source, "text": records.to_document(record)}
  if kind == "chats":
    msgs = record.to_messages()
    if not any(m.role == "assistant" for m in msgs):
      return None
    return {"id": record.id, "source": record.source,
            "messages": json.dumps([m.to_dict() for m in msgs], ensure_ascii=False)}
  return {"id": record.id, "source": record.source,
          "record": json.dumps(records.to_dict(record), ensure_ascii=False)}


def check_excluded(name: str, records, exclude_splits: Sequence[str]) -> None:
  """Raises if `exclude_splits` names a split that source `name`'s records lack: a
  misspelled test split would otherwise go into training unnoticed."""
  have = {r.split for r in records}
  missing = [s for s in exclude_splits if s.split(":")[0] == name and s.split(":")[1] not in have]
  if missing:
    raise ValueError(f"exclude_splits {missing}: {name} has no such split "
                     f"(its splits: {sorted(have)})")


def collect(kind: str, sources: Sequence[str], settings: Settings
            ) -> tuple[dict[str, list[dict]], dict]:
  """Loads, de-identifies and splits the sources: (split name -> rows, report)."""
  check_sources(kind, sources)
  excluded = {tuple(s.split(":")) for s in settings.exclude_splits}
  splits: dict[str, list[dict]] = {}
  report: dict[str, Any] = {"kind": kind, "sources": {}, "settings": dataclasses.asdict(settings)}
  for spec in sources:
    name = source_name(spec)
    recs, counts = _load(spec, settings)
    check_excluded(name, recs, settings.exclude_splits)
    kept = [r for r in recs if (name, r.split) not in excluded]
    counts["excluded"] = len(recs) - len(kept)
    clean, deid_report = deid.gate(kept, purpose="train")
    counts["phi_replaced"] = dict(deid_report.counts)
    train, heldout, empty = [], [], 0
    for r in clean:
      row = _example(kind, r)
      if row is None:
        empty += 1
        continue
      (heldout if is_heldout(r.id, settings.heldout_fraction) else train).append(row)
    if empty:
      log.warning("%s: %d records have no doctor turn and make no chat", name, empty)
    counts.update(no_assistant_turn=empty, train=len(train), heldout=len(heldout),
                  train_chars=sum(len(_text_of(kind, x)) for x in train),
                  heldout_chars=sum(len(_text_of(kind, x)) for x in heldout))
    report["sources"][name] = counts
    log.info("%s %s: %d train, %d held out, %d excluded by split; de-id: %s", kind, name,
             len(train), len(heldout), counts["excluded"], deid_report.summary())
    splits[name], splits[name + HELDOUT] = train, heldout
  return splits, report


def _text_of(kind: str, row: dict) -> str:
  return row[{"documents": "text", "chats": "messages", "prompts": "record"}[kind]]


# ------------------------------------------------------------------ builders


def _tfds():
  import tensorflow_datasets as tfds   # heavy; imported only when data is built or read
  tfds.display_progress_bar(False)
  return tfds


def _builder_class(kind: str):
  """The GeneratorBasedBuilder for `kind` (classes are made once; TFDS registers names)."""
  if kind in _BUILDERS:
    return _BUILDERS[kind]
  tfds = _tfds()
  field = {"documents": "text", "chats": "messages", "prompts": "record"}[kind]

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Unified m2 records, de-identified, with held-out splits."}

    # TFDS 4.9.10 finds a builder's file through `importlib_resources`, a
    # package it only requires on Python < 3.9; the file is known here.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      from etils import epath
      return epath.Path(__file__)

    def __init__(self, *, rows: Mapping[str, list[dict]] | None = None, **kwargs):
      self._rows = rows
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=f"m2 {kind}: {field} per record, one split per source.",
          features=tfds.features.FeaturesDict({
              "id": tfds.features.Text(), "source": tfds.features.Text(),
              field: tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      if self._rows is None:
        raise RuntimeError("this builder only reads; prepare() writes it")
      return {split: self._generate_examples(rows) for split, rows in self._rows.items() if rows}

    def _generate_examples(self, rows):
      for row in rows:
        yield row["id"], row

  Builder.name = f"m2_{kind}"
  Builder.__name__ = Builder.__qualname__ = f"M2{kind.capitalize()}"
  _BUILDERS[kind] = Builder
  return Builder


_BUILDERS: dict[str, type] = {}

# The code whose change changes the prepared rows.
_CODE = (records, loaders, deid, deid_lexicon, mathgen)


def fingerprint(kind: str, sources: Sequence[str], settings: Settings) -> str:
  """Hash of everything the prepared rows depend on."""
  h = hashlib.sha1(json.dumps([kind, list(sources), dataclasses.asdict(settings)]).encode())
  for spec in sources:
    general = _general_spec(spec)
    if general:   # large user corpora: path, size and mtime stand for the content
      for path in sorted(glob.glob(general[1], recursive=True)):
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif spec in loaders.SOURCES:
      root = settings.data_dir or loaders.default_data_dir()
      for path in loaders.source_files(spec, root):
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          h.update(f.read())
  for module in _CODE:
    with open(module.__file__, "rb") as f:
      h.update(f.read())
  with open(__file__, "rb") as f:
    h.update(f.read())
  return h.hexdigest()[:12]


@dataclasses.dataclass
class Prepared:
  """A prepared builder: its folder, per-source splits and the preparation report."""
  kind: str
  directory: str
  builder: Any
  report: dict

  @property
  def sources(self) -> list[str]:
    return list(self.report["sources"])

  def source(self, name: str, heldout: bool = False) -> Sequence[dict]:
    """The rows of one source (random access, decoded lazily); empty if it has none."""
    if name not in self.report["sources"]:
      raise KeyError(f"{self.kind} has no source {name!r}; it has {self.sources}")
    split = name + HELDOUT if heldout else name
    if split not in self.builder.info.splits:
      return []
    return self.builder.as_data_source(split=split)

  def sources_dict(self, heldout: bool = False) -> dict[str, Sequence[dict]]:
    return {name: self.source(name, heldout) for name in self.sources}


@contextlib.contextmanager
def _lock(path: str):
  """An exclusive file lock, so two processes never prepare the same folder at once."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def default_cache_dir() -> str:
  from m2.data.tokenizers import default_cache_dir as tokenizer_cache
  return tokenizer_cache()


def prepare(kind: str, sources: Sequence[str], settings: Settings = Settings(),
            cache_dir: str | None = None) -> Prepared:
  """The builder for `kind` over `sources`, written once into the cache and then reused."""
  check_sources(kind, sources)
  key = fingerprint(kind, sources, settings)
  directory = os.path.join(cache_dir or default_cache_dir(), "datasets", f"{kind}-{key}")
  report_path = os.path.join(directory, "report.json")
  cls = _builder_class(kind)
  with _lock(directory + ".lock"):
    if not os.path.exists(report_path):
      log.info("preparing %s from %s into %s", kind, list(sources), directory)
      rows, report = collect(kind, sources, settings)
      if not any(rows.values()):
        raise ValueError(f"{kind}: the sources {list(sources)} gave no records")
      cls(rows=rows, data_dir=directory, file_format="array_record").download_and_prepare()
      with open(report_path + ".tmp", "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
      os.replace(report_path + ".tmp", report_path)   # the report marks a finished folder
  with open(report_path) as f:
    report = json.load(f)
  builder = cls(data_dir=directory, file_format="array_record")
  return Prepared(kind, directory, builder, report)
