"""Preprocessing: tissue-sized groups of cells ("sentences"), human orthologs of genes."""

from ._orthologs import map_orthologs, ortholog_table
from ._tissues import assign_tissues, random_chunks

__all__ = ["assign_tissues", "map_orthologs", "ortholog_table", "random_chunks"]
