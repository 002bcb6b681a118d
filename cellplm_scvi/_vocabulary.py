"""How an AnnData's columns meet a model's gene vocabulary, and which genes were measured.

- :func:`gene_index`: the vocabulary row of each AnnData column (genes matched by
  :func:`~cellplm_scvi._genes.align_genes`: Ensembl IDs with or without version, or symbols;
  -1 for a gene outside the vocabulary).
- :func:`measured_genes`: which genes each registered batch measured, from
  ``setup_anndata(measured_genes_key=...)`` and the genes ``prepare_query_anndata`` padded.
- :class:`GeneLayout`: both, built once per AnnData a model reads; the tissue loader puts its
  tensors in every minibatch, and the module reads the gene mapping from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.data import AnnDataManager

from ._constants import (
    BATCH_COVARIATE_KEY,
    BATCH_KEY,
    GENE_INDEX_KEY,
    MATCHED_COLUMNS_KEY,
    MEASURED_TABLE_KEY,
)
from ._genes import align_genes

PADDED_VAR = "_cellplm_padded"  # var column: genes prepare_query_anndata added as zeros


def gene_index(
    adata: AnnData, vocabulary: list[str] | None, gene_key: str | None
) -> np.ndarray | None:
    """Vocabulary row of each AnnData column (-1 for genes outside the vocabulary or with a
    missing/empty ``var[gene_key]``, e.g. unmapped orthologs); ``None`` without a vocabulary
    (the columns are the vocabulary)."""
    if vocabulary is None:
        return None
    if gene_key is not None and gene_key not in adata.var:
        raise KeyError(
            f"gene_key={gene_key!r} is not a column of adata.var "
            f"(available: {list(adata.var.columns)})."
        )
    genes = column_genes(adata, gene_key)
    named = np.flatnonzero(genes.notna().to_numpy())
    alignment = align_genes(list(genes.iloc[named]), vocabulary)  # missing: -1
    index = np.full(adata.n_vars, -1, dtype=np.int64)
    index[named[alignment.input_index]] = alignment.vocab_index
    return index


def column_genes(adata: AnnData, gene_key: str | None) -> pd.Series:
    """The gene name of each AnnData column as ``str`` (``var_names``, or ``var[gene_key]``),
    ``None`` where ``var[gene_key]`` is missing or empty."""
    genes = pd.Series(adata.var_names if gene_key is None else adata.var[gene_key], dtype=object)
    named = genes.notna().to_numpy() & (genes.astype(str) != "").to_numpy()
    return pd.Series(np.where(named, genes.astype(str), None), dtype=object)


def padded_genes(adata: AnnData) -> np.ndarray | None:
    """Column positions of the genes ``prepare_query_anndata`` padded, or ``None``."""
    if PADDED_VAR not in adata.var:
        return None
    padded = np.flatnonzero(adata.var[PADDED_VAR].to_numpy(dtype=bool))
    return padded if len(padded) else None


def measured_genes(adata: AnnData, manager: AnnDataManager) -> np.ndarray | None:
    """(n_batch, n_genes) bool from ``adata.varm[measured_genes_key]`` and the genes
    ``prepare_query_anndata`` padded (unmeasured in this AnnData's batches), or ``None`` when
    every batch measured every gene. ``manager``: the AnnData's registration."""
    key = manager.registry["setup_args"].get("measured_genes_key")
    padded = padded_genes(adata)
    if key is None and padded is None:
        return None
    batches = list(manager.get_state_registry(BATCH_KEY).categorical_mapping)
    measured = np.ones((len(batches), adata.n_vars), dtype=bool)
    if key is not None:
        measured &= _measured_table(adata, key, batches)
    if padded is not None:
        codes = manager.get_from_registry(BATCH_KEY)
        present = np.unique(np.asarray(codes).reshape(-1))
        measured[np.ix_(present, padded)] = False
    return measured


def _measured_table(adata: AnnData, key: str, batches: list) -> np.ndarray:
    """(n_batch, n_genes) bool from ``adata.varm[key]`` (columns: batch categories)."""
    table = adata.varm[key]
    if not isinstance(table, pd.DataFrame):
        table = pd.DataFrame(np.asarray(table), index=adata.var_names, columns=batches)
    if len(table) != adata.n_vars:
        raise ValueError(f"adata.varm[{key!r}] must have one row per gene.")
    unknown = sorted(set(map(str, table.columns)) - set(map(str, batches)))
    if unknown:
        raise ValueError(
            f"adata.varm[{key!r}] has columns {unknown} that are not batch_key categories "
            f"({batches})."
        )
    measured = np.ones((len(batches), adata.n_vars), dtype=bool)
    columns = {str(c): c for c in table.columns}  # batch names may be ints or strings
    for i, batch in enumerate(batches):
        if str(batch) in columns:
            measured[i] = table[columns[str(batch)]].to_numpy(dtype=bool)
    empty = [b for b, row in zip(batches, measured) if not row.any()]
    if empty:
        raise ValueError(f"Batches {empty} measure no gene in adata.varm[{key!r}].")
    return measured


@dataclass(frozen=True, eq=False)
class GeneLayout:
    """How the columns of one AnnData meet a model's vocabulary.

    Built once per AnnData (:meth:`of`) and carried by the tissue loader in every minibatch
    (:meth:`tensors`); a minibatch without these entries is in vocabulary columns (a
    :class:`~cellplm_scvi.data.TissueCorpus`, or an AnnData whose genes are the vocabulary).

    Attributes
    ----------
    gene_index
        (G,) int64: the vocabulary row of each column (-1: outside the vocabulary, ignored), or
        ``None`` when the columns are exactly the vocabulary.
    measured
        (n_batch, G) bool: the genes each registered batch measured (:func:`measured_genes`),
        or ``None`` when every batch measured every gene.
    batch_covariate
        ``False`` when the AnnData's batches are not the decoder's batches (a model built from
        a corpus' registry reading a new AnnData): the decoder then uses the mean embedding of
        its batch table, as for official checkpoints.
    missing_coordinates
        Give every cell the learned missing-coordinate encoding (NaN coordinates): a model with
        the spatial encoding reading an AnnData without coordinates, as the corpus gives the
        cells of its files without coordinates.
    """

    gene_index: np.ndarray | None = None
    measured: np.ndarray | None = None
    batch_covariate: bool = True
    missing_coordinates: bool = False

    @classmethod
    def of(
        cls,
        adata: AnnData,
        manager: AnnDataManager,
        vocabulary: list[str] | None,
        gene_key: str | None,
        **reading,
    ) -> GeneLayout:
        """The layout of ``adata`` (registered by ``manager``) for a model with ``vocabulary``
        (``None``: the columns are the vocabulary); ``gene_key``: the ``adata.var`` column of
        gene IDs or symbols (``None``: ``var_names``); ``reading``: ``batch_covariate``,
        ``missing_coordinates``."""
        index = gene_index(adata, vocabulary, gene_key)
        n_vocab = adata.n_vars if vocabulary is None else len(vocabulary)
        return cls.from_index(index, n_vocab, measured_genes(adata, manager), **reading)

    @classmethod
    def from_index(
        cls, index: np.ndarray | None, n_vocab: int, measured: np.ndarray | None, **reading
    ) -> GeneLayout:
        """The layout of a :func:`gene_index` into a vocabulary of ``n_vocab`` genes and a
        :func:`measured_genes` table (an index that is the whole vocabulary in its order
        becomes ``None``)."""
        if index is not None and np.array_equal(index, np.arange(n_vocab)):
            index = None
        return cls(index, measured, **reading)

    @property
    def matched_columns(self) -> np.ndarray | None:
        """Positions of the columns in the vocabulary (those the decoder reconstructs), or
        ``None``: all columns."""
        return None if self.gene_index is None else np.flatnonzero(self.gene_index >= 0)

    @property
    def unmatched_columns(self) -> np.ndarray:
        """Positions of the columns outside the vocabulary (those a wider vocabulary could
        take: :meth:`~cellplm_scvi.CellPLM.extend_vocabulary`); empty when all are in it."""
        if self.gene_index is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.gene_index < 0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The minibatch entries of this layout (the same tensors for every minibatch)."""
        out = {}
        if self.gene_index is not None:
            out[GENE_INDEX_KEY] = torch.as_tensor(self.gene_index)
            out[MATCHED_COLUMNS_KEY] = torch.as_tensor(self.matched_columns)
        if self.measured is not None:
            out[MEASURED_TABLE_KEY] = torch.as_tensor(np.asarray(self.measured, dtype=bool))
        if not self.batch_covariate:
            out[BATCH_COVARIATE_KEY] = torch.tensor(False)
        return out
