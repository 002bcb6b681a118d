"""User-facing scvi-tools models and the official fine-tuning and pretraining recipes."""

from ..official import (
    ANNOTATION_OVERRIDES,
    IMPUTATION_OVERRIDES,
    PRETRAINING_CORPUS_KWARGS,
    annotation_recipe,
    imputation_recipe,
    pretraining_recipe,
    select_official_hvgs,
)
from ._cellplm import CellPLM
from ._training_plan import CellPLMTrainingPlan

__all__ = [
    "ANNOTATION_OVERRIDES",
    "IMPUTATION_OVERRIDES",
    "PRETRAINING_CORPUS_KWARGS",
    "CellPLM",
    "CellPLMTrainingPlan",
    "annotation_recipe",
    "imputation_recipe",
    "pretraining_recipe",
    "select_official_hvgs",
]
