"""Tissue-level data loading for scvi-tools."""

from ._corpus import TissueCorpus
from ._tissue_loader import TissueBatchSampler, TissueDataLoader, TissueDataset, TissueDataSplitter

__all__ = [
    "TissueBatchSampler",
    "TissueCorpus",
    "TissueDataLoader",
    "TissueDataSplitter",
    "TissueDataset",
]
