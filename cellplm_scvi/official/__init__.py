"""The authors' format in one place: official files, :class:`OfficialMixin`
(``load_official``/``save_official``) and the official fine-tuning and pretraining recipes."""

from ._mixin import OfficialMixin
from ._recipes import (
    ANNOTATION_OVERRIDES,
    IMPUTATION_OVERRIDES,
    PRETRAINING_CORPUS_KWARGS,
    annotation_recipe,
    imputation_recipe,
    pretraining_recipe,
    select_official_hvgs,
)

__all__ = [
    "ANNOTATION_OVERRIDES",
    "IMPUTATION_OVERRIDES",
    "PRETRAINING_CORPUS_KWARGS",
    "OfficialMixin",
    "annotation_recipe",
    "imputation_recipe",
    "pretraining_recipe",
    "select_official_hvgs",
]
