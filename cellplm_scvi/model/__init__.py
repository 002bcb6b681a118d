"""User-facing scvi-tools models."""

from ._cellplm import CellPLM
from ._training_plan import CellPLMTrainingPlan

__all__ = ["CellPLM", "CellPLMTrainingPlan"]
