"""Offline datasets: real PBMC counts and a spatial tissue simulated from them."""

from ._pbmc import pbmc68k_counts
from ._simulate import simulate_tissue

__all__ = ["pbmc68k_counts", "simulate_tissue"]
