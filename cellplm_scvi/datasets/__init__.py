"""Offline datasets: real PBMC counts, a spatial tissue and a Perturb-seq screen simulated
from them, and a random-weight checkpoint in the official file format."""

from ._pbmc import pbmc68k_counts
from ._perturbation import simulate_perturbation
from ._random_weights import random_official_checkpoint
from ._simulate import simulate_tissue

__all__ = [
    "pbmc68k_counts",
    "random_official_checkpoint",
    "simulate_perturbation",
    "simulate_tissue",
]
