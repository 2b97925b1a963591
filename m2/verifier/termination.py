"""The Termination Gate: after each doctor turn, is the consultation over, and why.

Reasons (checked in this order):
- "diagnosis_and_plan": the doctor states a diagnosis and a plan (or AgentClinic's
  "DIAGNOSIS READY:" marker);
- "doctor_loop": the doctor repeats a question already asked `loop_repeats` times
  (term-set Jaccard >= `loop_similarity`), i.e. is stuck;
- "concerns_addressed": the doctor has explained or given a plan at some turn and
  now closes ("take care", "any other questions" answered, goodbye);
- "turn_budget": `max_turns` doctor turns were used.
"""

from __future__ import annotations

import dataclasses
import re

from m2.verifier import text

REASONS = ("diagnosis_and_plan", "doctor_loop", "concerns_addressed", "turn_budget")

_READY_RE = re.compile(r"\bdiagnosis ready\b", re.I)
_DX_RE = re.compile(r"\b(you have|you've got|you likely have|most likely (have|is|due to|"
                    r"caused by)|(the |my |your |working |final )?diagnosis is|i (think|believe|"
                    r"suspect) (this|it|you) (is|have|has)|this (looks|sounds) like|consistent with|"
                    r"suggestive of|caused by)\b", re.I)
_PLAN_RE = re.compile(r"\b(we('ll| will)|i('ll| will)|i recommend|i('d| would) (like|recommend)|"
                      r"treat\w*|prescrib\w*|start (you )?on|therapy|refer\w*|follow[- ]up|"
                      r"surgery|medication|admit\w*|plan)\b", re.I)
_EXPLAIN_RE = re.compile(r"\b(this (means|is)|because|the cause|what's happening|explain)\b",
                         re.I)
_SENTENCE_RE = re.compile(r"[^.!?\n]+[.!?]*")
_CLOSE_RE = re.compile(r"\b(take care|goodbye|good-bye|bye|see you|that's all|we're done|"
                       r"come back if|get well)\b", re.I)


@dataclasses.dataclass
class Decision:
  done: bool
  reason: str | None = None


class TerminationGate:
  def __init__(self, max_turns: int = 12, loop_repeats: int = 2, loop_similarity: float = 0.8):
    if max_turns < 1:
      raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    self.max_turns, self.loop_repeats, self.loop_similarity = (max_turns, loop_repeats,
                                                               loop_similarity)
    self.doctor_turns: list[frozenset[str]] = []
    self.explained = False

  def reset(self):
    self.doctor_turns, self.explained = [], False

  def observe(self, doctor_turn: str) -> Decision:
    """Records the doctor's turn and decides."""
    terms = text.term_set(doctor_turn)
    repeats = sum(1 for t in self.doctor_turns
                  if terms and t and len(terms & t) / len(terms | t) >= self.loop_similarity)
    self.doctor_turns.append(terms)
    # A diagnosis or a plan is stated, not asked ("Do you take any medication?").
    statements = " ".join(s for s in _SENTENCE_RE.findall(doctor_turn)
                          if not s.rstrip().endswith("?"))
    dx = bool(_DX_RE.search(statements))
    plan = bool(_PLAN_RE.search(statements))
    if _READY_RE.search(doctor_turn) or (dx and plan):
      return Decision(True, "diagnosis_and_plan")
    if repeats >= self.loop_repeats:
      return Decision(True, "doctor_loop")
    closing = bool(_CLOSE_RE.search(doctor_turn))
    if closing and (self.explained or plan or dx):
      return Decision(True, "concerns_addressed")
    self.explained |= dx or plan or bool(_EXPLAIN_RE.search(doctor_turn))
    if len(self.doctor_turns) >= self.max_turns:
      return Decision(True, "turn_budget")
    return Decision(False)
