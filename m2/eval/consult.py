r"""Simulated consultations on held-out cases: the policy plays the doctor against the simulator.

  python -m m2.eval.consult --checkpoint=runs/tiny/sft --out=runs/tiny/consult_sft
  python -m m2.eval.consult --checkpoint=... --sources=agentclinic --heldout_fraction=0.1 --limit=20

Held-out cases (the split, explicitly): a case is held out when
`m2.data.tfds_builders.is_heldout(case.id, heldout_fraction)` — the same hash of
the record id with which every data stage holds records out of training
(`config.data.heldout_fraction`, 2 % by default). MediQ cases and MediQ QA items
share ids, so a held-out case's vignette is held out of midtraining too. Any stage
that trains on cases must skip these ids (the `eval` stage passes the run's
fraction). Only cases with a known diagnosis are used, in id order.

Each consultation: the simulator (reference or model backend, `m2.verifier.patient`)
opens with the complaint; the policy answers as the doctor (greedy, prompted by
`DOCTOR_SYSTEM`); until the Termination Gate ends it or `max_turns`. Reported:

  diagnostic_accuracy     the doctor's final diagnosis ("DIAGNOSIS READY: X", else the
                          last turn when the gate saw a diagnosis and plan) covers the
                          case's diagnosis terms (share >= `match_threshold`); no
                          diagnosis counts as wrong;
  rubric score            the case's reference rubric graded over the doctor's turns
                          (`m2.verifier.grader`), overall and by dimension (clipped mean,
                          bootstrap std);
  turns                   doctor turns per consultation;
  questions_per_fact      questions the doctor asked / facts the patient revealed;
  leakage                 patient replies that state the diagnosis or a test result the
                          doctor had not obtained (an independent check of what the Fact
                          Unit let through), per reply and per consultation; also the
                          Fact Unit's own rejections (caught leaks) and fallbacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from typing import Callable, Sequence

from m2.data.records import PatientCase

log = logging.getLogger(__name__)

DOCTOR_SYSTEM = (
    "You are a physician in a consultation with a patient. Ask one focused question per turn "
    "about the history and symptoms. You may examine the patient or order a test "
    "(\"REQUEST TEST: <test>\"); results come back as EXAM RESULTS or TEST RESULTS. When you are "
    "confident, write \"DIAGNOSIS READY: <diagnosis>\" and then a short treatment plan.")
CASE_SOURCES = ("agentclinic", "mediq")
EMPTY_TURN = "Could you tell me more?"   # stands in for an empty doctor reply (counted)
_READY_RE = re.compile(r"diagnosis ready\s*[:\-]\s*(.+)", re.I)
RECORDS_FILE = "consultations.jsonl"
REPORT_FILE = "report.json"


# --------------------------------------------------------------------- cases


def diagnosis(case: PatientCase) -> str:
  return next((f.text for f in case.facts if f.category == "diagnosis"), "")


def heldout_cases(sources: Sequence[str] = CASE_SOURCES, heldout_fraction: float = 0.02, *,
                  data_dir: str | None = None, limit: int = 0) -> tuple[list[PatientCase], dict]:
  """The held-out cases with a diagnosis, in id order; and counts per source."""
  from m2.data import deid, loaders
  from m2.data.tfds_builders import is_heldout
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
  chosen, counts = [], {}
  for name in sources:
    records = loaders.load_source(name, data_dir, policy="skip").records
    if not records or not isinstance(records[0], PatientCase):
      raise ValueError(f"source {name!r} holds no patient cases")
    held = [c for c in records if is_heldout(c.id, heldout_fraction)]
    # The simulator sees what training saw: de-identified records.
    held = deid.gate(held, purpose="simulator").records
    usable = [c for c in held if diagnosis(c)]
    counts[name] = {"cases": len(records), "heldout": len(held), "with_diagnosis": len(usable)}
    chosen += usable
  chosen.sort(key=lambda c: c.id)
  if limit:
    chosen = chosen[:limit]
  if not chosen:
    raise ValueError(f"no held-out case with a diagnosis in {list(sources)} at "
                     f"heldout_fraction={heldout_fraction}")
  return chosen, counts


# --------------------------------------------------------------------- scoring (pure)


def stated_diagnosis(doctor_turns: Sequence[str], done_reason: str | None) -> str:
  """The doctor's final diagnosis: the last "DIAGNOSIS READY: X" line, else the last turn
  when the gate ended on a diagnosis and plan; "" when none was given."""
  for turn in reversed(doctor_turns):
    m = _READY_RE.search(turn)
    if m:
      return m.group(1).strip().split("\n")[0]
  if done_reason == "diagnosis_and_plan" and doctor_turns:
    return doctor_turns[-1]
  return ""


def diagnosis_correct(stated: str, truth: str, threshold: float = 0.6) -> bool:
  from m2.verifier import text
  want = text.terms(truth)
  if not stated or not want:
    return False
  return text.coverage(want, text.term_set(stated))[0] >= threshold


def count_questions(turn: str) -> int:
  from m2.verifier import text
  return sum("?" in s for s in text.sentences(turn))


def leaked(case: PatientCase, transcript: Sequence, *, threshold: float = 0.6) -> list[dict]:
  """Patient replies that state what the doctor had not obtained: the diagnosis (its terms,
  unless the doctor said them first) or a test result's numbers (unless a measurement or the
  doctor gave them first)."""
  from m2.verifier import text
  dx_terms = text.terms(diagnosis(case))
  tests = [f for f in case.facts if f.category == "test_result"]
  seen_terms, seen_numbers, out = set(), set(), []
  for i, m in enumerate(transcript):
    role, content = m.role, m.content
    if role != "user":   # the doctor's words and measurement results are fair to repeat
      seen_terms |= text.term_set(content)
      seen_numbers |= text.numbers(content)
      continue
    terms, numbers = text.term_set(content), text.numbers(content)
    new_dx = [t for t in dx_terms if t not in seen_terms]
    if dx_terms and new_dx and text.coverage(dx_terms, terms)[0] >= threshold and set(
        new_dx) & terms:
      out.append({"turn": i, "kind": "diagnosis", "text": content})
    for f in tests:
      hidden = {n for n in text.numbers(f.text) if len(n) >= 2 or "." in n} - seen_numbers
      if hidden & numbers:
        out.append({"turn": i, "kind": "test_result", "fact": f.id, "text": content})
    seen_terms |= terms
    seen_numbers |= numbers
  return out


# --------------------------------------------------------------------- running


def run_consultations(doctor: Callable[[list[list[dict]]], list[str]],
                      cases: Sequence[PatientCase], *, backend=None, max_turns: int = 8,
                      persona_seed: int = 0, batch_size: int = 16,
                      progress: bool = True) -> list[dict]:
  """Plays every case to the end; `doctor` maps chats (system + turns so far, doctor =
  "assistant") to the next doctor turns, one batch per step."""
  from tqdm.auto import tqdm

  from m2.verifier.patient import BatchConsultation
  records = []
  bar = tqdm(total=len(cases), desc="consultations", disable=None if progress else True)
  for start in range(0, len(cases), batch_size):
    chunk = list(cases[start:start + batch_size])
    env = BatchConsultation(backend, max_turns=max_turns, persona_seed=persona_seed)
    env.reset(chunk)
    empty = [0] * len(chunk)
    reasons: list[str | None] = [None] * len(chunk)
    while not all(env.done):
      open_rows = [i for i, d in enumerate(env.done) if not d]
      chats = [_doctor_chat(env.sims[i].transcript) for i in open_rows]
      replies = doctor(chats)
      turns: list[str | None] = [None] * len(chunk)
      for i, reply in zip(open_rows, replies):
        if not reply.strip():
          empty[i] += 1
          reply = EMPTY_TURN
        turns[i] = reply
      for i, result in enumerate(env.step(turns)):
        if result is not None and result[1]:
          reasons[i] = result[2].get("done_reason")
    for i, (case, sim) in enumerate(zip(chunk, env.sims)):
      doctor_turns = [m.content for m in sim.transcript if m.role == "assistant"]
      records.append({
          "case_id": case.id, "diagnosis": diagnosis(case), "persona": dataclasses.asdict(
              sim.persona) if dataclasses.is_dataclass(sim.persona) else str(sim.persona),
          "transcript": [{"role": m.role, "content": m.content} for m in sim.transcript],
          "done_reason": sim.done_reason or reasons[i], "doctor_turns": len(doctor_turns),
          "empty_doctor_turns": empty[i], "revealed": sorted(sim.facts.revealed),
          "questions": sum(count_questions(t) for t in doctor_turns),
          "stated_diagnosis": stated_diagnosis(doctor_turns, sim.done_reason),
          "simulator": sim.stats.summary()})
    bar.update(len(chunk))
  bar.close()
  return records


def score(records: list[dict], cases: Sequence[PatientCase], grader=None, *,
          match_threshold: float = 0.6) -> dict:
  """Adds the per-consultation judgements to `records` (in place) and returns the report."""
  from m2.data.records import Message
  from m2.verifier.grader import Grader, aggregate
  from m2.verifier.rubrics import ReferenceRubricGenerator
  grader = grader or Grader()
  by_id = {c.id: c for c in cases}
  generator = ReferenceRubricGenerator()
  to_grade, owners = [], []
  for k, r in enumerate(records):
    case = by_id[r["case_id"]]
    transcript = [Message(m["role"], m["content"]) for m in r["transcript"]]
    r["correct"] = diagnosis_correct(r["stated_diagnosis"], r["diagnosis"], match_threshold)
    r["leaks"] = leaked(case, transcript)
    r["patient_replies"] = sum(m.role == "user" for m in transcript)
    last = max((i for i, m in enumerate(transcript) if m.role == "assistant"), default=-1)
    if last >= 0:   # graded up to the doctor's last turn (the patient's goodbye is not judged)
      to_grade.append((transcript[:last + 1], generator.generate(case)))
      owners.append(k)
  for k, res in zip(owners, grader.grade_batch(to_grade)):
    records[k]["rubric_score"] = res.score
    records[k]["rubric_by_dimension"] = res.by_dimension()
  metrics = [{"rubric_score": r["rubric_score"],
              **{f"dimension:{d}": v for d, v in r["rubric_by_dimension"].items()}}
             for r in records if "rubric_score" in r]
  n = len(records)
  questions = sum(r["questions"] for r in records)
  revealed = sum(len(r["revealed"]) for r in records)
  replies = sum(r["patient_replies"] for r in records)
  leaky_replies = sum(len({l["turn"] for l in r["leaks"]}) for r in records)
  sim_rejections = sum(r["simulator"]["rejections"] for r in records)
  sim_drafts = sum(r["simulator"]["drafts"] for r in records)
  caught = sum(v for r in records for k, v in r["simulator"]["reasons"].items()
               if k == "leak")
  done = {}
  for r in records:
    done[r["done_reason"] or "unfinished"] = done.get(r["done_reason"] or "unfinished", 0) + 1
  return {
      "consultations": n,
      "diagnostic_accuracy": sum(r["correct"] for r in records) / n,
      "diagnosis_given_rate": sum(bool(r["stated_diagnosis"]) for r in records) / n,
      "rubric": aggregate(metrics) if metrics else {},
      "turns_mean": sum(r["doctor_turns"] for r in records) / n,
      "questions_per_revealed_fact": questions / revealed if revealed else None,
      "questions": questions, "revealed_facts": revealed,
      "leakage_per_reply": leaky_replies / replies if replies else 0.0,
      "leakage_per_consultation": sum(bool(r["leaks"]) for r in records) / n,
      "simulator_caught_leaks": caught, "simulator_rejection_rate":
          sim_rejections / sim_drafts if sim_drafts else 0.0,
      "simulator_fallbacks": sum(r["simulator"]["fallbacks"] for r in records),
      "empty_doctor_turns": sum(r["empty_doctor_turns"] for r in records),
      "done_reasons": done,
  }


def format_report(result: dict) -> str:
  rows = [("diagnostic accuracy", f"{result['diagnostic_accuracy']:.3f}"),
          ("diagnosis given", f"{result['diagnosis_given_rate']:.3f}")]
  for k, s in sorted(result["rubric"].items()):
    rows.append((k.replace("dimension:", "rubric "), f"{s['mean']:.3f} ± {s['bootstrap_std']:.3f}"
                 f" (n={s['n_samples']})"))
  q = result["questions_per_revealed_fact"]
  rows += [("turns / consultation", f"{result['turns_mean']:.2f}"),
           ("questions / revealed fact", "-" if q is None else f"{q:.2f}"),
           ("leakage / reply", f"{result['leakage_per_reply']:.3f}"),
           ("leakage / consultation", f"{result['leakage_per_consultation']:.3f}"),
           ("simulator rejection rate", f"{result['simulator_rejection_rate']:.3f}"),
           ("consultations", str(result["consultations"]))]
  w = max(len(a) for a, _ in rows)
  return "\n".join(f"{a.ljust(w)}  {b}" for a, b in rows)


def _doctor_chat(transcript) -> list[dict]:
  # The doctor model sees the simulator's patient and measurement turns as the user's.
  return [{"role": "assistant" if m.role == "assistant" else "user", "content": m.content}
          for m in transcript]


def evaluate(doctor_role, cases: Sequence[PatientCase], *, backend=None, grader=None,
             max_turns: int = 8, batch_size: int = 16, out_dir: str = "",
             progress: bool = True, settings: dict | None = None) -> dict:
  """Consultations with `doctor_role` (a ModelRole) on `cases`, scored and saved."""
  start = time.time()
  records = run_consultations(doctor_role.complete, cases, backend=backend,
                              max_turns=max_turns, batch_size=batch_size, progress=progress)
  result = score(records, cases, grader)
  result.update(settings or {}, wall_s=round(time.time() - start, 2))
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, RECORDS_FILE), "w") as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
      json.dump(result, f, indent=1, ensure_ascii=False)
  return result


def doctor_role(policy, *, max_new_tokens: int = 96, max_prompt_tokens: int = 2048,
                temperature: float = 0.0, seed: int = 0, sampler=None):
  """The policy as the doctor: greedy, with DOCTOR_SYSTEM as the system prompt."""
  from m2.data.chat import ChatFormat
  from m2.eval.healthbench import make_role
  return make_role(policy, name="doctor", max_new_tokens=max_new_tokens,
                   temperature=temperature, seed=seed, max_prompt_tokens=max_prompt_tokens,
                   sampler=sampler,
                   chat=ChatFormat(policy.tokenizer, thinking_mode="off", system=DOCTOR_SYSTEM))


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description="Simulated consultations on held-out cases.")
  p.add_argument("--checkpoint", required=True, help="policy: HF folder or m2 stage dir")
  p.add_argument("--data", default="", help="data dir (default $M2_DATA_DIR or ../shared/data)")
  p.add_argument("--sources", default=",".join(CASE_SOURCES))
  p.add_argument("--heldout_fraction", type=float, default=0.02,
                 help="the run's config.data.heldout_fraction")
  p.add_argument("--limit", type=int, default=0)
  p.add_argument("--max_turns", type=int, default=8)
  p.add_argument("--max_new_tokens", type=int, default=96)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--simulator", default="reference", choices=("reference", "model"))
  p.add_argument("--simulator_checkpoint", default="")
  p.add_argument("--tokenizer", default="")
  p.add_argument("--cache_dir", default="")
  p.add_argument("--out", default="", help="output dir (default: <checkpoint>/consult)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

  from m2.train.policy import load_policy
  from m2.eval.healthbench import make_role
  from m2.verifier.patient import ModelPatientBackend, ReferencePatientBackend
  cases, counts = heldout_cases([s for s in args.sources.split(",") if s],
                                args.heldout_fraction, data_dir=args.data or None,
                                limit=args.limit)
  backend = ReferencePatientBackend()
  if args.simulator == "model":
    if not args.simulator_checkpoint:
      p.error("--simulator=model needs --simulator_checkpoint")
    sim_policy = load_policy(args.simulator_checkpoint, cache_dir=args.cache_dir or None)
    backend = ModelPatientBackend(make_role(sim_policy, name="simulator", max_new_tokens=64,
                                            temperature=0.7))
  policy = load_policy(args.checkpoint, tokenizer=args.tokenizer,
                       cache_dir=args.cache_dir or None)
  out = args.out or os.path.join(args.checkpoint, "consult")
  result = evaluate(doctor_role(policy, max_new_tokens=args.max_new_tokens), cases,
                    backend=backend, max_turns=args.max_turns, batch_size=args.batch_size,
                    out_dir=out, settings={"checkpoint": os.path.abspath(args.checkpoint),
                                           "cases": counts, "simulator": args.simulator,
                                           "heldout_fraction": args.heldout_fraction})
  print(format_report(result))
  print(f"consultations: {os.path.join(out, RECORDS_FILE)}; report: "
        f"{os.path.join(out, REPORT_FILE)}")
  return result


if __name__ == "__main__":
  main()
