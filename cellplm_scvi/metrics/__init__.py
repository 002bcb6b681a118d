"""Scores: of a representation (a cross-validated linear probe, a k-means clustering) and of
perturbation predictions (against the simple baselines they must beat).

Used by the quickstart, the benchmarks and the tests to compare methods on one footing.
"""

from ._embedding import N_FOLDS as N_FOLDS  # the probe's folds, printed by the quickstart
from ._embedding import cluster, linear_probe
from ._perturbation import (
    condition_means,
    evaluate_perturbation,
    perturbation_baselines,
    summarize_perturbation,
)

__all__ = [
    "cluster",
    "condition_means",
    "evaluate_perturbation",
    "linear_probe",
    "perturbation_baselines",
    "summarize_perturbation",
]
