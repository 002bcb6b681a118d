"""The authors' format in one place: official files (found by release name: the cache, else a
download), :class:`OfficialMixin` (``load_official``/``save_official``) and the official
fine-tuning and pretraining recipes."""

from ._download import OFFICIAL_RELEASES, OfficialRelease, cache_dir, official_files
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
    "OFFICIAL_RELEASES",
    "OfficialRelease",
    "cache_dir",
    "official_files",
    "ANNOTATION_OVERRIDES",
    "IMPUTATION_OVERRIDES",
    "PRETRAINING_CORPUS_KWARGS",
    "OfficialMixin",
    "annotation_recipe",
    "imputation_recipe",
    "pretraining_recipe",
    "select_official_hvgs",
]
