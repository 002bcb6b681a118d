"""Tissue-level data loading for scvi-tools."""

from ._tissue_loader import TissueBatchSampler, TissueDataLoader, TissueDataset, TissueDataSplitter

__all__ = ["TissueBatchSampler", "TissueDataLoader", "TissueDataSplitter", "TissueDataset"]
