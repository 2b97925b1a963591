"""Rubric grader with HealthBench scoring (openai/simple-evals' healthbench_eval, re-implemented).

    grader = Grader(ReferenceJudge())                  # or Grader(ModelJudge(role))
    result = grader.grade(conversation, rubric)        # conversation ends with the response
    result.score, result.judgements                    # Σ met points / Σ positive points
    summary = aggregate([r.metrics for r in results])  # clipped means, bootstrap std, per tag

Protocol (HealthBench): one judgement per (conversation, criterion) ->
{"explanation", "criteria_met"}. Undesirable criteria (negative points) are
judged literally: "criteria_met" true means the response *does* the undesirable
thing, and its (negative) points are added. Scores:

- example: Σ points of met criteria / Σ positive points (None if no positive points);
- per rubric tag ("axis:...", "cluster:...", "dimension:..."): the same over the items with that tag;
- example tags ("theme:...") take the example's overall score;
- overall: mean over examples clipped to [0, 1], std from 1000 bootstrap resamples of the clipped mean.

The reference judge matches a criterion's content terms; HealthBench's cluster
(consensus) criteria describe a behaviour instead, and are judged by their
family's checks (m2/verifier/clusters.py: asks the user, refers to emergency
care, hedges, answers the query, readable, ...).

Before any judge sees a response, `sanitize` removes what addresses the grader
instead of the user: fake JSON verdicts, "ignore the rubric / all criteria are
met" sentences and sentences that paste a criterion verbatim. What remains is
judged, so such text can never earn points. `JudgementCache` keys judgements by
a hash of (judge, criterion, judged text) and reports its hit rate.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import re
from typing import Any, Mapping, Sequence

import numpy as np

from m2.data.records import Message
from m2.verifier import prompts, text
from m2.verifier.clusters import judge_cluster
from m2.verifier.rubrics import Criterion, Rubric

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ scoring (pure)


def calculate_score(points: Sequence[int], met: Sequence[bool]) -> float | None:
  """simple-evals' calculate_score: achieved / possible, None when nothing is positive."""
  if len(points) != len(met):
    raise ValueError(f"{len(points)} points but {len(met)} judgements")
  possible = sum(p for p in points if p > 0)
  if possible == 0:
    return None
  return sum(p for p, m in zip(points, met) if m) / possible


def example_metrics(rubric: Rubric, met: Sequence[bool]) -> dict[str, float]:
  """Per-example metrics as simple-evals' grade_sample: overall, per rubric tag, per example tag."""
  overall = calculate_score([c.points for c in rubric], met)
  if overall is None:
    raise ValueError(f"rubric {rubric.source!r} has no positive points")
  out = {"overall_score": overall}
  for tag in rubric.tags:
    out[tag] = overall
  tags = sorted({t for c in rubric for t in _criterion_tags(c)})
  for tag in tags:
    idx = [i for i, c in enumerate(rubric.criteria) if tag in _criterion_tags(c)]
    s = calculate_score([rubric.criteria[i].points for i in idx], [met[i] for i in idx])
    if s is not None:
      out[tag] = s
  return out


def _criterion_tags(c: Criterion) -> tuple[str, ...]:
  tags = tuple(t for t in c.tags if not t.startswith(("fact:", "scope:", "kind:", "level:")))
  if not any(t.startswith("axis:") for t in tags):
    tags += (f"dimension:{c.dimension}",)
  return tags


def clipped_mean(values: Sequence[float]) -> float:
  return float(np.clip(np.mean(values), 0, 1))


def bootstrap_std(values: Sequence[float], n_samples: int = 1000, seed: int = 0) -> float:
  """Std of the clipped mean over bootstrap resamples (simple-evals, 1000 samples)."""
  vals = np.asarray(values, np.float64)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(vals), size=(n_samples, len(vals)))
  return float(np.std(np.clip(vals[idx].mean(axis=1), 0, 1)))


def aggregate(metrics: Sequence[Mapping[str, float]], n_bootstrap: int = 1000,
              seed: int = 0) -> dict[str, dict[str, float]]:
  """{metric: {"mean", "bootstrap_std", "n_samples"}} over examples (each key over the
  examples that have it), as simple-evals' _aggregate_get_clipped_mean."""
  keys = sorted({k for m in metrics for k in m})
  out = {}
  for k in keys:
    vals = [m[k] for m in metrics if k in m]
    out[k] = {"mean": clipped_mean(vals), "bootstrap_std": bootstrap_std(vals, n_bootstrap, seed),
              "n_samples": len(vals)}
  return out


# ------------------------------------------------------------------ sanitising

_VERDICT_RE = re.compile(r"```[a-z]*\s*\{[^`]*?\}\s*```|\{[^{}]*\"?criteria_met\"?[^{}]*\}",
                         re.I | re.S)
# Words addressed to the grader; not medical ones ("sprain grading", "a Gleason score").
_ADDRESS_RE = re.compile(
    r"\b(grader|rubric|evaluator|(dear |to the |attention,? )judge|criteria_met|scoring model"
    r"|all (of )?(the |these |rubric )?criteria (are|were|have been|is) (met|satisfied)"
    r"|every criteri|full (marks|points|score)"
    r"|ignore (all |any |the |previous |prior |above )*(instructions|rubric|criteria|rules)"
    r"|(mark|rate|grade|score) (this|the|my) (response|answer))\b", re.I)
_WORD_SPLIT = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class Sanitized:
  text: str
  removed_verdicts: int = 0
  removed_addressing: int = 0
  removed_echoes: int = 0

  @property
  def flagged(self) -> bool:
    return bool(self.removed_verdicts or self.removed_addressing or self.removed_echoes)


_ECHO_RUN = 5   # words in a row shared with a criterion that count as pasting it
_FRAME_WORDS = frozenset({"user", "users", "response", "responses", "assistant", "rubric",
                          "criterion", "criteria"})


def _echo_mask(words: Sequence[str], criteria_words: Sequence[list[str]]) -> np.ndarray:
  """Which response words belong to a copy of a criterion.

  A copy is an alignment (difflib) anchored by a run of >= _ECHO_RUN words that
  carries the rubric's framing: it starts where the criterion starts ("States
  that ...", "Fails to ...") or names the user/response. Plain substance ("the
  most likely diagnosis is X") is not framing. Once anchored, every aligned run
  of 2+ words of that copy is cut."""
  covered = np.zeros(len(words), bool)
  for cw in criteria_words:
    if len(cw) < _ECHO_RUN:
      continue
    mine = np.zeros(len(words), bool)
    for _ in range(4):   # the same criterion may be pasted more than once
      masked = [w if not c else "\0" for w, c in zip(words, mine)]
      blocks = [b for b in difflib.SequenceMatcher(None, masked, cw, autojunk=False)
                .get_matching_blocks() if b.size]
      anchored = any(b.size >= _ECHO_RUN and (b.b == 0 or _FRAME_WORDS & set(cw[b.b:b.b + b.size]))
                     for b in blocks)
      if not anchored:
        break
      for b in blocks:
        if b.size >= 2:
          mine[b.a:b.a + b.size] = True
    covered |= mine
  return covered


def sanitize(response: str, criteria: Sequence[Criterion] = ()) -> Sanitized:
  """The response without grader-directed text (verdicts, instructions, pasted criteria).

  Pasted criteria: runs of >= 5 words copied from a criterion, with its framing,
  are cut, and so is the rest of any sentence that lost half its words that way
  (the residue of a pasted criterion must not match on its own)."""
  cleaned, n_verdicts = _VERDICT_RE.subn(" ", response)
  crit_words = [_WORD_SPLIT.findall(c.text.lower()) for c in criteria]
  # The echo mask is computed over the whole response, so a pasted criterion of
  # several sentences is found as one run from its framed start.
  spans = list(_WORD_SPLIT.finditer(cleaned))
  mask = (_echo_mask([m.group().lower() for m in spans], crit_words) if crit_words and spans
          else np.zeros(len(spans), bool))
  cut = {m.start(): m.end() for m, c in zip(spans, mask) if c}
  word_at = {m.start(): i for i, m in enumerate(spans)}
  kept, addressing, echoes = [], 0, 0
  pos = 0
  for line in cleaned.split("\n"):
    parts = []
    for sent in re.split(r"(?<=[.!?])\s+|(?<=[.!?][)\]\"'])\s+", line):
      start = cleaned.find(sent, pos) if sent else pos
      pos = start + len(sent) if start >= 0 else pos
      if not sent.strip():
        continue
      if _ADDRESS_RE.search(sent):
        addressing += 1
        continue
      ids = [word_at[start + m.start()] for m in _WORD_SPLIT.finditer(sent)
             if start + m.start() in word_at]
      hit = [i for i in ids if mask[i]]
      if hit:
        echoes += 1
        if len(hit) >= 0.5 * len(ids):
          continue
        out, p0 = [], 0
        for m in _WORD_SPLIT.finditer(sent):
          if start + m.start() in cut:
            out.append(sent[p0:m.start()])
            p0 = m.end()
        out.append(sent[p0:])
        sent = re.sub(r"\s+", " ", "".join(out))
      parts.append(sent)
    kept.append(" ".join(parts))
  return Sanitized("\n".join(kept).strip(), n_verdicts, addressing, echoes)


# ------------------------------------------------------------------ judgements


@dataclasses.dataclass(frozen=True)
class Judgement:
  criteria_met: bool
  explanation: str
  source: str = ""          # "reference", "model", "model->reference" (fallback), "cache"

  def to_dict(self) -> dict:
    return {"explanation": self.explanation, "criteria_met": self.criteria_met}


def _pairs(conversation: Sequence[Any]) -> list[tuple[str, str]]:
  out = []
  for m in conversation:
    if isinstance(m, Message):
      out.append((m.role, m.content))
    elif isinstance(m, Mapping):
      out.append((m["role"], m["content"]))
    elif isinstance(m, tuple) and len(m) == 2:
      out.append((str(m[0]), str(m[1])))
    else:
      raise TypeError(f"a conversation message must be a Message or a mapping, got {m!r}")
  return out


@dataclasses.dataclass(frozen=True)
class JudgeInput:
  """What one judgement looks at: the conversation with judged turns sanitised."""
  conversation: tuple[tuple[str, str], ...]
  criterion: Criterion

  @property
  def target(self) -> str:
    """The judged text: the last assistant turn, or all of them for dialogue criteria."""
    turns = [t for r, t in self.conversation if r == "assistant"]
    if not turns:
      return ""
    return "\n".join(turns) if self.criterion.scope == "dialogue" else turns[-1]

  def key(self, judge_name: str) -> str:
    payload = json.dumps([judge_name, self.criterion.rubric_item(), self.criterion.scope,
                          self.conversation], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgementCache:
  """Judgements by a hash of (judge, criterion, conversation); repeated rollouts pay once."""

  def __init__(self, max_entries: int = 1_000_000):
    self.max_entries = max_entries
    self._store: dict[str, Judgement] = {}
    self.hits = self.misses = 0

  def get(self, key: str) -> Judgement | None:
    j = self._store.get(key)
    if j is None:
      self.misses += 1
    else:
      self.hits += 1
    return j

  def put(self, key: str, j: Judgement):
    if len(self._store) >= self.max_entries:   # drop the oldest (dicts keep insertion order)
      self._store.pop(next(iter(self._store)))
    self._store[key] = j

  @property
  def hit_rate(self) -> float:
    n = self.hits + self.misses
    return self.hits / n if n else 0.0

  def __len__(self):
    return len(self._store)


# Rubric boilerplate: words that say how a criterion is phrased, not what it asks for.
CRITERION_FRAME = frozenset(
    "response responses user users assistant model states state stating mentions mention "
    "mentioning explains explain explaining recommends recommend recommending advises advise "
    "advising suggests suggest suggesting provides provide providing includes include including "
    "notes note noting clearly appropriate appropriately correctly accurately specifically "
    "explicitly briefly possible probable potential potentially likely most relevant important "
    "key necessary certain specific ensure ensures whether etc also inform informs informing "
    "identifies identify identifying highlight highlights highlighting particular particularly "
    "especially generally general incorrectly information patient patients brief "
    "discusses discuss discussing describes describe addresses address acknowledges "
    "acknowledge indicates indicate emphasizes emphasize arranges arrange proposes propose "
    "offers offer gives give tells tell patient's user's".split())
_ABSENT_RE = re.compile(r"^\s*(fails? to|does not|doesn't|did not|do not|omits?|neglects? to"
                        r"|misses|lacks|never|not)\b\s*", re.I)
_ASK_RE = re.compile(r"^\s*(asks?|seeks?|inquires?|enquires?|requests?|queries|clarif\w*)\b", re.I)
_EXAMPLES_RE = re.compile(r"\b(?:such as|for example|for instance|e\.g\.|including|like"
                          r"|particularly|especially)\b", re.I)
_JUSTIFICATION_RE = re.compile(r"\(\s*justification:.*?(\)|$)", re.I | re.S)
_QUESTION_RE = re.compile(r"\?|\b(could you|can you|would you|please (tell|share|let|provide)"
                          r"|let me know|tell me (more|about))\b", re.I)


@dataclasses.dataclass(frozen=True)
class ParsedCriterion:
  core: tuple[str, ...]              # content terms that must be present
  examples: tuple[tuple[str, ...], ...]   # alternatives, any one of which helps
  absent: bool                       # "fails to X": met when X is absent
  asks: bool                         # "asks about X": X must be asked as a question


def parse_criterion(criterion_text: str) -> ParsedCriterion:
  t = _JUSTIFICATION_RE.sub(" ", criterion_text)
  t = re.sub(r"^\s*\[[-+]?\d+\]\s*", "", t)
  absent = bool(_ABSENT_RE.match(t))
  if absent:
    t = _ABSENT_RE.sub("", t, count=1)
  asks = bool(_ASK_RE.match(t))
  head, *rest = _EXAMPLES_RE.split(t, maxsplit=1)
  examples = ()
  if rest:
    items = re.split(r",|\bor\b|\band\b|;", rest[0])
    examples = tuple(tuple(text.terms(i, CRITERION_FRAME)) for i in items)
    examples = tuple(e for e in examples if e)
  core = tuple(dict.fromkeys(text.terms(head, CRITERION_FRAME)))
  if asks:   # the asking verb is in `asks`; its object is the content
    core = tuple(c for c in core if not _ASK_RE.match(c))
  return ParsedCriterion(core, examples, absent, asks)


class ReferenceJudge:
  """Deterministic lexical + semantic criterion matching.

  A criterion's content terms (stemmed, synonyms canonical, rubric phrasing
  removed) must be covered by the judged text: IDF-weighted share >= `threshold`
  (IDF over the rubric's criteria, so words every criterion shares count less),
  with partial credit for close word forms. "such as" examples are
  alternatives: one fully present example lowers the bar for the core.
  "Asks ..." criteria also need a question. "Fails to X" is met when X is absent.
  HealthBench cluster (consensus) criteria with a rule in CLUSTER_RULES are
  judged by that rule's behaviour checks instead (see `judge_cluster`).
  """

  name = "reference"

  def __init__(self, threshold: float = 0.6, min_threshold: float = 0.3,
               decay_per_term: float = 0.04):
    self.threshold, self.min_threshold, self.decay = threshold, min_threshold, decay_per_term

  def required_coverage(self, n_terms: int) -> float:
    """Short criteria need most of their words; long physician criteria pack in
    detail a correct answer paraphrases, so the bar falls with length (to a floor)."""
    return max(self.min_threshold, self.threshold - self.decay * max(0, n_terms - 3))

  def judge(self, item: JudgeInput, idf: Mapping[str, float] | None = None) -> Judgement:
    cluster = judge_cluster(item)
    if cluster is not None:   # consensus meta-criteria: behaviour checks, not term coverage
      return Judgement(cluster[0], cluster[1], self.name)
    pc = parse_criterion(item.criterion.text)
    target = item.target
    tset = text.term_set(target)
    if pc.core:
      cov, found, missing = text.coverage(pc.core, tset, idf)
    else:
      cov, found, missing = 0.0, [], []
    need = self.required_coverage(len(pc.core))
    example_hit = next((e for e in pc.examples if text.coverage(e, tset)[0] >= 0.99), None)
    present = cov >= need or (example_hit is not None and cov >= 0.6 * need)
    if not pc.core and example_hit is not None:
      present = True
    if pc.asks and present:
      asked = any(_QUESTION_RE.search(s) and text.term_set(s) & set(found or pc.core)
                  for s in text.sentences(target))
      present = asked or not pc.core
    met = present != pc.absent
    why = (f"content coverage {cov:.2f} (needs {need:.2f}); found "
           f"{found[:8]}; missing {missing[:8]}"
           + (f"; example present: {list(example_hit)}" if example_hit else "")
           + ("; a question is required" if pc.asks else "")
           + ("; the criterion describes an omission" if pc.absent else ""))
    return Judgement(met, why, self.name)

  def judge_batch(self, items: Sequence[JudgeInput],
                  idfs: Sequence[Mapping[str, float] | None] | None = None) -> list[Judgement]:
    idfs = idfs or [None] * len(items)
    return [self.judge(i, d) for i, d in zip(items, idfs)]


# ------------------------------------------------------------------ model judge

_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_verdict(raw: str) -> dict | None:
  """{"explanation": str, "criteria_met": bool} from a model's reply, or None if malformed."""
  candidates = [m.group(1) for m in _FENCE_RE.finditer(raw)]
  start = raw.find("{")
  while start != -1:   # every balanced {...} span
    depth = 0
    for i in range(start, len(raw)):
      depth += {"{": 1, "}": -1}.get(raw[i], 0)
      if depth == 0:
        candidates.append(raw[start:i + 1])
        break
    start = raw.find("{", start + 1)
  for c in candidates:
    try:
      obj = json.loads(c.strip())
    except json.JSONDecodeError:
      continue
    if isinstance(obj, dict) and isinstance(obj.get("criteria_met"), bool):
      return {"explanation": str(obj.get("explanation", "")), "criteria_met": obj["criteria_met"]}
  return None


@dataclasses.dataclass
class ModelJudgeStats:
  judgements: int = 0
  malformed: int = 0        # replies that did not parse (each retry counts)
  retries: int = 0
  fallbacks: int = 0        # items still malformed after max_retries: judged by the reference


class ModelJudge:
  """The grader role through the sampler, with bounded retries on malformed JSON.

  Malformed replies are retried (new seeds, batched, sampled at least at
  `retry_temperature`: a greedy grader would repeat itself) up to `max_retries`
  times; items that still fail are judged by `fallback` (the reference judge)
  and counted, so one bad reply never blocks a batch or silently scores 0.
  """

  name = "model"

  def __init__(self, role, *, max_retries: int = 2, fallback: ReferenceJudge | None = None,
               max_new_tokens: int = 96, retry_temperature: float = 0.7):
    self.role, self.max_retries, self.max_new_tokens = role, max_retries, max_new_tokens
    self.retry_temperature = retry_temperature
    self.fallback = fallback or ReferenceJudge()
    self.stats = ModelJudgeStats()

  def judge_batch(self, items: Sequence[JudgeInput],
                  idfs: Sequence[Mapping[str, float] | None] | None = None) -> list[Judgement]:
    chats = [prompts.grader_messages(i.conversation, i.criterion.rubric_item(),
                                     i.criterion.scope == "dialogue") for i in items]
    out: list[Judgement | None] = [None] * len(items)
    todo = list(range(len(items)))
    for attempt in range(self.max_retries + 1):
      if not todo:
        break
      if attempt:
        self.stats.retries += len(todo)
      seeds = [int(hashlib.sha256(f"{i}:{attempt}".encode()).hexdigest()[:8], 16) for i in todo]
      replies = self.role.complete([chats[i] for i in todo], seeds=seeds,
                                   max_new_tokens=self.max_new_tokens,
                                   min_temperature=self.retry_temperature if attempt else 0.0)
      still = []
      for i, raw in zip(todo, replies):
        v = parse_verdict(raw)
        if v is None:
          self.stats.malformed += 1
          still.append(i)
        else:
          out[i] = Judgement(v["criteria_met"], v["explanation"], self.name)
      todo = still
    if todo:
      self.stats.fallbacks += len(todo)
      log.warning("grader: %d judgement(s) still malformed after %d retries; judged by the "
                  "reference judge", len(todo), self.max_retries)
      idfs = idfs or [None] * len(items)
      for i in todo:
        j = self.fallback.judge(items[i], idfs[i])
        out[i] = Judgement(j.criteria_met, j.explanation, f"{self.name}->{self.fallback.name}")
    self.stats.judgements += len(items)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------ grader


@dataclasses.dataclass
class GradeResult:
  score: float                        # Σ met points / Σ positive points (may be < 0 or > 1)
  judgements: list[Judgement]
  rubric: Rubric
  metrics: dict[str, float]           # overall_score + per-tag scores (simple-evals)
  sanitized: Sanitized | None = None  # what was removed from the judged turns

  @property
  def points(self) -> int:
    return sum(c.points for c, j in zip(self.rubric, self.judgements) if j.criteria_met)

  def by_dimension(self) -> dict[str, float]:
    return {k[len("dimension:"):]: v for k, v in self.metrics.items()
            if k.startswith("dimension:")}


@dataclasses.dataclass
class GraderStats:
  gradings: int = 0
  judgements: int = 0
  flagged_responses: int = 0   # responses with grader-directed text removed


class Grader:
  """Grades conversations against rubrics: sanitise, judge (cached, batched), score."""

  def __init__(self, judge=None, *, cache: JudgementCache | None = None):
    self.judge = judge or ReferenceJudge()
    self.cache = cache if cache is not None else JudgementCache()
    self.stats = GraderStats()

  def grade(self, conversation: Sequence[Any], rubric: Rubric) -> GradeResult:
    return self.grade_batch([(conversation, rubric)])[0]

  def grade_batch(self, items: Sequence[tuple[Sequence[Any], Rubric]]) -> list[GradeResult]:
    """All judgements of all items in one judge call (model judges decode them as one batch)."""
    inputs: list[JudgeInput] = []
    idfs, owners, sanitized = [], [], []
    for k, (conv, rubric) in enumerate(items):
      pairs = _pairs(conv)
      if not pairs or pairs[-1][0] != "assistant":
        raise ValueError(f"item {k}: a graded conversation must end with the assistant's "
                         f"response, got roles {[r for r, _ in pairs]}")
      flags = Sanitized("")
      clean = []
      for role, t in pairs:
        if role == "assistant":
          s = sanitize(t, rubric.criteria)
          flags = Sanitized("", flags.removed_verdicts + s.removed_verdicts,
                            flags.removed_addressing + s.removed_addressing,
                            flags.removed_echoes + s.removed_echoes)
          t = s.text
        clean.append((role, t))
      sanitized.append(flags)
      self.stats.flagged_responses += flags.flagged
      idf = text.idf_table([text.term_set(c.text) for c in rubric])
      for c in rubric:
        inputs.append(JudgeInput(tuple(clean), c))
        idfs.append(idf)
        owners.append(k)
    judgements: list[Judgement | None] = [None] * len(inputs)
    keys = [i.key(self.judge.name) for i in inputs]
    todo = []
    for n, key in enumerate(keys):
      hit = self.cache.get(key)
      if hit is None:
        todo.append(n)
      else:
        judgements[n] = dataclasses.replace(hit, source="cache")
    fresh = self.judge.judge_batch([inputs[n] for n in todo], [idfs[n] for n in todo])
    for n, j in zip(todo, fresh):
      judgements[n] = j
      self.cache.put(keys[n], j)
    self.stats.gradings += len(items)
    self.stats.judgements += len(inputs)
    results = []
    for k, (_, rubric) in enumerate(items):
      js = [j for j, o in zip(judgements, owners) if o == k]
      met = [j.criteria_met for j in js]
      metrics = example_metrics(rubric, met)
      results.append(GradeResult(metrics["overall_score"], js, rubric, metrics, sanitized[k]))
    return results


def with_response(prompt: Sequence[Any], response: str) -> list[tuple[str, str]]:
  """A HealthBench prompt plus a completion as the conversation to grade."""
  return _pairs(prompt) + [("assistant", response)]
