"""A model built from a data module's registry (e.g. a ``TissueCorpus``) reading an AnnData.

Such a model has no AnnData of its own: its module reads minibatches in vocabulary columns
(the corpus puts every file's counts there). A new AnnData, set up with
:meth:`CellPLM.setup_anndata`, is read the way :meth:`CellPLM.load_official` reads one, through
its :class:`~cellplm_scvi._vocabulary.GeneLayout` (:func:`gene_layout`), which the model's
loaders put in every minibatch:

- its genes (``var_names``, or ``var[gene_key]`` of its setup) are aligned to the vocabulary
  with :func:`~cellplm_scvi._genes.align_genes` (Ensembl IDs with or without version, or
  symbols); genes outside the vocabulary are ignored, vocabulary genes it lacks are not decoded;
- the decoder's batch table (the corpus' files/samples) is used through its mean embedding, as
  for official checkpoints, since the AnnData's batches are not the corpus' batches;
- with the spatial encoding on, an AnnData without coordinates gets the learned
  missing-coordinate encoding, as the corpus' files without coordinates;
- its ``measured_genes_key`` (and the genes :meth:`CellPLM.prepare_query_anndata` padded) say
  which genes each of its batches measured.

The corpus' own loaders (``dataloader=dm.val_dataloader()``, ``train(datamodule=dm)``) carry
no layout: their columns are the vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anndata import AnnData

from .. import _vocabulary
from .._vocabulary import GeneLayout
from ..official._mixin import model_vocabulary

if TYPE_CHECKING:
    from ._cellplm import CellPLM


def validate(model: CellPLM, adata: AnnData | None) -> AnnData:
    """Register ``adata`` (set up with ``setup_anndata``) with a registry-built ``model``."""
    if adata is None:
        raise ValueError(
            "This model was built from a data module's registry (e.g. TissueCorpus) and has "
            "no AnnData. Pass adata= (an AnnData set up with CellPLM.setup_anndata(adata, "
            "layer=..., gene_key=...); its genes are aligned to the model's vocabulary), or "
            "dataloader=datamodule.val_dataloader()."
        )
    if adata.is_view:
        raise ValueError("adata is a view; pass a copy: adata = adata.copy().")
    manager = model.get_anndata_manager(adata)
    if manager is None:
        manager = type(model)._get_most_recent_anndata_manager(adata)
        if manager is None:
            raise ValueError(
                "adata is not set up: call CellPLM.setup_anndata(adata, layer=..., "
                "gene_key=...) first (a model built from a registry reads any AnnData set up "
                "that way, its genes aligned to the model's vocabulary)."
            )
        model._register_manager_for_instance(manager)
    else:
        manager.validate()
    return adata


def gene_layout(model: CellPLM, adata: AnnData) -> GeneLayout:
    """The layout of ``adata`` (registered with ``model``) for a registry-built ``model``
    (built once per registered AnnData: see ``TissueContextMixin._layout_of``)."""
    manager = model.get_anndata_manager(adata, required=True)
    setup_args = manager.registry["setup_args"]
    vocabulary = model_vocabulary(model)
    try:
        index = _vocabulary.gene_index(adata, vocabulary, setup_args.get("gene_key"))
    except ValueError as err:
        raise ValueError(
            f"adata cannot be read by this model: {err} (set gene_key with "
            "CellPLM.setup_anndata(adata, gene_key=...))."
        ) from None
    return GeneLayout.from_index(
        index,
        len(vocabulary),
        _vocabulary.measured_genes(adata, manager),
        batch_covariate=False,
        missing_coordinates=model.module.use_spatial_pe and setup_args.get("spatial_key") is None,
    )
