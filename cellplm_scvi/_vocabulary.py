"""How an AnnData's columns meet a model's gene vocabulary, and which genes were measured.

- :func:`gene_index`: the vocabulary row of each AnnData column (genes matched by
  :func:`~cellplm_scvi._genes.align_genes`: Ensembl IDs with or without version, or symbols;
  -1 for a gene outside the vocabulary).
- :func:`measured_genes`: which genes each registered batch measured, from
  ``setup_anndata(measured_genes_key=...)`` and the genes ``prepare_query_anndata`` padded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.data import AnnDataManager

from ._constants import BATCH_KEY
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
    genes = pd.Series(adata.var_names if gene_key is None else adata.var[gene_key], dtype=object)
    named = np.flatnonzero(genes.notna().to_numpy() & (genes.astype(str) != "").to_numpy())
    alignment = align_genes(list(genes.iloc[named].astype(str)), vocabulary)  # missing: -1
    index = np.full(adata.n_vars, -1, dtype=np.int64)
    index[named[alignment.input_index]] = alignment.vocab_index
    return index


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
