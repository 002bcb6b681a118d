"""Query mapping (scArches-style): :class:`QueryMixin`, with scvi-tools' ``ArchesMixin``
argument names.

scvi-tools' own ``ArchesMixin.load_query_data`` freezes by scVI's layer names and would freeze
the new batch rows of CellPLM's decoder tables, so CellPLM keeps its own, thin version.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse as sp
from torch import nn

from .._vocabulary import PADDED_VAR
from ._save_load import read_model_file

if TYPE_CHECKING:
    from ._cellplm import CellPLM

logger = logging.getLogger("cellplm_scvi")


# ArchesMixin options built for scVI's FCLayers/BatchNorm, which CellPLM does not have
_SCVI_ONLY = (
    "freeze_expression",
    "freeze_decoder_first_layer",
    "freeze_batchnorm_encoder",
    "freeze_batchnorm_decoder",
)


@dataclass
class Reference:
    """What query mapping needs from a reference: in memory or read from a saved directory."""

    registry: dict
    init_params: dict
    state_dict: dict
    var_names: list[str]
    history: dict | None
    is_trained: bool


def reference_of(model_cls, reference_model) -> Reference:
    """A :class:`Reference` from a model object or a directory written by ``save``."""
    if isinstance(reference_model, str | os.PathLike):
        path = Path(reference_model)
        path = path / "model.pt" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(
                f"reference_model must be a {model_cls.__name__} or the directory of a saved "
                f"one; {reference_model} is neither."
            )
        state, var_names, attributes = read_model_file(path)
        registry = attributes["registry_"]
        if registry.get("model_name") != model_cls.__name__:
            raise ValueError(f"{path} holds a {registry.get('model_name')!r} model.")
        return Reference(
            registry,
            attributes["init_params_"],
            state,
            list(var_names),
            attributes.get("history_"),
            bool(attributes.get("is_trained_", True)),
        )
    if not isinstance(reference_model, model_cls):
        raise ValueError(
            f"reference_model must be a {model_cls.__name__} or the directory of a saved one, "
            f"got {type(reference_model).__name__}."
        )
    return Reference(
        reference_model.adata_manager.registry,
        reference_model.init_params_,
        reference_model.module.state_dict(),
        list(reference_model.adata.var_names),
        reference_model.history_,
        reference_model.is_trained_,
    )


def align_to_reference(
    adata: AnnData,
    reference_var_names: list[str],
    return_reference_var_names: bool = False,
    inplace: bool = True,
) -> AnnData | list[str] | None:
    """Reorder ``adata``'s genes to the reference's, padding missing ones with zero counts.

    Padded genes are marked in ``adata.var["_cellplm_padded"]``: the query's cells did not
    measure them, so they enter neither the loss nor the library size.
    """
    if return_reference_var_names:
        return list(reference_var_names)
    reference = np.asarray(reference_var_names, dtype=object)
    query_genes = adata.var_names
    if query_genes.has_duplicates:
        raise ValueError("adata.var_names has duplicates; make them unique first.")
    shared = query_genes.isin(reference)
    if not shared.any():
        raise ValueError("adata shares no gene (var_names) with the reference model.")
    missing = reference[~np.isin(reference, query_genes)]
    n_dropped = int((~shared).sum())
    logger.info(
        "prepare_query_anndata: %d of %d reference genes missing from the query (padded with "
        "zeros, treated as unmeasured); %d query genes not in the reference (dropped).",
        len(missing),
        len(reference),
        n_dropped,
    )
    if len(missing) == 0 and n_dropped == 0 and query_genes.equals(reference_var_names):
        return None if inplace else adata.copy()
    x_of = [adata.X] + [adata.layers[k] for k in adata.layers if k is not None]
    order = query_genes.get_indexer(reference)  # -1 for padded genes
    layers = [_reorder(x, order) for x in x_of]
    padded = AnnData(
        X=layers[0],
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=pd.Index(reference_var_names)),
        obsm=dict(adata.obsm),
        obsp=dict(adata.obsp),
        uns=dict(adata.uns),
        layers=dict(zip([k for k in adata.layers if k is not None], layers[1:])),
    )
    padded.var = adata.var.reindex(reference_var_names)  # padded genes: NaN annotations
    padded.var[PADDED_VAR] = order < 0
    for key, table in adata.varm.items():
        padded.varm[key] = _reorder_rows(table, order, reference_var_names)
    if not inplace:
        return padded
    adata._init_as_actual(
        X=padded.X,
        obs=padded.obs,
        var=padded.var,
        uns=padded.uns,
        obsm=padded.obsm,
        obsp=padded.obsp,
        varm=dict(padded.varm),
        layers=dict(padded.layers),
    )
    return None


def _reorder_rows(table, order: np.ndarray, names):
    """Gene-wise ``varm`` table in the new gene order; padded genes get zeros (False)."""
    if hasattr(table, "reindex"):
        return table.reindex(names, fill_value=0)
    table = np.asarray(table)
    out = np.zeros((len(order), *table.shape[1:]), dtype=table.dtype)
    out[order >= 0] = table[order[order >= 0]]
    return out


def _reorder(x, order: np.ndarray):
    """Columns ``order`` of ``x`` (-1: a zero column), keeping sparse matrices sparse."""
    if x is None:
        return None
    keep = order >= 0
    if sp.issparse(x):
        x = sp.csc_matrix(x)
        pick = sp.csr_matrix(
            (np.ones(keep.sum()), (order[keep], np.flatnonzero(keep))),
            shape=(x.shape[1], len(order)),
        )
        return sp.csr_matrix(x @ pick, dtype=x.dtype)
    out = np.zeros((x.shape[0], len(order)), dtype=np.asarray(x).dtype)
    out[:, keep] = np.asarray(x)[:, order[keep]]
    return out


def build_query_model(
    model_cls: type[CellPLM],
    adata: AnnData,
    reference: Reference,
    inplace_subset_query_vars: bool = False,
    accelerator: str = "auto",
    device: int | str = "auto",
    unfrozen: bool = False,
    freeze_dropout: bool = False,
    freeze_classifier: bool = True,
    train_decoder: bool = False,
    **scvi_only,
) -> CellPLM:
    """Build the query model (see :meth:`CellPLM.load_query_data`)."""
    from scvi.model._utils import parse_device_args

    for name, value in scvi_only.items():
        if name not in _SCVI_ONLY:
            raise TypeError(f"load_query_data() got an unexpected argument {name!r}.")
        raise ValueError(
            f"{name}={value!r} is an scVI option (FCLayers/BatchNorm), which CellPLM has not. "
            "CellPLM freezes everything that shapes the embedding; use unfrozen=True, "
            "train_decoder=True, freeze_dropout or freeze_classifier instead."
        )
    if list(adata.var_names) != reference.var_names:
        if not inplace_subset_query_vars:
            raise ValueError(
                "The query's genes differ from the reference model's (names or order). Call "
                "CellPLM.prepare_query_anndata(adata, reference_model) first (pads missing "
                "genes with zeros), or pass inplace_subset_query_vars=True to subset adata."
            )
        if not set(reference.var_names) <= set(adata.var_names):
            raise ValueError(
                "inplace_subset_query_vars=True needs every reference gene in the query; use "
                "CellPLM.prepare_query_anndata(adata, reference_model) to pad missing genes."
            )
        adata._inplace_subset_var(adata.var_names.get_indexer(reference.var_names))
    setup_args = dict(reference.registry["setup_args"])
    model_cls.setup_anndata(
        adata,
        source_registry=reference.registry,
        extend_categories=True,
        allow_missing_labels=True,
        **setup_args,
    )
    params = reference.init_params
    kwargs = {k: v for group in params["kwargs"].values() for k, v in group.items()}
    query = model_cls(adata, **params["non_kwargs"], **kwargs)
    state = query.module.state_dict()
    unknown = sorted(set(state) - set(reference.state_dict))
    if unknown:
        raise ValueError(
            "The reference model has no decoder batch table (it was trained on a single "
            f"batch; new parameters: {unknown[:3]}), so query batches cannot be added. Embed "
            "the query with reference_model.get_latent_representation(adata) instead."
        )
    grown = {}  # covariate tables with new rows: reference rows are copied and frozen
    for key, value in reference.state_dict.items():
        if state[key].shape == value.shape:
            state[key] = value
        else:
            state[key][: value.shape[0]] = value
            grown[key] = value.shape[0]
    query.module.load_state_dict(state)
    _freeze(query.module, grown, unfrozen, train_decoder, freeze_classifier)
    if freeze_dropout:
        for layer in query.module.modules():
            if isinstance(layer, nn.Dropout):
                layer.p = 0.0
    query.is_trained_ = reference.is_trained
    query.history_ = {k: v.copy() for k, v in (reference.history or {}).items()}
    _, _, torch_device = parse_device_args(
        accelerator, device, return_device="torch", validate_single_device=True
    )
    query.to_device(torch_device)
    query.module.eval()
    return query


def _freeze(module, grown: dict, unfrozen: bool, train_decoder: bool, freeze_classifier: bool):
    """Everything frozen except the new rows of grown tables (and what the flags free)."""
    if unfrozen:
        module.requires_grad_(True)
        return
    module.requires_grad_(False)
    for name, param in module.named_parameters():
        if train_decoder and name.startswith("decoder."):
            param.requires_grad_(True)
        elif not freeze_classifier and name.startswith("classifier."):
            param.requires_grad_(True)
        elif name in grown:
            param.requires_grad_(True)
            n_old = grown[name]
            param.register_hook(lambda g, n=n_old: torch.cat([torch.zeros_like(g[:n]), g[n:]]))
            param.no_weight_decay = True  # decoupled decay would still shrink frozen rows


class QueryMixin:
    """Map a query dataset onto a trained reference model (scvi-tools' ``ArchesMixin`` API)."""

    @classmethod
    def prepare_query_anndata(
        cls,
        adata: AnnData,
        reference_model: str | os.PathLike | CellPLM,
        return_reference_var_names: bool = False,
        inplace: bool = True,
    ) -> AnnData | list[str] | None:
        """Align a query's genes to a reference model (scvi-tools' ``ArchesMixin`` recipe).

        Genes are reordered as the reference's; reference genes the query lacks are added as
        zero counts and marked unmeasured (``adata.var["_cellplm_padded"]``), so they enter
        neither the loss nor the library size of the query's cells; query genes the reference
        lacks are dropped. The numbers of padded and dropped genes are logged.

        Parameters
        ----------
        adata
            Query AnnData (raw counts).
        reference_model
            A :class:`CellPLM`, or the directory it was saved to.
        return_reference_var_names
            Only return the reference's gene names.
        inplace
            Modify ``adata`` (default), or return the aligned copy.
        """
        reference = reference_of(cls, reference_model)
        return align_to_reference(adata, reference.var_names, return_reference_var_names, inplace)

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: str | os.PathLike | CellPLM,
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device: int | str = "auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_classifier: bool = True,
        train_decoder: bool = False,
        **kwargs,
    ) -> CellPLM:
        """Map a query dataset onto a trained reference model (scArches-style).

        The query is set up with the reference's setup arguments; new ``batch_key`` categories
        get new rows in the decoder's batch-embedding table. Everything that shapes the
        embedding (gene embedder, Flowformer, pre-latent norm, latent layer, classifier) is
        frozen, so reference cells keep exactly their reference embedding and query cells are
        embedded by the reference encoder. Training then fits only the decoder's embeddings of
        the new batches (and the rest of the decoder with ``train_decoder=True``), which is what
        denoising and imputation of the query need.

        Parameters
        ----------
        adata
            Query AnnData with the reference's genes (see :meth:`prepare_query_anndata`).
        reference_model
            A trained :class:`CellPLM`, or the directory it was saved to.
        inplace_subset_query_vars
            Subset ``adata`` to the reference's genes in place when it has more/reordered genes.
        accelerator, device
            Where to put the query model.
        unfrozen
            Train every parameter.
        freeze_dropout
            Switch dropout off while the query trains.
        freeze_classifier
            Keep the classification head frozen (``False``: fine-tune it too).
        train_decoder
            Also fine-tune the decoder weights shared by all batches.
        **kwargs
            scVI's ``freeze_expression``, ``freeze_decoder_first_layer``,
            ``freeze_batchnorm_encoder``, ``freeze_batchnorm_decoder`` name layers CellPLM has
            not: passing one raises a ``ValueError`` saying what to use.

        Returns
        -------
        CellPLM
            A new model for the query; call :meth:`train` to fit the new batches.
        """
        reference = reference_of(cls, reference_model)
        return build_query_model(
            cls, adata, reference, inplace_subset_query_vars, accelerator, device, unfrozen,
            freeze_dropout, freeze_classifier, train_decoder, **kwargs,
        )  # fmt: skip
