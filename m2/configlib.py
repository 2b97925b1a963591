"""Turns ml_collections ConfigDicts into validated dataclasses.

Each sub-config is a frozen dataclass that validates itself in
`__post_init__`; `build` adds what the dataclass cannot know: where in the
experiment config a field lives, so an unknown or mistyped field fails with
its full name (`config.midtrain.optimizer.lr`) instead of deep inside a run.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg or {})


def build(cls: type[T], cfg: Any, where: str) -> T:
  """Builds dataclass `cls` from a ConfigDict/dict, naming `where` in errors."""
  values = to_dict(cfg)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"unknown field(s) {', '.join(f'{where}.{u}' for u in unknown)}; "
                     f"{cls.__name__} has {sorted(fields)}")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    hint = hints.get(name)
    if dataclasses.is_dataclass(hint):
      value = build(hint, value, f"{where}.{name}")
    elif isinstance(value, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    kwargs[name] = value
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from e


def as_config_dict(obj: Any) -> dict:
  """A dataclass as a plain dict (for ConfigDict defaults and checkpoint meta)."""
  return dataclasses.asdict(obj)
