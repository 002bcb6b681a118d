"""A model built from a data module's registry (e.g. a ``TissueCorpus``) reading an AnnData.

Such a model has no AnnData of its own: its module reads minibatches in vocabulary columns
(the corpus puts every file's counts there). A new AnnData, set up with
:meth:`CellPLM.setup_anndata`, is read the way :meth:`CellPLM.load_official` reads one:

- its genes (``var_names``, or ``var[gene_key]`` of its setup) are aligned to the vocabulary
  with :func:`~cellplm_scvi._genes.align_genes` (Ensembl IDs with or without version, or
  symbols); genes outside the vocabulary are ignored, vocabulary genes it lacks are not decoded;
- the decoder's batch table (the corpus' files/samples) is used through its mean embedding, as
  for official checkpoints, since the AnnData's batches are not the corpus' batches;
- with the spatial encoding on, an AnnData without coordinates gets the learned
  missing-coordinate encoding, as the corpus' files without coordinates;
- its ``measured_genes_key`` (and the genes :meth:`CellPLM.prepare_query_anndata` padded) say
  which genes each of its batches measured.

While a method reads the AnnData (:func:`reads_adata`), the module holds that AnnData's gene
index, measured genes and batch setting (:func:`reading`); they are restored afterwards, so the
corpus' loaders (``dataloader=dm.val_dataloader()``) and ``train(datamodule=dm)`` keep working.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
from anndata import AnnData

from .. import _vocabulary
from ..official._mixin import model_vocabulary

if TYPE_CHECKING:
    from ._cellplm import CellPLM

_READING = "_cellplm_reading_adata"  # model attribute: the AnnData being read, if any
_GENE_STATE = ("embed_index", "matched_columns", "decoder_index", "measured_genes")


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
    gene_index(model, adata)  # no gene in the vocabulary: raise before any work
    return adata


def gene_index(model: CellPLM, adata: AnnData) -> np.ndarray | None:
    """Vocabulary row of each ``adata`` column (-1 outside), as ``load_official`` builds it."""
    manager = model.get_anndata_manager(adata, required=True)
    gene_key = manager.registry["setup_args"].get("gene_key")
    try:
        return _vocabulary.gene_index(adata, model_vocabulary(model), gene_key)
    except ValueError as err:
        raise ValueError(
            f"adata cannot be read by this model: {err} (set gene_key with "
            "CellPLM.setup_anndata(adata, gene_key=...))."
        ) from None


@contextmanager
def _module_reads(model: CellPLM, gene_index, measured, use_batch_covariate: bool):
    """Give the module another column layout (gene index, measured genes) while inside."""
    module = model.module
    saved = {name: getattr(module, name) for name in _GENE_STATE}
    saved_n, saved_batch = module.n_input_genes, module.use_batch_covariate
    device = model.device
    try:
        module._set_gene_index(module.n_vocab, gene_index)  # input columns -> vocabulary
        module.measured_genes = None if measured is None else torch.as_tensor(measured)
        for name in _GENE_STATE:
            if module._buffers.get(name) is not None:
                module._buffers[name] = module._buffers[name].to(device)
        module.use_batch_covariate = use_batch_covariate
        yield
    finally:
        for name in _GENE_STATE:
            module._buffers[name] = saved[name]
        module.n_input_genes, module.use_batch_covariate = saved_n, saved_batch


@contextmanager
def reading(model: CellPLM, adata: AnnData):
    """The module reads ``adata``'s columns while inside (see the module docstring); the
    corpus' batch table is used through its mean embedding."""
    manager = model.get_anndata_manager(adata, required=True)
    index, measured = gene_index(model, adata), _vocabulary.measured_genes(adata, manager)
    no_coords = manager.registry["setup_args"].get("spatial_key") is None
    module = model.module
    with _module_reads(model, index, measured, use_batch_covariate=False):
        setattr(model, _READING, adata)
        if module.use_spatial_pe and no_coords:  # as the corpus' files without coordinates
            module._get_inference_input = functools.partial(_missing_coords, module)
        try:
            yield
        finally:
            module.__dict__.pop("_get_inference_input", None)
            setattr(model, _READING, None)


def _missing_coords(module, tensors: dict, **kwargs) -> dict:
    """Inference input with NaN coordinates (the learned missing-coordinate encoding), as the
    corpus gives the cells of its files without coordinates."""
    out = type(module)._get_inference_input(module, tensors, **kwargs)
    if "x" in out and out.get("coords") is None:
        out["coords"] = torch.full((out["x"].shape[0], 2), float("nan"), device=out["x"].device)
    return out


def training_on(model: CellPLM, datamodule):
    """Context for ``train(datamodule=...)``: a :class:`~cellplm_scvi.data.TissueCorpus`
    yields vocabulary columns and its own measured genes, so a model built on an AnnData (e.g.
    :meth:`CellPLM.load_official`) reads vocabulary columns while it trains on one."""
    from ..data import TissueCorpus

    module = model.module
    if not isinstance(datamodule, TissueCorpus):
        return nullcontext()
    vocabulary = model_vocabulary(model)
    if list(datamodule.vocabulary) != vocabulary:
        raise ValueError(
            f"The corpus' vocabulary ({len(datamodule.vocabulary)} genes) is not the model's "
            f"({len(vocabulary)} genes, in order): build the corpus with "
            "TissueCorpus(files, vocabulary=<the model's vocabulary>), e.g. "
            "vocabulary='20230926_85M' for the official 85M checkpoints."
        )
    if module.embed_index is None and module.measured_genes is None:
        return nullcontext()  # already in vocabulary columns (a registry-built model)
    return _module_reads(model, None, None, module.use_batch_covariate)


def reads_adata(method):
    """Run ``method`` of a registry-built model with the module reading its ``adata``."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.adata is not None or getattr(self, _READING, None) is not None:
            return method(self, *args, **kwargs)
        adata = signature.bind_partial(self, *args, **kwargs).arguments.get("adata")
        if adata is None:  # a dataloader in vocabulary columns, or the error of `validate`
            return method(self, *args, **kwargs)
        validate(self, adata)
        with reading(self, adata):
            return method(self, *args, **kwargs)

    return wrapper


# the public methods that read an AnnData (scvi-tools' mixins' and CellPLM's own)
METHODS = (
    "get_latent_representation",
    "get_elbo",
    "get_reconstruction_error",
    "get_marginal_ll",
    "get_normalized_expression",
    "posterior_predictive_sample",
    "get_likelihood_parameters",
    "get_feature_correlation_matrix",
    "get_latent_library_size",  # differential_expression reads through the ones above
    "predict",
    "impute_genes",
)


def wrap_methods(cls: type) -> None:
    """Make the :data:`METHODS` of ``cls`` read a new AnnData for a registry-built model."""
    for name in METHODS:
        setattr(cls, name, reads_adata(getattr(cls, name)))
