"""Genes the decoder reconstructs, and their count-scale predictions: :class:`ImputationMixin`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import X_KEY


class ImputationMixin:
    """:attr:`matched_genes` and :meth:`impute_genes` for :class:`~cellplm_scvi.CellPLM`."""

    @property
    def matched_genes(self) -> pd.Index:
        """The AnnData genes found in the model vocabulary (the others are ignored)."""
        return self._decoded_genes(self.adata)

    def _decoded_genes(self, adata: AnnData) -> pd.Index:
        """Names of the AnnData genes the decoder reconstructs (those in the vocabulary)."""
        columns = self._layout_of(adata).matched_columns
        return adata.var_names if columns is None else adata.var_names[columns]

    def impute_genes(
        self,
        gene_list: Sequence[str],
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        library: Literal["measured", "all"] = "measured",
    ) -> pd.DataFrame:
        """Count-scale predictions of ``gene_list`` (e.g. genes a spatial panel did not measure).

        Each cell is decoded from its posterior mean; ``library`` chooses its size factor.

        Parameters
        ----------
        gene_list
            Genes to predict (``var_names`` in the model vocabulary).
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells (default: all).
        batch_size
            Maximum cells per forward pass (``None``: whole tissues).
        library
            ``"measured"`` (default): the decoded means of the genes the cell's batch measured
            (``measured_genes_key`` in :meth:`setup_anndata`) add up to its observed counts,
            the scale at which the imputation objective (official ``NBImputationLoss``) fits
            the model, so predictions of unmeasured genes are on the same scale as the
            measured counts. ``"all"``: the official pipeline's ``predict`` read-out, whose
            size factor spreads the observed counts over *all* decoded genes, unmeasured ones
            included; its predictions are smaller by each cell's share of the decoded mean on
            its measured genes (a factor that varies between cells).

        Returns
        -------
        pandas.DataFrame
            Cells x genes, on the count scale.
        """
        self._refuse_minified("impute_genes")
        if library not in ("measured", "all"):
            raise ValueError(f"library must be 'measured' or 'all', got {library!r}.")
        if library == "measured":
            return self.get_normalized_expression(
                adata, indices, gene_list=gene_list, library_size="observed", batch_size=batch_size
            )
        frequencies = self.get_normalized_expression(
            adata, indices, gene_list=gene_list, library_size=1, batch_size=batch_size
        )  # cells x genes, each cell's decoded genes summing to one
        adata = self._validate_anndata(adata)
        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        x = self.get_from_registry(adata, X_KEY)
        columns = self._layout_of(adata).matched_columns
        x = x[rows] if columns is None else x[rows][:, columns]
        totals = np.asarray(x.sum(1)).reshape(-1, 1)  # observed counts over the decoded genes
        return frequencies * totals
