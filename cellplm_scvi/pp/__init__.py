"""Preprocessing: tissue-sized groups of cells ("sentences")."""

from ._tissues import assign_tissues, random_chunks

__all__ = ["assign_tissues", "random_chunks"]
