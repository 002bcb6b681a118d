"""The model's learned gene representation: the rows of the embedder's gene table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._genes import _strip_ensembl, symbol_table
from ..official._mixin import model_vocabulary


def _symbols(genes: list[str]) -> list[str]:
    """GENCODE v44 symbol of each Ensembl ID of the CellPLM vocabulary, else the name itself."""
    table = symbol_table()
    by_id = dict(zip(table["ensembl_id"], table["symbol"]))
    return [by_id.get(_strip_ensembl(gene) or gene, gene) for gene in genes]


class GeneEmbeddingMixin:
    """:meth:`get_gene_embeddings` for :class:`~cellplm_scvi.CellPLM`."""

    def get_gene_embeddings(self) -> pd.DataFrame:
        """The gene-embedding table of the model: one learned vector per vocabulary gene.

        A cell's token is the sum of these vectors weighted by ``log1p`` of its counts, so the
        rows are the model's gene representation (e.g. for nearest-neighbour genes, or as gene
        features of another model). Works for official checkpoints
        (:meth:`load_official`) and models trained here.

        Returns
        -------
        pandas.DataFrame
            One row per gene of the model vocabulary, in the table's order, indexed by the
            vocabulary IDs (official checkpoints: human Ensembl IDs; a model trained without
            ``vocabulary``: the registered ``var_names``), with columns

            - ``symbol``: the GENCODE v44 gene symbol where the ID is an Ensembl ID of the
              CellPLM vocabulary, else the ID itself;
            - ``matched``: whether a gene of the registered AnnData matched this row (``False``
              for vocabulary genes the AnnData lacks, or has with a missing ``gene_key``
              value); ``True`` throughout for a model without an AnnData of its own;
            - ``0`` ... ``n_hidden - 1``: the embedding (``float32``), equal to the rows of the
              embedder's table.
        """
        vocabulary = model_vocabulary(self)
        weights = self.module.embedder.feat_enc.emb.detach().float().cpu().numpy()
        matched = np.ones(len(vocabulary), dtype=bool)
        layout = getattr(self, "_gene_layout", None)  # None: the columns are the vocabulary
        if layout is not None and layout.gene_index is not None:
            rows = np.asarray(layout.gene_index)  # AnnData column -> table row, -1 outside
            matched[:] = False
            matched[rows[rows >= 0]] = True
        table = pd.DataFrame(weights, index=pd.Index(vocabulary, name="gene"))
        table.insert(0, "matched", matched)
        table.insert(0, "symbol", _symbols(vocabulary))
        return table
