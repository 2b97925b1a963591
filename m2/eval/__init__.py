"""Evaluation: HealthBench (generation + rubric grading) and simulated consultations."""
