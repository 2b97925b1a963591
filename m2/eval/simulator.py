r"""Quality of the patient simulator on the shipped cases, with scripted doctor probes.

  python -m m2.eval.simulator --cases=agentclinic,mediq --limit=100
  python -m m2.eval.simulator --backend=model --limit=8        # tiny random model (or --hf_checkpoint)
  python -m m2.eval.simulator --rubric_quality                 # rubric generator vs HealthBench
  python -m m2.eval.simulator --rubric_quality --rubric_generator=model --examples=16
  python -m m2.eval.simulator --grader_sanity                  # ideal vs empty/generic answers

Per case a persona is sampled (seed `--seed`), and three scripted consultations run:

1. main script: leakage probes first (diagnosis, test results, exam findings, all
   before anything is examined or ordered), then history questions, an exam
   request, a test order naming the case's first test, and finally a diagnosis
   with a plan (the gate must end here);
2. loop script: the same question three times (the gate must end on the third);
3. budget script: distinct questions until `--max_turns` (the gate must end there).

Metrics:
  leakage_rate          leak-probe replies that state the diagnosis (its distinctive words)
                        or a locked finding's distinctive numbers/words; an independent check
                        (not the Fact Unit's); goal 0
  fact_consistency      accepted patient replies that pass the Fact Unit check (circular: the
                        Fact Unit accepted them)
  fact_consistency_independent
                        the same replies by `independent_consistency`: no number outside the
                        record (small counts aside), no symptom the record does not name, no
                        contradiction of its polarity; with reasons and a few examples
  rejection_rate        Fact Unit rejections / drafts (the backend's invented or leaking text)
  fallback_rate         replies replaced by the reference rendering after max_retries
  persona_adherence     persona constraints met (terse <= 25 words, introverts neither
                        volunteer nor ask, extraverts ask at least once, low literacy uses no
                        jargon, anxious patients voice worry at least once)
  termination_precision turns the gate ended that the script labels as an end
  termination_recall    labelled ends the gate ended (with the right reason)
  mean_turns            doctor turns per main-script consultation (fixed by the script: the
                        gate must not end it early)
  persona_voice         per persona group (E/I, verbosity): words per reply, volunteering
                        and question rates (the voice must differ measurably)
  personas              the sampled personas: counts by MBTI type, axis, emotion, literacy,
                        verbosity
  sources               per source: loaded, skipped, with a diagnosis, used, and what the
                        de-identification gate replaced (by category)
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time

from m2.data.loaders import load_agentclinic, load_mediq
from m2.verifier import lexicon, text
from m2.verifier.patient import BatchConsultation, ModelPatientBackend, ReferencePatientBackend
from m2.verifier.persona import LAY_TERMS, lay_words, persona_summary, sample_persona
from m2.verifier.rubrics import test_name

LEAK_PROBES = ("What do you think you have?", "What is your diagnosis?",
               "What did your blood tests show?", "Do you know your test results?",
               "What did the doctor find when examining you?")
HISTORY_PROBES = ("What brings you in today?", "How long has this been going on?",
                  "Any other symptoms?", "Do you have any past medical problems?",
                  "Do you take any medications?", "Do you smoke or drink alcohol?",
                  "Does anyone in your family have similar problems?")
BUDGET_PROBES = ("Where exactly is the problem?", "Has anything made it better?",
                 "Has anything made it worse?", "Have you travelled recently?",
                 "Any allergies?", "How is your sleep?", "How is your appetite?",
                 "Any recent stress at work?", "Have you had this before?",
                 "Any fevers or chills?", "Any weight changes?", "Any recent injuries?",
                 "How is your mood?", "Do you exercise?", "Any vision changes?")
_WORRY_RE = re.compile(r"\b(worried|scared|nervous|afraid)\b", re.I)
_GENERIC = text.term_set("syndrome disease disorder infection acute chronic")


def independent_leak(case, reply: str, unlocked_ids: set[str]) -> bool:
  visible = set().union(*(text.term_set(f.statement) for f in case.visible_facts))
  low = reply.lower()
  rterms = text.term_set(reply)
  for f in case.hidden_facts:
    if f.id in unlocked_ids:
      continue
    distinct = text.term_set(f.text) - visible - _GENERIC - lexicon.EVERYDAY_WORDS
    if f.category == "diagnosis":
      if f.text.lower() in low or distinct & rterms:
        return True
    elif f.category in ("physical_exam", "test_result"):
      nums = {n for n in text.numbers(f.statement) if len(n) >= 2 or "." in n}
      nums -= set().union(*(text.numbers(v.statement) for v in case.visible_facts))
      if nums & text.numbers(reply):
        return True
  return False


# Persona affect ("I'm really worried") is the voice, not a symptom claim.
_AFFECT_RE = re.compile(r"\b(worried|worry|worrying|scared|nervous|afraid|anxious|upset)\b", re.I)
# Lexicon entries that a question or an answer about timing yields, not things a patient has.
_NOT_CLAIMS = frozenset({"durat", "onset", "frequency"})
_SMALL_COUNTS = frozenset({"0", "1", "2", "3"})   # "twice", "2 or 3 times": no fact needed


def independent_consistency(case, reply: str, heard: str = "") -> list[str]:
  """Why a patient reply is unfaithful to its case ([] when faithful); independent of the
  Fact Unit (which accepted the reply), so the consistency figure is not circular.

  Judged against the whole record (every fact, in its words and lay words), not against
  what the Fact Unit had unlocked; locked facts are `independent_leak`'s business.
  - number:N     a number in no fact, not the age, not said by the doctor (`heard`), and
                 not a small count (<= 3);
  - symptom:T    a lexicon symptom the reply asserts that no fact names (negated mentions,
                 "no fever", claim nothing and pass);
  - contradicts:T  the reply asserts what the record only denies, or denies what the
                 patient's own facts only assert (an exam finding is not theirs to deny).
  """
  # A fact's text, not its label: "Vital Signs / Temperature: 36.6" claims no fever.
  said = lambda facts: [s for f in facts for s in (f.text, lay_words(f.text))]
  stmts = said(case.facts)
  case_nums = set().union(*(text.numbers(f.statement) for f in case.facts))
  if case.age is not None:
    case_nums.add(str(case.age))
  # Per fact, so that a negation never spans two facts.
  pos = lambda ss: {t for s in ss for t, p in text.polar_terms(s).items() if p}
  case_pos, own_pos = pos(stmts), pos(said(case.visible_facts))
  case_neg = set().union(*(text.negated_terms(s) for s in stmts))
  reasons = [f"number:{n}" for n in sorted(text.numbers(reply) - case_nums - text.numbers(heard)
                                           - _SMALL_COUNTS)]
  for t, asserted in sorted(text.polar_terms(_AFFECT_RE.sub(" ", reply)).items()):
    if t not in lexicon.SYMPTOM_TERMS or t in _NOT_CLAIMS:
      continue
    if asserted and t not in case_pos | case_neg:
      reasons.append(f"symptom:{t}")
    elif asserted and t not in case_pos:
      reasons.append(f"contradicts:{t}")
    elif not asserted and t in own_pos and t not in case_neg:
      reasons.append(f"contradicts:not-{t}")
  return reasons


def load_cases(names, limit: int) -> tuple[list, dict]:
  """The first `limit` cases with a diagnosis per source, de-identified; and counts per source."""
  from m2.data import deid
  cases, counts = [], {}
  for name in names:
    if name == "agentclinic":
      loaded = load_agentclinic(splits=("medqa",))
    elif name == "mediq":
      loaded = load_mediq(policy="skip")
    else:
      raise ValueError(f"unknown case source {name!r}; use agentclinic, mediq")
    usable = [c for c in loaded.records if c.diagnosis]
    # The simulator sees what training saw: de-identified records.
    gated = deid.gate(usable[:limit], purpose="simulator")
    counts[name] = {"loaded": loaded.report.loaded, "skipped": loaded.report.skipped,
                    "with_diagnosis": len(usable), "used": len(gated.records),
                    "deid_changed": gated.report.changed,
                    "deid_replaced": dict(gated.report.counts)}
    cases += gated.records
  return cases, counts


def _script(case) -> list[tuple[str, str | None]]:
  """(doctor turn, expected end reason or None)."""
  tests = case.test_results
  order = (f"I'd like to order {test_name(tests[0])}." if tests
           else "I'd like to order some blood tests, a complete blood count.")
  dx = case.diagnosis or "a condition we can treat"
  turns = [(p, None) for p in LEAK_PROBES + HISTORY_PROBES]
  turns += [("Let me examine you now.", None), (order, None),
            (f"Based on everything, you most likely have {dx}. I will start treatment and "
             f"arrange a follow-up visit.", "diagnosis_and_plan")]
  return turns


def persona_checks(persona, replies: list[tuple[str, dict]]) -> list[bool]:
  checks = []
  if persona.verbosity == "terse":
    checks += [len(r.split()) <= 25 for r, _ in replies]
  if not persona.extravert:
    checks += [not info.get("volunteered") and "?" not in r for r, info in replies]
  else:
    checks.append(any("?" in r for r, _ in replies))
  if persona.literacy == "low":
    jargon = re.compile(r"\b(" + "|".join(map(re.escape, LAY_TERMS)) + r")\b", re.I)
    checks += [not jargon.search(r) for r, _ in replies]
  if persona.emotion == "anxious":
    checks.append(any(_WORRY_RE.search(r) for r, _ in replies))
  return checks


def evaluate(cases, backend, *, seed: int = 0, max_turns: int = 12, max_retries: int = 2,
             batch_size: int = 16) -> dict:
  counts = collections.Counter()
  adherence: list[bool] = []
  turns_used = []
  voice = collections.defaultdict(collections.Counter)   # persona group -> reply counts
  stats_total = None
  all_personas = []
  examples = []   # a few replies the independent check rejects, for the report
  for start in range(0, len(cases), batch_size):
    chunk = cases[start:start + batch_size]
    personas = [sample_persona(c, seed) for c in chunk]
    all_personas += personas
    # 1. main script
    env = BatchConsultation(backend, max_turns=len(_script(chunk[0])) + 5,
                            max_retries=max_retries, persona_seed=seed)
    env.reset(chunk, personas)
    scripts = [_script(c) for c in chunk]
    replies = [[] for _ in chunk]
    for t in range(max(len(s) for s in scripts)):
      turns = [s[t][0] if t < len(s) and not env.sims[i].done else None
               for i, s in enumerate(scripts)]
      for i, res in enumerate(env.step(turns)):
        if res is None:
          continue
        msg, done, info = res
        expected = scripts[i][t][1]
        counts["turns_labelled_end"] += expected is not None
        counts["turns_gate_ended"] += done
        counts["true_ends"] += done and expected is not None and info["done_reason"] == expected
        if msg.role != "user":
          continue
        sim = env.sims[i]
        counts["replies"] += 1
        counts["consistent"] += sim.check(msg.content).ok
        heard = " ".join(m.content for m in sim.transcript if m.role == "assistant")
        why = independent_consistency(sim.case, msg.content, heard)
        counts["independent_consistent"] += not why
        counts.update(f"why:{r.split(':')[0]}" for r in why)
        if why and len(examples) < 3:
          examples.append({"case": sim.case.id, "reply": msg.content, "reasons": why})
        if scripts[i][t][0] in LEAK_PROBES:
          counts["leak_probes"] += 1
          counts["leaks"] += independent_leak(sim.case, msg.content, sim.facts.unlocked)
        if not done:
          replies[i].append((msg.content, info))
    for i, sim in enumerate(env.sims):
      turns_used.append(sim.turn)
      adherence += persona_checks(personas[i], replies[i])
      for group in ("E" if personas[i].extravert else "I", personas[i].verbosity):
        v = voice[group]
        for r, info in replies[i]:
          v["replies"] += 1
          v["words"] += len(r.split())
          v["volunteered"] += bool(info.get("volunteered"))
          v["questions"] += "?" in r
    s = env.stats()
    if stats_total is None:
      stats_total = s
    else:
      stats_total.merge(s)
    # 2. loop script and 3. budget script
    for kind in ("loop", "budget"):
      env = BatchConsultation(backend, max_turns=max_turns, max_retries=max_retries,
                              persona_seed=seed)
      env.reset(chunk, personas)
      n = 3 if kind == "loop" else max_turns
      for t in range(n):
        q = "Do you have a fever?" if kind == "loop" else BUDGET_PROBES[t % len(BUDGET_PROBES)]
        expected = ("doctor_loop" if t == 2 else None) if kind == "loop" else \
            ("turn_budget" if t == max_turns - 1 else None)
        res = env.step([None if s.done else q for s in env.sims])
        for r in res:
          if r is None:
            continue
          _, done, info = r
          counts["turns_labelled_end"] += expected is not None
          counts["turns_gate_ended"] += done
          counts["true_ends"] += done and info["done_reason"] == expected
      stats_total.merge(env.stats())
  summary = stats_total.summary()
  return {
      "cases": len(cases), "backend": backend.name,
      "leakage_rate": counts["leaks"] / max(1, counts["leak_probes"]),
      "leak_probes": counts["leak_probes"],
      "fact_consistency": counts["consistent"] / max(1, counts["replies"]),
      # The same replies by a check that did not accept them (see independent_consistency).
      "fact_consistency_independent": counts["independent_consistent"] / max(1, counts["replies"]),
      "independent_reasons": {k[4:]: v for k, v in sorted(counts.items()) if k.startswith("why:")},
      "independent_examples": examples,
      "rejection_rate": summary["rejection_rate"],
      "fallback_rate": summary["fallbacks"] / max(1, summary["replies"]),
      "rejection_reasons": summary["reasons"],
      "persona_adherence": sum(adherence) / max(1, len(adherence)),
      "termination_precision": counts["true_ends"] / max(1, counts["turns_gate_ended"]),
      "termination_recall": counts["true_ends"] / max(1, counts["turns_labelled_end"]),
      "mean_turns": sum(turns_used) / max(1, len(turns_used)),
      # The voice per persona group: mean words, share of replies that volunteer / ask.
      "persona_voice": {g: {"words": round(v["words"] / v["replies"], 1),
                            "volunteer_rate": round(v["volunteered"] / v["replies"], 3),
                            "question_rate": round(v["questions"] / v["replies"], 3)}
                        for g, v in sorted(voice.items()) if v["replies"]},
      "personas": persona_summary(all_personas),
      "replies": counts["replies"],
  }


GENERIC_ANSWER = "I can't give medical advice. Please talk to a healthcare professional."


def grader_sanity() -> dict:
  """Rates at which the ideal completion beats (ties, loses to) an empty and a generic answer."""
  from m2.data.loaders import load_source
  from m2.verifier.grader import Grader, with_response
  from m2.verifier.rubrics import Rubric
  grader, out = Grader(), {}
  for split in ("oss_eval", "consensus"):
    exs = [e for e in load_source("healthbench", purpose="eval", splits=(split,))[0]
           if e.ideal_completion]
    c = collections.Counter()
    for e in exs:
      r = Rubric.from_healthbench(e)
      ideal, empty, generic = grader.grade_batch(
          [(with_response(e.messages, x), r) for x in (e.ideal_completion, "", GENERIC_ANSWER)])
      for name, other in (("empty", empty), ("generic", generic)):
        c[name, "win" if ideal.score > other.score else
          "tie" if ideal.score == other.score else "loss"] += 1
    out[split] = {"examples": len(exs), **{f"{a}_{b}_rate": round(v / len(exs), 4)
                                           for (a, b), v in sorted(c.items())}}
    print(f"{split:10s} {out[split]}")
  print(json.dumps({"eval": "grader_sanity", **out}))
  return out


def _model_role(args, name: str, max_new_tokens: int):
  """A model role through the sampler: --hf_checkpoint, else a tiny random model."""
  import jax
  from flax import nnx

  from m2.data.tokenizers import ByteTokenizer, load_tokenizer
  from m2.model import Transformer
  from m2.model.config import ModelConfig
  from m2.sampling import Sampler, SamplingParams
  from m2.verifier.backend import ModelRole
  if args.hf_checkpoint:
    from m2.model.hf import load_model
    model = load_model(args.hf_checkpoint)
    tok = load_tokenizer(args.tokenizer or args.hf_checkpoint)
  else:   # a tiny random model: shows that the checks catch invented content
    tok = ByteTokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=1, embed_dim=32, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_position_embeddings=1024)
    model = Transformer(cfg, rngs=nnx.Rngs(jax.random.key(args.seed)))
  return ModelRole(Sampler(model), nnx.state(model), tok, name=name,
                   sampling=SamplingParams(temperature=0.7, max_new_tokens=max_new_tokens),
                   max_prompt_tokens=args.max_prompt_tokens)


def rubric_quality(args) -> dict:
  """The rubric generator (--rubric_generator) against HealthBench's physician rubrics."""
  from m2.data.loaders import load_source
  from m2.verifier.rubrics import (ModelRubricGenerator, ReferenceRubricGenerator,
                                   healthbench_quality)
  gen = (ReferenceRubricGenerator() if args.rubric_generator == "reference" else
         ModelRubricGenerator(_model_role(args, "rubric_generator", args.rubric_new_tokens)))
  out = {"generator": gen.name}
  for split in ("oss_eval", "consensus"):
    exs, _ = load_source("healthbench", purpose="eval", splits=(split,))
    exs = exs[:args.examples] if args.examples else exs
    before = getattr(gen, "fallbacks", 0)
    out[split] = {"examples": len(exs), **healthbench_quality(exs, gen).summary()}
    if gen.name == "model":   # rubrics the model could not write: the reference stood in
      out[split]["fallbacks"] = gen.fallbacks - before
      out[split]["fallback_rate"] = round((gen.fallbacks - before) / max(1, len(exs)), 4)
    print(f"{split:10s} {out[split]}")
  if gen.name == "model":
    s = gen.stats
    out["parse"] = {"lines": s.lines, "accepted": s.accepted, "rejected": s.rejected,
                    "duplicates": s.duplicates, "clamped": s.clamped, "reasons": s.reasons}
    print(f"{'parse':10s} {out['parse']}")
  print(json.dumps({"eval": "rubric_quality", **out}))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default="agentclinic,mediq")
  ap.add_argument("--limit", type=int, default=100, help="cases per source")
  ap.add_argument("--backend", choices=("reference", "model"), default="reference")
  ap.add_argument("--hf_checkpoint", default="")
  ap.add_argument("--tokenizer", default="")
  ap.add_argument("--max_prompt_tokens", type=int, default=256)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max_turns", type=int, default=12)
  ap.add_argument("--max_retries", type=int, default=2)
  ap.add_argument("--rubric_quality", action="store_true",
                  help="instead: the rubric generator (--rubric_generator) against HealthBench's "
                       "physician rubrics (coverage, sign agreement); evaluation only")
  ap.add_argument("--rubric_generator", choices=("reference", "model"), default="reference",
                  help="for --rubric_quality: templated rubrics, or prompted generation by a model "
                       "(--hf_checkpoint, else a tiny random model; unusable output falls back to "
                       "the reference rubric, counted)")
  ap.add_argument("--rubric_new_tokens", type=int, default=256,
                  help="for --rubric_generator=model: tokens generated per rubric")
  ap.add_argument("--examples", type=int, default=0,
                  help="for --rubric_quality: HealthBench examples per split (0: all)")
  ap.add_argument("--grader_sanity", action="store_true",
                  help="instead: how often the reference grader scores HealthBench's ideal "
                       "completion above an empty and a generic answer")
  args = ap.parse_args(argv)
  if args.grader_sanity:
    return grader_sanity()
  if args.rubric_quality:
    return rubric_quality(args)
  cases, sources = load_cases([s.strip() for s in args.cases.split(",") if s.strip()],
                              args.limit)
  backend = ReferencePatientBackend() if args.backend == "reference" else \
      ModelPatientBackend(_model_role(args, "simulator", 48), max_new_tokens=48)
  t0 = time.time()
  result = evaluate(cases, backend, seed=args.seed, max_turns=args.max_turns,
                    max_retries=args.max_retries)
  result["seconds"] = round(time.time() - t0, 1)
  result["sources"] = sources
  for k, v in result.items():
    print(f"{k:24s} {v if not isinstance(v, float) else round(v, 4)}")
  print(json.dumps({"eval": "simulator", **{k: (round(v, 4) if isinstance(v, float) else v)
                                            for k, v in result.items()}}))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
