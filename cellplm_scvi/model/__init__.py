"""User-facing scvi-tools models and the official fine-tuning recipes."""

from ._cellplm import CellPLM
from ._official import (
    ANNOTATION_OVERRIDES,
    IMPUTATION_OVERRIDES,
    annotation_recipe,
    imputation_recipe,
    select_official_hvgs,
)
from ._training_plan import CellPLMTrainingPlan

__all__ = [
    "ANNOTATION_OVERRIDES",
    "IMPUTATION_OVERRIDES",
    "CellPLM",
    "CellPLMTrainingPlan",
    "annotation_recipe",
    "imputation_recipe",
    "select_official_hvgs",
]
