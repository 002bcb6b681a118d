"""What ``CellPLM.setup_anndata`` checks and writes, and what the model reads from its
registry (label names, categorical covariates)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import (
    CAT_COVS_KEY,
    DEFAULT_TISSUE_OBS,
    INDICES_OBS,
    LABELS_KEY,
    TISSUE_CODE_OBS,
)
from .._validation import check_counts, check_obs_key, check_spatial
from ..pp import assign_tissues

logger = logging.getLogger("cellplm_scvi")


def write_tissue_columns(
    adata: AnnData,
    spatial_key: str | None,
    tissue_key: str | None,
    library_key: str | None,
    batch_key: str | None,
    max_cells: int | None,
    recomputed: bool = False,
) -> None:
    """Write the tissue code and row-index bookkeeping columns.

    The tissues are ``adata.obs[tissue_key]``, else computed by
    :func:`~cellplm_scvi.pp.assign_tissues` into ``obs["cellplm_tissue"]``; with
    ``recomputed=True`` (a fresh setup) an existing ``obs["cellplm_tissue"]`` that is computed
    again is logged.
    """
    if tissue_key is not None:
        check_obs_key(adata, tissue_key, "tissue_key")
        tissues = adata.obs[tissue_key]
    else:
        if recomputed and DEFAULT_TISSUE_OBS in adata.obs:
            logger.warning(
                "adata.obs[%r] exists (an earlier setup_anndata or assign_tissues) and is "
                "recomputed now; pass tissue_key=%r to keep it instead.",
                DEFAULT_TISSUE_OBS,
                DEFAULT_TISSUE_OBS,
            )
        assign_tissues(
            adata,
            spatial_key=spatial_key,
            library_key=library_key,
            batch_key=batch_key,
            max_cells=max_cells,
            key_added=DEFAULT_TISSUE_OBS,
        )
        tissues = adata.obs[DEFAULT_TISSUE_OBS]
    codes = pd.Categorical(tissues.astype(str)).codes
    sizes = np.bincount(codes)
    if (sizes == 1).any():
        logger.warning(
            "%d tissue(s) have a single cell: those cells see no context.", (sizes == 1).sum()
        )
    adata.obs[TISSUE_CODE_OBS] = codes.astype(np.int64)
    adata.obs[INDICES_OBS] = np.arange(adata.n_obs, dtype=np.int64)


def check_setup_arguments(
    adata: AnnData,
    layer: str | None,
    *,
    batch_key: str | None = None,
    labels_key: str | None = None,
    library_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    spatial_key: str | None = None,
    gene_key: str | None = None,
    measured_genes_key: str | None = None,
) -> None:
    """Check the arguments of ``CellPLM.setup_anndata`` before anything is written."""
    if adata.is_view:
        raise ValueError(
            "adata is a view; CellPLM writes bookkeeping columns into obs. Pass a copy: "
            "adata = adata.copy()."
        )
    if continuous_covariate_keys:
        raise ValueError(
            "continuous_covariate_keys is not supported: the CellPLM decoder conditions on "
            "categorical covariates only. Bin the covariate and pass it in "
            "categorical_covariate_keys, or leave it out."
        )
    if adata.n_obs == 0:
        raise ValueError("adata has no cells; nothing to set up.")
    if adata.n_vars == 0:
        raise ValueError("adata has no genes; nothing to set up.")
    check_counts(adata, layer)
    for key, argument in [
        (batch_key, "batch_key"),
        (labels_key, "labels_key"),
        (library_key, "library_key"),
        (size_factor_key, "size_factor_key"),
        *((k, "categorical_covariate_keys") for k in categorical_covariate_keys or []),
    ]:
        check_obs_key(adata, key, argument)
    if size_factor_key is not None:
        factors = pd.to_numeric(adata.obs[size_factor_key], errors="coerce").to_numpy()
        if not (np.isfinite(factors) & (factors > 0)).all():
            raise ValueError(
                f"adata.obs[{size_factor_key!r}] (size_factor_key) must hold finite positive "
                "numbers (library sizes)."
            )
    if spatial_key is not None:
        check_spatial(adata, spatial_key)
    if gene_key is not None and gene_key not in adata.var:
        raise KeyError(
            f"gene_key={gene_key!r} is not a column of adata.var "
            f"(available: {list(adata.var.columns)})."
        )
    if measured_genes_key is not None and measured_genes_key not in adata.varm:
        raise KeyError(
            f"measured_genes_key={measured_genes_key!r} is not in adata.varm "
            f"(available: {list(adata.varm)})."
        )


def label_names(registry: dict) -> list[str]:
    """Class names of the registered labels (without the unlabeled category)."""
    if registry["setup_args"].get("labels_key") is None:
        return []
    state = registry["field_registries"][LABELS_KEY]["state_registry"]
    unlabeled = state.get("unlabeled_category")
    return [c for c in state["categorical_mapping"] if c != unlabeled]


def categorical_covariates(registry: dict) -> dict[str, int]:
    """Decoder table name -> levels, one per ``categorical_covariate_keys`` column."""
    if CAT_COVS_KEY not in registry["field_registries"]:
        return {}
    state = registry["field_registries"][CAT_COVS_KEY]["state_registry"]
    return {
        f"cov_{key}".replace(".", "_"): len(state["mappings"][key]) for key in state["field_keys"]
    }
