"""Which backend each verifier role uses, from the experiment config's `verifier` block.

    cfg = configlib.build(VerifierConfig, config.verifier, "config.verifier")
    v = build_verifier(cfg, roles={"grader": ModelRole(...)})   # roles only for "model" backends
    env = v.consultation()                 # BatchConsultation with the simulator backend
    v.rubric_generator.generate(case); v.grader.grade_batch(...)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from m2.verifier.grader import Grader, ModelJudge, ReferenceJudge
from m2.verifier.patient import BatchConsultation, ModelPatientBackend, ReferencePatientBackend
from m2.verifier.rubrics import ModelRubricGenerator, ReferenceRubricGenerator

BACKENDS = ("reference", "model")


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
  simulator: str = "reference"          # patient simulator backend
  rubric_generator: str = "reference"
  grader: str = "reference"
  max_turns: int = 12                   # Termination Gate's turn budget
  fact_retries: int = 2                 # regenerations of a reply the Fact Unit rejects
  grader_retries: int = 2               # re-asks on malformed grader JSON
  persona_seed: int = 0
  judge_threshold: float = 0.6          # reference judge: coverage a short criterion needs
  # A "model" role's weights: an HF folder or an m2 stage directory (m2.train.policy).
  simulator_checkpoint: str = ""
  rubric_generator_checkpoint: str = ""
  grader_checkpoint: str = ""

  def __post_init__(self):
    for name in ("simulator", "rubric_generator", "grader"):
      if getattr(self, name) not in BACKENDS:
        raise ValueError(f"VerifierConfig.{name} must be one of {BACKENDS}, got "
                         f"{getattr(self, name)!r}")
      if getattr(self, name) == "model" and not getattr(self, f"{name}_checkpoint"):
        raise ValueError(f"VerifierConfig.{name}='model' needs {name}_checkpoint")
    for name in ("max_turns",):
      if getattr(self, name) < 1:
        raise ValueError(f"VerifierConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("fact_retries", "grader_retries"):
      if getattr(self, name) < 0:
        raise ValueError(f"VerifierConfig.{name} must be >= 0, got {getattr(self, name)}")
    if not 0 < self.judge_threshold <= 1:
      raise ValueError(f"VerifierConfig.judge_threshold must be in (0, 1], got "
                       f"{self.judge_threshold}")


@dataclasses.dataclass
class Verifier:
  config: VerifierConfig
  patient_backend: object
  rubric_generator: object
  grader: Grader

  def consultation(self, **overrides) -> BatchConsultation:
    kw = dict(max_turns=self.config.max_turns, max_retries=self.config.fact_retries,
              persona_seed=self.config.persona_seed) | overrides
    return BatchConsultation(self.patient_backend, **kw)


def build_verifier(cfg: VerifierConfig, roles: Mapping[str, object] | None = None) -> Verifier:
  """roles: ModelRole per role name ("simulator", "rubric_generator", "grader") for the
  roles whose backend is "model"."""
  roles = dict(roles or {})

  def role(name):
    if name not in roles:
      raise ValueError(f"config.verifier.{name} = 'model' needs a ModelRole for {name!r}")
    return roles[name]

  reference_judge = ReferenceJudge(cfg.judge_threshold)
  patient = (ModelPatientBackend(role("simulator")) if cfg.simulator == "model"
             else ReferencePatientBackend())
  rubric = (ModelRubricGenerator(role("rubric_generator")) if cfg.rubric_generator == "model"
            else ReferenceRubricGenerator())
  judge = (ModelJudge(role("grader"), max_retries=cfg.grader_retries, fallback=reference_judge)
           if cfg.grader == "model" else reference_judge)
  return Verifier(cfg, patient, rubric, Grader(judge))
