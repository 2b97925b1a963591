"""The patient simulator and the Consultation environment.

    sim = PatientSimulator(case, persona=None, backend=ReferencePatientBackend())
    env = Consultation(backend)                       # one consultation
    first = env.reset(case)                           # Message(role="user"): the complaint
    turn, done, info = env.step("How long has this been going on?")
    env.transcript                                    # doctor = "assistant", patient = "user",
                                                      # exam/test results = "measurement"
    batch = BatchConsultation(ModelPatientBackend(role))   # many at once: one decode per step
    firsts = batch.reset(cases)
    results = batch.step(doctor_turns)                # None for rows already done

One patient turn: the Termination Gate sees the doctor's turn first. An exam or
test request is answered by the measurement channel from the case's findings
(role "measurement", so RL can mask it). Otherwise the Fact Unit picks the facts
the question entitles the patient to reveal; the backend writes the reply (the
reference backend: the Affective Unit's persona templates; the model backend: a
prompted model through the sampler); the Fact Unit checks it. A rejected reply is
regenerated (new seed) up to `max_retries` times, then replaced by the
reference rendering; both are counted.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any, Sequence

from m2.data.records import Message, PatientCase
from m2.verifier import persona as persona_lib
from m2.verifier import prompts, text
from m2.verifier.facts import FactUnit, Profile
from m2.verifier.persona import AffectiveUnit, Persona, Rendered, sample_persona
from m2.verifier.termination import Decision, TerminationGate

PATIENT_ROLE, DOCTOR_ROLE, MEASUREMENT_ROLE = "user", "assistant", "measurement"

_TEMPLATE_TERMS = frozenset(text.terms(" ".join(persona_lib.TEMPLATE_TEXTS)))
_CLOSING = "Thank you, doctor."


@dataclasses.dataclass
class ReplyRequest:
  """One patient reply to write: what the Fact Unit allows and the reference rendering."""
  sim: "PatientSimulator"
  kind: str                      # "opening", "answer" or "closing"
  reference: Rendered            # the Affective Unit's reply (reference backend, fallback)
  entitled: tuple[str, ...] = ()
  probe: str = ""


@dataclasses.dataclass
class SimulatorStats:
  replies: int = 0
  drafts: int = 0                # replies written by the backend, retries included
  rejections: int = 0
  fallbacks: int = 0
  measurements: int = 0
  reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def rejection_rate(self) -> float:
    return self.rejections / self.drafts if self.drafts else 0.0

  def merge(self, o: "SimulatorStats"):
    for f in ("replies", "drafts", "rejections", "fallbacks", "measurements"):
      setattr(self, f, getattr(self, f) + getattr(o, f))
    self.reasons.update(o.reasons)

  def summary(self) -> dict:
    return {"replies": self.replies, "drafts": self.drafts, "rejections": self.rejections,
            "rejection_rate": round(self.rejection_rate, 4), "fallbacks": self.fallbacks,
            "measurements": self.measurements, "reasons": dict(self.reasons.most_common(8))}


# ------------------------------------------------------------------ backends

class ReferencePatientBackend:
  """Deterministic: retrieval (BM25 in the Fact Unit) + persona templates."""

  name = "reference"

  def render(self, requests: Sequence[ReplyRequest], attempt: int = 0) -> list[str]:
    return [r.reference.text for r in requests]


class ModelPatientBackend:
  """The simulator role: any m2 model through `ModelRole` (prompts in `prompts.py`)."""

  name = "model"

  def __init__(self, role, max_new_tokens: int = 64):
    self.role, self.max_new_tokens = role, max_new_tokens

  def render(self, requests: Sequence[ReplyRequest], attempt: int = 0) -> list[str]:
    chats, seeds = [], []
    for r in requests:
      sim = r.sim
      known = [p.statement for p in sim.profile.visible] + [
          p.statement for p in sim.profile.hidden if p.id in sim.facts.unlocked]
      entitled = [sim.profile.get(i).statement for i in r.entitled]
      dialogue = [("doctor" if m.role == DOCTOR_ROLE else "patient", m.content)
                  for m in sim.transcript if m.role in (DOCTOR_ROLE, PATIENT_ROLE)]
      if not dialogue or dialogue[-1][0] != "doctor":
        dialogue.append(("doctor", "Hello, what brings you in today?"))
      chats.append(prompts.patient_messages(sim.persona.background, sim.persona.describe(),
                                            sim.persona.voice(), known, dialogue, entitled))
      key = f"{sim.case.id}:{sim.seed}:{len(sim.transcript)}:{attempt}"
      seeds.append(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    return self.role.complete(chats, seeds=seeds, max_new_tokens=self.max_new_tokens)


# ------------------------------------------------------------------ simulator

class PatientSimulator:
  """One patient: Profile + Fact Unit + Affective Unit + Termination Gate."""

  def __init__(self, case: PatientCase, persona: Persona | None = None, backend=None, *,
               seed: int = 0, max_turns: int = 12, max_retries: int = 2):
    self.case, self.seed = case, seed
    self.persona = persona or sample_persona(case, seed)
    self.backend = backend or ReferencePatientBackend()
    self.max_retries = max_retries
    self.profile = Profile(case)
    self.facts = FactUnit(self.profile)
    self.voice = AffectiveUnit(self.persona)
    self.gate = TerminationGate(max_turns)
    self.transcript: list[Message] = []
    self.stats = SimulatorStats()
    self.done, self.done_reason = False, None
    self._template_terms = _TEMPLATE_TERMS | text.term_set(self.persona.background)

  @property
  def turn(self) -> int:
    return sum(m.role == DOCTOR_ROLE for m in self.transcript)

  # The steps below are split so that BatchConsultation can render many replies at once.

  def opening_request(self) -> ReplyRequest:
    chief = self.profile.chief()
    extra = self.facts.volunteerable(exclude=[p.id for p in chief])
    return ReplyRequest(self, "opening", self.voice.opening(chief, extra),
                        tuple(p.id for p in chief))

  def prepare(self, doctor_turn: str) -> tuple[ReplyRequest | None, Message | None, Decision]:
    """Reads the doctor's turn: (reply to write, or a measurement message; the gate's decision)."""
    if self.done:
      raise RuntimeError(f"consultation for {self.case.id} is over ({self.done_reason}); reset it")
    if not isinstance(doctor_turn, str) or not doctor_turn.strip():
      raise ValueError("the doctor's turn must be a non-empty string")
    self.transcript.append(Message(DOCTOR_ROLE, doctor_turn))
    self.facts.observe_doctor(doctor_turn)
    decision = self.gate.observe(doctor_turn)
    if decision.done:
      closing = Rendered(_CLOSING, (), (), False)
      return ReplyRequest(self, "closing", closing), None, decision
    measured = self.facts.measurement(doctor_turn)
    if measured is not None:
      kind, found = measured
      self.stats.measurements += 1
      if found:
        body = "; ".join(p.statement for p in found)
      elif kind == "test":
        body = ("NORMAL READINGS (no abnormal result is recorded for this request; name the "
                "test to get a specific result)")
      else:
        body = "NORMAL READINGS"
      msg = Message(MEASUREMENT_ROLE, f"{kind.upper()} RESULTS: {body}")
      return None, msg, decision
    entitled = self.facts.entitled(doctor_turn)
    probe = self.facts.probe(doctor_turn) if not entitled else ""
    volunteer = self.facts.volunteerable(exclude=[p.id for p in entitled])
    rendered = self.voice.render(entitled, volunteer, turn=self.turn, probe=probe)
    return ReplyRequest(self, "answer", rendered, tuple(p.id for p in entitled), probe), None, \
        decision

  def check(self, reply: str):
    return self.facts.check(reply, self._template_terms)

  def accept(self, request: ReplyRequest, reply: str, info: dict) -> Message:
    said = request.reference.said_fact_ids if info["source"] == "reference" else \
        self._said_by(reply)
    self.facts.mark_revealed(said)
    info["revealed"] = list(said)
    msg = Message(PATIENT_ROLE, reply)
    self.transcript.append(msg)
    self.stats.replies += 1
    return msg

  def _said_by(self, reply: str) -> list[str]:
    rt = text.term_set(reply)
    return [p.id for p in self.profile.visible
            if p.terms and len(p.terms & rt) / len(p.terms) >= 0.5]

  def finish(self, decision: Decision):
    if decision.done:
      self.done, self.done_reason = True, decision.reason


def write_replies(requests: Sequence[ReplyRequest], backend) -> list[tuple[str, dict]]:
  """Renders, checks and regenerates a batch of replies; one backend call per attempt."""
  out: list[tuple[str, dict] | None] = [None] * len(requests)
  infos = [{"rejections": 0, "rejection_reasons": [], "fallback": False, "source": backend.name}
           for _ in requests]
  todo = list(range(len(requests)))
  max_retries = max((r.sim.max_retries for r in requests), default=0)
  for attempt in range(max_retries + 1):
    todo = [i for i in todo if attempt <= requests[i].sim.max_retries]
    if not todo:
      break
    drafts = backend.render([requests[i] for i in todo], attempt)
    still = []
    for i, draft in zip(todo, drafts):
      sim = requests[i].sim
      sim.stats.drafts += 1
      res = sim.check(draft)
      if res.ok:
        out[i] = (draft, infos[i])
      else:
        sim.stats.rejections += 1
        sim.stats.reasons.update(r.split(":")[0] for r in res.reasons)
        infos[i]["rejections"] += 1
        infos[i]["rejection_reasons"].extend(res.reasons)
        still.append(i)
    todo = still
  for i in range(len(requests)):
    if out[i] is None:   # every draft rejected: the reference rendering, counted
      sim = requests[i].sim
      sim.stats.fallbacks += 1
      infos[i]["fallback"], infos[i]["source"] = True, "reference"
      out[i] = (requests[i].reference.text, infos[i])
  return out  # type: ignore[return-value]


# ------------------------------------------------------------------ environments

class BatchConsultation:
  """Many consultations stepped together, so model-backed patients decode in one batch."""

  def __init__(self, backend=None, *, max_turns: int = 12, max_retries: int = 2,
               persona_seed: int = 0):
    self.backend = backend or ReferencePatientBackend()
    self.max_turns, self.max_retries, self.persona_seed = max_turns, max_retries, persona_seed
    self.sims: list[PatientSimulator] = []

  def reset(self, cases: Sequence[PatientCase],
            personas: Sequence[Persona | None] | None = None) -> list[Message]:
    personas = personas or [None] * len(cases)
    if len(personas) != len(cases):
      raise ValueError(f"{len(personas)} personas for {len(cases)} cases")
    self.sims = [PatientSimulator(c, p, self.backend, seed=self.persona_seed,
                                  max_turns=self.max_turns, max_retries=self.max_retries)
                 for c, p in zip(cases, personas)]
    reqs = [s.opening_request() for s in self.sims]
    msgs = []
    for req, (reply, info) in zip(reqs, write_replies(reqs, self.backend)):
      msgs.append(req.sim.accept(req, reply, info))
    return msgs

  @property
  def done(self) -> list[bool]:
    return [s.done for s in self.sims]

  def step(self, doctor_turns: Sequence[str | None]
           ) -> list[tuple[Message, bool, dict] | None]:
    """One doctor turn per consultation (None: skip that row, e.g. it is done)."""
    if len(doctor_turns) != len(self.sims):
      raise ValueError(f"{len(doctor_turns)} doctor turns for {len(self.sims)} consultations")
    results: list[tuple[Message, bool, dict] | None] = [None] * len(self.sims)
    pending = []
    for i, (sim, turn) in enumerate(zip(self.sims, doctor_turns)):
      if turn is None:
        continue
      req, measurement, decision = sim.prepare(turn)
      base = {"turn": sim.turn, "done_reason": decision.reason}
      if measurement is not None:
        sim.transcript.append(measurement)
        sim.finish(decision)
        results[i] = (measurement, sim.done, {**base, "role": MEASUREMENT_ROLE, "entitled": [],
                                              "revealed": [], "rejections": 0, "fallback": False})
      else:
        pending.append((i, req, decision, base))
    written = write_replies([p[1] for p in pending], self.backend)
    for (i, req, decision, base), (reply, info) in zip(pending, written):
      info = {**base, **info, "role": "patient", "entitled": list(req.entitled),
              "probe": req.probe, "asked_question": req.reference.asked_question,
              "volunteered": list(req.reference.volunteered)}
      msg = req.sim.accept(req, reply, info)
      req.sim.finish(decision)
      results[i] = (msg, req.sim.done, info)
    return results

  def transcripts(self) -> list[list[Message]]:
    return [list(s.transcript) for s in self.sims]

  def stats(self) -> SimulatorStats:
    total = SimulatorStats()
    for s in self.sims:
      total.merge(s.stats)
    return total


class Consultation:
  """One consultation: reset(case) -> the patient's opening; step(doctor) -> (turn, done, info)."""

  def __init__(self, backend=None, **kw: Any):
    self._batch = BatchConsultation(backend, **kw)

  def reset(self, case: PatientCase, persona: Persona | None = None) -> Message:
    return self._batch.reset([case], [persona])[0]

  def step(self, doctor_turn: str) -> tuple[Message, bool, dict]:
    return self._batch.step([doctor_turn])[0]  # type: ignore[return-value]

  @property
  def simulator(self) -> PatientSimulator:
    return self._batch.sims[0]

  @property
  def transcript(self) -> list[Message]:
    return list(self.simulator.transcript)

  @property
  def done(self) -> bool:
    return self.simulator.done
