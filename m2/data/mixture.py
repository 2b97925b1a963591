"""Domain mixes: ratios over named groups of sources, in tokens, and what a run realised.

Baichuan-M2's mid-training mixes medical : general : math = 2 : 2 : 1. Here a
mix is `ratios` over domains, and `domains` names each domain's sources:

    mix = Mixture({"medical": 2, "general": 2, "math": 1},
                  {"medical": ("mts_dialog", "aci_bench"), "general": (), "math": ("math",)})
    target = mix.resolve(available={"mts_dialog", "aci_bench", "math"})
    target.fractions          # {"medical": 0.667, "math": 0.333}; general has no source
    target.dropped            # {"general": "no sources listed"}

A domain with no source (or none with data) is dropped and the rest is
renormalised, with a warning; the shipped data has no general corpus, so the
tiny config's realised mix is medical : math = 2 : 1. Inside a domain,
sources count in proportion to their size.

The ratios are over tokens, but mixing draws documents, so each domain's
document weight is its ratio divided by its mean document length in tokens
(`document_weights`). `count_tokens` and `mix_report` measure what the
batches actually held, per source and per domain.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_RATIOS = {"medical": 2.0, "general": 2.0, "math": 1.0}


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The mix a run can realise: domain -> fraction of tokens, and domain -> sources."""
  fractions: dict[str, float]
  domains: dict[str, tuple[str, ...]]
  dropped: dict[str, str]

  @property
  def sources(self) -> list[str]:
    return [s for d in self.domains for s in self.domains[d]]

  def domain_of(self, source: str) -> str:
    for d, names in self.domains.items():
      if source in names:
        return d
    raise KeyError(source)


@dataclasses.dataclass(frozen=True)
class Mixture:
  ratios: Mapping[str, float]
  domains: Mapping[str, Sequence[str]]

  def __post_init__(self):
    for d, r in self.ratios.items():
      if not isinstance(r, (int, float)) or isinstance(r, bool) or r < 0:
        raise ValueError(f"mix ratio of {d!r} must be a number >= 0, got {r!r}")
      if d not in self.domains:
        raise ValueError(f"mix ratio {d!r} names no domain; domains: {sorted(self.domains)}")
    unweighted = sorted(set(self.domains) - set(self.ratios))
    if unweighted:
      raise ValueError(f"domains {unweighted} have no mix ratio")
    seen: dict[str, str] = {}
    for d, names in self.domains.items():
      for s in names:
        if s in seen:
          raise ValueError(f"source {s!r} is in domains {seen[s]!r} and {d!r}")
        seen[s] = d

  def resolve(self, available: Iterable[str]) -> Resolved:
    """Keeps domains with a positive ratio and an available source; renormalises."""
    available = set(available)
    kept, dropped = {}, {}
    for d, r in self.ratios.items():
      names = tuple(s for s in self.domains[d] if s in available)
      if r == 0:
        dropped[d] = "ratio 0"
      elif not self.domains[d]:
        dropped[d] = "no sources listed"
      elif not names:
        dropped[d] = f"no data in {list(self.domains[d])}"
      else:
        kept[d] = names
    if not kept:
      raise ValueError(f"the mix {dict(self.ratios)} has no domain with data ({dropped})")
    total = sum(self.ratios[d] for d in kept)
    fractions = {d: self.ratios[d] / total for d in kept}
    for d, why in dropped.items():
      log.warning("mix: domain %r dropped (%s); the rest renormalised to %s", d, why,
                  {k: round(v, 3) for k, v in fractions.items()})
    return Resolved(fractions, kept, dropped)


def document_weights(fractions: Mapping[str, float], mean_tokens: Mapping[str, float]
                     ) -> dict[str, float]:
  """Per-domain document-sampling weights that realise token `fractions`."""
  w = {d: fractions[d] / max(mean_tokens[d], 1e-9) for d in fractions}
  total = sum(w.values())
  return {d: v / total for d, v in w.items()}


def count_tokens(batches: Iterable[Mapping[str, np.ndarray]], names: Sequence[str]
                 ) -> collections.Counter:
  """Tokens per source over batches with a "sources" array (1-based index into `names`;
  0 is padding). Counts the trained positions (`loss_mask`) when the batch has one."""
  counts = np.zeros(len(names) + 1, np.int64)
  for b in batches:
    src = np.asarray(b["sources"])
    if "loss_mask" in b:
      src = np.where(np.asarray(b["loss_mask"]) > 0, src, 0)
    counts += np.bincount(src.ravel(), minlength=len(names) + 1)[:len(names) + 1]
  return collections.Counter({n: int(c) for n, c in zip(names, counts[1:]) if c})


def mix_report(counts: Mapping[str, int], resolved: Resolved) -> dict:
  """Target vs realised token fractions per domain, and tokens per source."""
  total = max(sum(counts.values()), 1)
  domains = {}
  for d, frac in resolved.fractions.items():
    tokens = sum(counts.get(s, 0) for s in resolved.domains[d])
    domains[d] = {"target": frac, "realised": tokens / total, "tokens": tokens}
  return {"tokens": sum(counts.values()), "domains": domains,
          "sources": {s: {"domain": resolved.domain_of(s), "tokens": counts.get(s, 0),
                          "fraction": counts.get(s, 0) / total} for s in resolved.sources},
          "dropped": dict(resolved.dropped)}


def format_mix(report: Mapping) -> str:
  """A small table of the realised mix."""
  rows = [("domain / source", "target", "realised", "tokens")]
  for d, v in report["domains"].items():
    rows.append((d, f"{v['target']:.3f}", f"{v['realised']:.3f}", f"{v['tokens']:,}"))
    for s, sv in report["sources"].items():
      if sv["domain"] == d:
        rows.append((f"  {s}", "", f"{sv['fraction']:.3f}", f"{sv['tokens']:,}"))
  for d, why in report.get("dropped", {}).items():
    rows.append((d, "0", "-", f"dropped: {why}"))
  w = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {e:>{w[3]}}" for a, b, c, e in rows)
