"""The large verifier system: patient simulator, clinical rubric generator, rubric grader.

Reference backends (no model) and model backends (through `m2.sampling`) share one API;
`build_verifier(VerifierConfig(...))` wires the backends a config names.
"""

from m2.verifier.backend import ModelRole
from m2.verifier.config import Verifier, VerifierConfig, build_verifier
from m2.verifier.grader import (GradeResult, Grader, Judgement, JudgementCache, ModelJudge,
                                ReferenceJudge, aggregate, calculate_score, sanitize)
from m2.verifier.patient import (BatchConsultation, Consultation, ModelPatientBackend,
                                 PatientSimulator, ReferencePatientBackend)
from m2.verifier.persona import Persona, sample_persona
from m2.verifier.rubrics import (Criterion, ModelRubricGenerator, ReferenceRubricGenerator,
                                 Rubric, rubric_quality)

__all__ = ["BatchConsultation", "Consultation", "Criterion", "GradeResult", "Grader", "Judgement",
           "JudgementCache", "ModelJudge", "ModelPatientBackend", "ModelRole",
           "ModelRubricGenerator", "PatientSimulator", "Persona", "ReferenceJudge",
           "ReferencePatientBackend", "ReferenceRubricGenerator", "Rubric", "Verifier",
           "VerifierConfig", "aggregate", "build_verifier", "calculate_score", "rubric_quality",
           "sample_persona", "sanitize"]
