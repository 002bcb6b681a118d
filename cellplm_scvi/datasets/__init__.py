"""Offline datasets: real PBMC counts, a spatial tissue simulated from them, and a
random-weight checkpoint in the official file format."""

from ._pbmc import pbmc68k_counts
from ._random_weights import random_official_checkpoint
from ._simulate import simulate_tissue

__all__ = ["pbmc68k_counts", "random_official_checkpoint", "simulate_tissue"]
