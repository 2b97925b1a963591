r"""HealthBench: generate a response per conversation, grade it against its physician rubric.

  python -m m2.eval.healthbench --checkpoint=runs/tiny/sft --out=runs/tiny/hb_sft
  python -m m2.eval.healthbench --checkpoint=/models/Qwen2.5-1.5B-Instruct \
      --data=../shared/data --subsets=oss_eval --limit=100 --max_new_tokens=512
  # grade again (other grader, or after a grader fix) without generating again:
  python -m m2.eval.healthbench --regrade=runs/tiny/hb_sft --out=runs/tiny/hb_sft_model \
      --grader=model --grader_checkpoint=/models/grader

`--data` is a data directory (the shipped `healthbench_subset/` files, by
`--subsets`) or one HealthBench-format .jsonl file. Responses come from the
policy through `m2.sampling` (greedy by default, batched, prompts rendered
with m2's chat template). Grading is `m2.verifier.grader.Grader`, the HealthBench
protocol (one judgement per criterion), with the `reference` judge (no model),
the `model` judge (a grader checkpoint through the sampler) or, for users who
have one, an OpenAI-compatible `http` endpoint (`--grader_url`, `--grader_model`,
key from $OPENAI_API_KEY); never required.

Outputs in `--out`:
  judgements.jsonl  one line per example: prompt, response, every criterion with
                    its points, tags, verdict and explanation, the example's metrics;
  report.json       simple-evals' format: {"score", "metrics": {name, name:bootstrap_std,
                    name:n_samples}} over overall_score, axis:*, theme:*, cluster:*,
                    plus the run's settings and grader statistics.
HealthBench is evaluation-only: nothing here trains or tunes on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from typing import Sequence

from m2.data.records import HealthBenchExample

log = logging.getLogger(__name__)

JUDGEMENTS_FILE = "judgements.jsonl"
REPORT_FILE = "report.json"


# --------------------------------------------------------------------- data


def load_examples(data: str = "", subsets: Sequence[str] = ("oss_eval",), *,
                  limit: int = 0, policy: str = "skip") -> list[HealthBenchExample]:
  """HealthBench examples from a data dir (by subset) or one .jsonl file, in file order;
  `limit` keeps the first N. Malformed records are counted and logged (`policy="skip"`)."""
  from m2.data import loaders
  if data and os.path.isfile(data):
    examples, skipped = [], 0
    with open(data) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          examples.append(loaders._parse_healthbench(
              json.loads(line), os.path.splitext(os.path.basename(data))[0]))
        except Exception as e:  # noqa: BLE001 - any bad record is a counted skip
          if policy == "raise":
            raise ValueError(f"{data}:{n}: {e}") from e
          skipped += 1
          log.warning("%s:%d: skipped: %s", data, n, e)
    if skipped:
      log.warning("%s: %d malformed record(s) skipped", data, skipped)
  else:
    unknown = sorted(set(subsets) - set(loaders.HEALTHBENCH_FILES))
    if unknown or not subsets:
      raise ValueError(f"HealthBench subsets {unknown or list(subsets)}: choose from "
                       f"{list(loaders.HEALTHBENCH_FILES)}")
    examples = loaders.load_source("healthbench", data or None, policy=policy, purpose="eval",
                                   splits=tuple(subsets)).records
  if not examples:
    raise ValueError(f"no HealthBench examples in {data or 'the default data dir'}")
  return examples[:limit] if limit else examples


# --------------------------------------------------------------------- graders


@dataclasses.dataclass
class HTTPJudgeStats:
  judgements: int = 0
  malformed: int = 0     # replies that did not parse (each retry counts)
  errors: int = 0        # failed requests (each retry counts)
  fallbacks: int = 0     # still no verdict after the retries: judged by the reference judge


class HTTPJudge:
  """An OpenAI-compatible chat-completions endpoint as the judge (optional; never needed).

  Same prompt and verdict parsing as the model judge (`m2.verifier.prompts.grader_messages`,
  `grader.parse_verdict`); requests run `concurrency` at a time; a request that fails or
  does not parse is retried `max_retries` times, then judged by the reference judge and
  counted. The key is read from the environment variable `api_key_env` (never logged).
  """

  name = "http"

  def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
               max_retries: int = 2, concurrency: int = 8, timeout_s: float = 60.0):
    from m2.verifier.grader import ReferenceJudge
    self.url = url.rstrip("/")
    if not self.url.endswith("/chat/completions"):
      self.url += "/chat/completions"
    self.model, self.api_key_env = model, api_key_env
    self.max_retries, self.concurrency, self.timeout_s = max_retries, concurrency, timeout_s
    self.fallback = ReferenceJudge()
    self.stats = HTTPJudgeStats()
    self.name = f"http:{model}"

  def _ask(self, messages) -> str:
    import urllib.request
    body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(self.api_key_env, "")
    if key:
      headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
      return json.loads(response.read())["choices"][0]["message"]["content"]

  def _judge_one(self, item):
    from m2.verifier import prompts
    from m2.verifier.grader import Judgement, parse_verdict
    messages = prompts.grader_messages(item.conversation, item.criterion.rubric_item(),
                                       item.criterion.scope == "dialogue")
    for _ in range(self.max_retries + 1):
      try:
        verdict = parse_verdict(self._ask(messages))
      except Exception as e:  # noqa: BLE001 - network or server errors are counted, retried
        self.stats.errors += 1
        log.warning("http grader: %s: %s", type(e).__name__, e)
        continue
      if verdict is not None:
        return Judgement(verdict["criteria_met"], verdict["explanation"], self.name)
      self.stats.malformed += 1
    return None

  def judge_batch(self, items, idfs=None):
    from concurrent.futures import ThreadPoolExecutor

    from m2.verifier.grader import Judgement
    with ThreadPoolExecutor(self.concurrency) as pool:
      out = list(pool.map(self._judge_one, items))
    idfs = idfs or [None] * len(items)
    for i, j in enumerate(out):
      if j is None:
        self.stats.fallbacks += 1
        ref = self.fallback.judge(items[i], idfs[i])
        out[i] = Judgement(ref.criteria_met, ref.explanation, f"{self.name}->reference")
    self.stats.judgements += len(items)
    return out


def make_grader(kind: str = "reference", *, role=None, max_retries: int = 2,
                url: str = "", model: str = ""):
  """The grader behind one interface: "reference" (deterministic criterion matching),
  "model" (`role`, a `m2.verifier.backend.ModelRole`, judges each criterion) or "http"
  (an OpenAI-compatible endpoint `url` serving `model`)."""
  from m2.verifier import grader as grading
  if kind == "reference":
    return grading.Grader(grading.ReferenceJudge())
  if kind == "model":
    if role is None:
      raise ValueError("--grader=model needs a grader model (--grader_checkpoint)")
    return grading.Grader(grading.ModelJudge(role, max_retries=max_retries))
  if kind == "http":
    if not (url and model):
      raise ValueError("--grader=http needs --grader_url and --grader_model")
    return grading.Grader(HTTPJudge(url, model, max_retries=max_retries))
  raise ValueError(f"--grader must be 'reference', 'model' or 'http', got {kind!r}")


def make_role(policy, *, name: str, max_new_tokens: int, temperature: float = 0.0,
              seed: int = 0, max_prompt_tokens: int = 2048, sampler=None, chat=None):
  """A sampler-backed role (policy, doctor, grader) for a loaded checkpoint. Roles of one
  model can share a `sampler` (its compiled programs); set `role.params` to swap weights."""
  from m2.sampling import Sampler, SamplingParams
  from m2.verifier.backend import ModelRole
  if sampler is None:
    sampler = Sampler.for_config(policy.model_cfg, mesh=policy.mesh, tokenizer=policy.tokenizer,
                                 seed=seed)
  return ModelRole(sampler, policy.params, policy.tokenizer, name=name, chat=chat,
                   max_prompt_tokens=max_prompt_tokens,
                   sampling=SamplingParams(temperature=temperature,
                                           max_new_tokens=max_new_tokens))


# --------------------------------------------------------------------- generate + grade


def _prompt(example: HealthBenchExample) -> list[dict]:
  return [{"role": m.role, "content": m.content} for m in example.messages]


def generate(role, examples: Sequence[HealthBenchExample], batch_size: int = 16,
             progress: bool = True) -> list[str]:
  """One response per example. Batches group prompts of similar length (fewer padded
  tokens, fewer compiled buckets); the responses come back in example order."""
  from tqdm.auto import tqdm
  prompts = [_prompt(e) for e in examples]
  order = sorted(range(len(prompts)), key=lambda i: sum(len(m["content"]) for m in prompts[i]))
  out: list[str | None] = [None] * len(prompts)
  bar = tqdm(total=len(prompts), desc="healthbench generate", disable=None if progress else True)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    for i, text in zip(chunk, role.complete([prompts[i] for i in chunk])):
      out[i] = text
    bar.update(len(chunk))
  bar.close()
  return out  # type: ignore[return-value]


def grade(grader, examples: Sequence[HealthBenchExample], responses: Sequence[str],
          batch_size: int = 16, progress: bool = True) -> list[dict]:
  """Grades every (example, response); returns one record per example with every judgement."""
  from tqdm.auto import tqdm

  from m2.verifier.grader import with_response
  from m2.verifier.rubrics import Rubric
  if len(examples) != len(responses):
    raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
  records = []
  bar = tqdm(total=len(examples), desc="healthbench grade", disable=None if progress else True)
  for start in range(0, len(examples), batch_size):
    chunk = list(range(start, min(start + batch_size, len(examples))))
    rubrics = [Rubric.from_healthbench(examples[i]) for i in chunk]
    results = grader.grade_batch([(with_response(examples[i].messages, responses[i]), r)
                                  for i, r in zip(chunk, rubrics)])
    for i, rubric, result in zip(chunk, rubrics, results):
      e = examples[i]
      records.append({
          "id": e.id, "prompt_id": e.meta.get("prompt_id", e.id), "theme": e.theme,
          "example_tags": list(e.tags), "prompt": _prompt(e), "response": responses[i],
          "score": result.score, "metrics": result.metrics,
          "sanitized": dataclasses.asdict(result.sanitized) if result.sanitized else None,
          "judgements": [{"criterion": c.text, "points": c.points, "tags": list(c.tags),
                          "criteria_met": j.criteria_met, "explanation": j.explanation,
                          "source": j.source}
                         for c, j in zip(rubric.criteria, result.judgements)]})
    bar.update(len(chunk))
  bar.close()
  return records


def report(records: Sequence[dict], *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
  """simple-evals' HealthBench result: per metric the clipped mean over the examples that
  have it, `:bootstrap_std` and `:n_samples`; "score" is the overall clipped mean."""
  from m2.verifier.grader import aggregate
  stats = aggregate([r["metrics"] for r in records], n_bootstrap=n_bootstrap, seed=seed)
  metrics = {}
  for name, s in stats.items():
    metrics[name] = s["mean"]
    metrics[f"{name}:bootstrap_std"] = s["bootstrap_std"]
    metrics[f"{name}:n_samples"] = s["n_samples"]
  return {"score": metrics.get("overall_score"), "metrics": metrics,
          "n_examples": len(records)}


def format_report(result: dict) -> str:
  """Overall, then per axis and per theme: mean ± bootstrap std (n)."""
  m = result["metrics"]
  rows = [("metric", "score", "± std", "n")]
  names = ["overall_score"] + sorted(k for k in m if k.startswith("axis:") and ":" not in k[5:])
  names += sorted(k for k in m if k.startswith("theme:") and ":" not in k[6:])
  for name in names:
    if name in m:
      rows.append((name, f"{m[name]:.4f}", f"{m[name + ':bootstrap_std']:.4f}",
                   str(m[name + ":n_samples"])))
  w = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                             for i, c in enumerate(r)) for r in rows)


def save(out_dir: str, records: Sequence[dict], result: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, JUDGEMENTS_FILE), "w") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)


def load_judgements(path: str) -> list[dict]:
  """The records a run saved (`path`: its --out directory or its judgements.jsonl)."""
  if os.path.isdir(path):
    path = os.path.join(path, JUDGEMENTS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {JUDGEMENTS_FILE} at {path}")
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def grader_stats(grader, since: dict | None = None) -> dict:
  """The grader's counters, or their growth `since` an earlier call (a grader shared by
  several evaluations keeps counting across them)."""
  out = {"judge": grader.judge.name, **dataclasses.asdict(grader.stats),
         "cache_hits": grader.cache.hits, "cache_misses": grader.cache.misses}
  if hasattr(grader.judge, "stats"):
    out["judge_stats"] = dataclasses.asdict(grader.judge.stats)
  if since is not None:
    out = {k: ({n: c - since[k][n] for n, c in v.items()} if isinstance(v, dict)
               else v - since[k] if isinstance(v, int) else v) for k, v in out.items()}
  looked_up = out["cache_hits"] + out["cache_misses"]
  out["cache_hit_rate"] = out["cache_hits"] / looked_up if looked_up else 0.0
  return out


def evaluate(role, grader, examples: Sequence[HealthBenchExample], *, batch_size: int = 16,
             out_dir: str = "", progress: bool = True, settings: dict | None = None) -> dict:
  """Generate, grade, report (and save when `out_dir`): the whole HealthBench run."""
  start, before = time.time(), grader_stats(grader)
  responses = generate(role, examples, batch_size, progress)
  gen_s = time.time() - start
  records = grade(grader, examples, responses, batch_size, progress)
  result = report(records)
  result.update(settings or {}, generate_s=round(gen_s, 2),
                grade_s=round(time.time() - start - gen_s, 2),
                grader=grader_stats(grader, since=before))
  if out_dir:
    save(out_dir, records, result)
  return result


def regrade(saved: str, grader, examples: Sequence[HealthBenchExample], *,
            batch_size: int = 16, out_dir: str = "", progress: bool = True) -> dict:
  """Grades the responses a run saved again (with `grader`) against the examples' rubrics,
  which are looked up by id: the rubric is the data's, not the saved copy."""
  previous = load_judgements(saved)
  by_id = {e.id: e for e in examples}
  missing = [r["id"] for r in previous if r["id"] not in by_id]
  if missing:
    raise ValueError(f"{len(missing)} saved example(s) are not in the data, e.g. {missing[:3]}")
  chosen = [by_id[r["id"]] for r in previous]
  records = grade(grader, chosen, [r["response"] for r in previous], batch_size, progress)
  result = report(records)
  result.update(regraded_from=os.path.abspath(saved), grader=grader_stats(grader))
  changed = sum(a["criteria_met"] != b["criteria_met"]
                for old, new in zip(previous, records)
                for a, b in zip(old["judgements"], new["judgements"]))
  result["changed_judgements"] = changed
  if out_dir:
    save(out_dir, records, result)
  return result


# --------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description="HealthBench generation + rubric grading.")
  p.add_argument("--checkpoint", default="", help="policy: HF folder or m2 stage dir")
  p.add_argument("--data", default="", help="data dir (default $M2_DATA_DIR or ../shared/data) "
                 "or a HealthBench .jsonl file")
  p.add_argument("--subsets", default="oss_eval", help="oss_eval,consensus (data dirs only)")
  p.add_argument("--limit", type=int, default=0, help="first N examples (0: all)")
  p.add_argument("--out", default="", help="output dir (default: <checkpoint>/healthbench)")
  p.add_argument("--tokenizer", default="", help="override the checkpoint's tokenizer")
  p.add_argument("--cache_dir", default="", help="m2 data cache (SentencePiece tokenizers)")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--max_prompt_tokens", type=int, default=2048)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--grader", default="reference", choices=("reference", "model", "http"))
  p.add_argument("--grader_checkpoint", default="", help="--grader=model: HF folder or stage dir")
  p.add_argument("--grader_url", default="", help="--grader=http: OpenAI-compatible base URL")
  p.add_argument("--grader_model", default="", help="--grader=http: model name to request")
  p.add_argument("--regrade", default="", help="a previous run's --out: grade its responses")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

  from m2.train.policy import load_policy
  examples = load_examples(args.data, [s for s in args.subsets.split(",") if s],
                           limit=0 if args.regrade else args.limit)
  role = None
  if args.grader == "model":
    if not args.grader_checkpoint:
      p.error("--grader=model needs --grader_checkpoint")
    judge_policy = load_policy(args.grader_checkpoint, cache_dir=args.cache_dir or None)
    role = make_role(judge_policy, name="grader", max_new_tokens=96,
                     max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
  grader = make_grader(args.grader, role=role, url=args.grader_url, model=args.grader_model)
  if args.regrade:
    out = args.out or os.path.join(args.regrade, f"regrade_{args.grader}")
    result = regrade(args.regrade, grader, examples, batch_size=args.batch_size, out_dir=out)
  else:
    if not args.checkpoint:
      p.error("--checkpoint is required (or --regrade)")
    policy = load_policy(args.checkpoint, tokenizer=args.tokenizer,
                         cache_dir=args.cache_dir or None)
    policy_role = make_role(policy, name="policy", max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, seed=args.seed,
                            max_prompt_tokens=args.max_prompt_tokens)
    out = args.out or os.path.join(args.checkpoint, "healthbench")
    settings = {"checkpoint": os.path.abspath(args.checkpoint), "data": args.data,
                "subsets": args.subsets, "limit": args.limit,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "seed": args.seed}
    result = evaluate(policy_role, grader, examples, batch_size=args.batch_size, out_dir=out,
                      settings=settings)
  print(format_report(result))
  print(f"judgements: {os.path.join(out, JUDGEMENTS_FILE)}; report: "
        f"{os.path.join(out, REPORT_FILE)}")
  return result


if __name__ == "__main__":
  main()
