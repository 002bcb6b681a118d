"""The model's genes: the rows of the embedder's gene table, and new rows for genes outside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._genes import _strip_ensembl, symbol_table
from ..official._mixin import model_vocabulary
from . import _extend

if TYPE_CHECKING:
    from ._cellplm import CellPLM


def _symbols(genes: list[str]) -> list[str]:
    """GENCODE v44 symbol of each Ensembl ID of the CellPLM vocabulary, else the name itself."""
    table = symbol_table()
    by_id = dict(zip(table["ensembl_id"], table["symbol"]))
    return [by_id.get(_strip_ensembl(gene) or gene, gene) for gene in genes]


class GeneEmbeddingMixin:
    """:meth:`get_gene_embeddings` and :meth:`extend_vocabulary` for
    :class:`~cellplm_scvi.CellPLM`."""

    def extend_vocabulary(
        self, genes: Sequence[str] | None = None, train_new_genes_only: bool = False
    ) -> CellPLM:
        """A copy of the model whose vocabulary also holds genes of its AnnData outside it.

        Genes outside the vocabulary (e.g. of a newer annotation, or a targeted panel) are
        otherwise ignored. Each added gene gets a new row of the gene-embedding table and of the
        decoder, appended after the old rows, so that fine-tuning (:meth:`train`) learns to read
        and to decode it (e.g. :meth:`impute_genes` of it in cells that did not measure it). The
        new rows start so that the outputs on the old genes are unchanged: zero embedding rows
        (every latent is exactly the old one) and decoder rows at the NB head's floor, a
        constant mean of ``1.1e-5`` (the old genes' normalized expression keeps its
        proportions; its sum over the old genes shrinks by the new genes' share, which is
        ``1.1e-5`` per new gene relative to the old genes' summed mean). Count-scale outputs of
        the old genes (``library_size="observed"``, :meth:`impute_genes`) do change before
        training: the observed library now counts the new genes too, while the decoder gives
        them almost no share of it. From the floor, the new genes' predictions need many
        optimizer steps to reach their level.

        ``save``/``load`` rebuild the wider model (the vocabulary is an init parameter), and
        :meth:`save_official` writes the extended ``gene_list``, which the official package
        loads. The added genes keep their names (an Ensembl ID loses its version suffix).

        Parameters
        ----------
        genes
            Genes to add: names as in the registered AnnData (``var_names``, or the
            ``gene_key`` column), each outside the vocabulary. ``None``: all of the AnnData's
            genes outside it (those naming a vocabulary gene that another column matched, e.g. a
            symbol next to its own Ensembl ID, are left out).
        train_new_genes_only
            Freeze every parameter but the new rows (gradients of the old rows are zeroed and
            the new rows get no weight decay), as :meth:`load_query_data` does for new batch
            rows: :meth:`train` then leaves the outputs on the old genes as they were. The
            freezing holds for this object only (``load`` gives a model with every parameter
            trainable).

        Returns
        -------
        CellPLM
            A new model on the same AnnData, with the training state (``is_trained_``,
            ``history_``, ...) of this one, which is left unchanged.

        Raises
        ------
        ValueError
            With nothing to add, an empty or duplicated ``genes``, a gene already in the
            vocabulary, a minified AnnData, or a model built from a registry (no AnnData).
        KeyError
            For a gene that is not a gene of the registered AnnData.

        Examples
        --------
        >>> model = cp.CellPLM.load_official("20231027_85M", adata)  # 765 of 800 genes matched
        >>> extended = model.extend_vocabulary()  # 35 new rows
        >>> extended.train(max_epochs=30)
        >>> extended.impute_genes(["MY_NEW_GENE"], indices=cells_without_it)
        """
        return _extend.extend(self, genes, train_new_genes_only)

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
