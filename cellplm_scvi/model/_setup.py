"""What ``CellPLM.setup_anndata`` checks and writes, :class:`TissueSetupMixin` (a new AnnData
gets its tissue columns before scvi-tools transfers the setup), and what the model reads from
its registry (label names, categorical covariates)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.data._constants import _SCVI_UUID_KEY

from .._constants import (
    CAT_COVS_KEY,
    DEFAULT_TISSUE_OBS,
    INDICES_OBS,
    LABELS_KEY,
    TISSUE_CODE_OBS,
)
from .._validation import check_counts, check_obs_key, check_spatial
from ..pp import assign_tissues
from . import _registry_data

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
    codes = tissue_codes(tissues)
    sizes = np.bincount(codes)
    if (sizes == 1).any():
        logger.warning(
            "%d tissue(s) have a single cell: those cells see no context.", (sizes == 1).sum()
        )
    adata.obs[TISSUE_CODE_OBS] = codes
    adata.obs[INDICES_OBS] = np.arange(adata.n_obs, dtype=np.int64)


def tissue_codes(tissues: pd.Series) -> np.ndarray:
    """(n_cells,) int64 code of each cell's tissue, from a tissue column."""
    return pd.Categorical(tissues.astype(str)).codes.astype(np.int64)


def copy_tissue_codes(adata: AnnData, setup_args: dict) -> None:
    """Tissue codes of a copy of registered data, read again from its tissue column.

    scvi-tools transfers a copy's setup from the copy's ``obs``, whose tissue codes came from
    the original: an edited tissue column (``tissue_key``, or ``obs["cellplm_tissue"]`` of
    computed tissues) would be ignored. Where the column groups the cells otherwise than the
    codes do, the codes are written again from it (computed tissues are not computed again: a
    subset keeps its cells' tissues). Without the column the codes stay.
    """
    column = setup_args.get("tissue_key") or DEFAULT_TISSUE_OBS
    if column not in adata.obs:
        return
    check_obs_key(adata, column, "tissue_key")  # missing values: ValueError
    codes = tissue_codes(adata.obs[column])
    if TISSUE_CODE_OBS in adata.obs:
        old = adata.obs[TISSUE_CODE_OBS].to_numpy(dtype=np.int64)
        pairs = np.unique(np.stack([old, codes]), axis=1).shape[1]
        if pairs == len(np.unique(old)) == codes.max(initial=-1) + 1:
            return  # the same grouping: keep the codes (niche draws are seeded by them)
    adata.obs[TISSUE_CODE_OBS] = codes


_TISSUE_FINGERPRINT_ATTR = "cellplm_tissue_fingerprint"


def tissue_fingerprint(adata: AnnData) -> str:
    """A hash of ``obs["_cellplm_tissue_code"]``: which cells share a tissue."""
    codes = np.ascontiguousarray(adata.obs[TISSUE_CODE_OBS].to_numpy(dtype=np.int64))
    return hashlib.blake2b(codes.tobytes(), digest_size=16).hexdigest()


def record_tissue_codes(manager) -> None:
    """Remember, on an :class:`~scvi.data.AnnDataManager`, the tissues it registered."""
    setattr(manager, _TISSUE_FINGERPRINT_ATTR, tissue_fingerprint(manager.adata))


def check_tissue_codes(manager, adata: AnnData) -> None:
    """Raise ``ValueError`` if ``adata``'s tissues are no longer those ``manager`` registered.

    ``setup_anndata`` run again on a model's AnnData with other arguments rewrites
    ``obs["_cellplm_tissue_code"]``; scvi-tools then replays the model's own registration, which
    would read the new tissues while the model's registry names the old ones. Only the AnnData
    object the manager registered is checked (copies share its id but not its rows).
    """
    expected = getattr(manager, _TISSUE_FINGERPRINT_ATTR, None)
    if expected is None or adata is not manager.adata:
        return
    if TISSUE_CODE_OBS in adata.obs and tissue_fingerprint(adata) == expected:
        return
    args = manager.registry["setup_args"]
    tissue_args = {
        key: args.get(key)
        for key in ("spatial_key", "tissue_key", "library_key", "batch_key", "max_cells")
    }
    raise ValueError(
        "This AnnData's tissues (obs['_cellplm_tissue_code']) changed after the model registered "
        "it: setup_anndata was run on it again with other arguments. The model still uses its "
        f"own setup ({tissue_args}). Either call CellPLM.setup_anndata(adata, "
        "**model.adata_manager.registry['setup_args']) again to restore the model's tissues, or "
        "create a new model on the newly set up AnnData."
    )


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


class TissueSetupMixin:
    """A new AnnData is checked and gets its tissue columns, as ``setup_anndata`` writes them."""

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        """Check a new AnnData and add its tissue columns before scvi-tools transfers the setup."""
        if self.adata is None:  # built from a registry: any AnnData set up with setup_anndata
            adata = _registry_data.validate(self, adata)
            self._layout_of(adata)  # no gene in the vocabulary: raise before any work
            return adata
        if adata is not None and not adata.is_view and self._copy_of_registered(adata):
            copy_tissue_codes(adata, self.adata_manager.registry["setup_args"])
        registered = self.get_anndata_manager(self.adata if adata is None else adata)
        if registered is not None:  # D6: setup_anndata re-run with other arguments
            check_tissue_codes(registered, self.adata if adata is None else adata)
        if adata is not None and not adata.var_names.equals(self.adata.var_names):
            n_diff = (
                (adata.var_names != self.adata.var_names).sum()
                if adata.n_vars == self.adata.n_vars
                else abs(adata.n_vars - self.adata.n_vars)
            )
            raise ValueError(
                f"adata has other genes than the model's AnnData ({n_diff} differ; same names in "
                "the same order are required). Subset/reorder with adata[:, model.adata.var_names]"
                ", or for official checkpoints call CellPLM.load_official(prefix, adata)."
            )
        if adata is not None and self.get_anndata_manager(adata) is None:
            if adata.n_obs == 0:
                raise ValueError("adata has no cells.")
            args = self.adata_manager._registry["setup_args"]
            check_counts(adata, args["layer"])
            if args["spatial_key"] is not None:
                check_spatial(adata, args["spatial_key"])
            write_tissue_columns(
                adata,
                args["spatial_key"],
                args["tissue_key"],
                args["library_key"],
                args["batch_key"],
                args["max_cells"],
            )
        try:
            adata = super()._validate_anndata(adata, copy_if_view=copy_if_view)
        except ValueError as err:
            if "not found" in str(err) and "extend_categories" in str(err):
                raise ValueError(
                    f"{err}\nThis AnnData has a batch_key/labels_key category the model never "
                    "saw. Map it onto the model with CellPLM.load_query_data(adata, model), or "
                    "relabel it to a known category."
                ) from None
            raise
        manager = self.get_anndata_manager(adata)
        if manager is not None and not hasattr(manager, _TISSUE_FINGERPRINT_ATTR):
            record_tissue_codes(manager)  # a transferred setup: the tissues written above
        rows = np.arange(adata.n_obs)  # copies/views of registered data keep a stale index
        if not np.array_equal(adata.obs[INDICES_OBS].to_numpy(), rows):
            adata.obs[INDICES_OBS] = rows
        return adata

    def _copy_of_registered(self, adata: AnnData) -> bool:
        """Whether ``adata`` is a copy of an AnnData this model registered (its scvi-tools id,
        another object); scvi-tools transfers such a copy's setup from its own ``obs``."""
        managers = type(self)._per_instance_manager_store.get(self.id, {})
        manager = managers.get(adata.uns.get(_SCVI_UUID_KEY))
        return manager is not None and manager.adata is not adata
