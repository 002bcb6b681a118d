"""scvi-tools module of CellPLM (pure torch)."""

from ._cellplm import CellPLMModule

__all__ = ["CellPLMModule"]
