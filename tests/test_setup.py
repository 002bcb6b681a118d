"""``CellPLM.setup_anndata``: invalid input refused with a clear error and nothing written, the
model arguments that need coordinates or a known latent, the fields setup writes (and only those),
computed tissues that do not depend on row order.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi

from cellplm_scvi import CellPLM
from tests._anndata_checks import (
    CELLPLM_OBS,
    SCVI_OBS,
    SCVI_UNS,
    assert_data_unchanged,
    snapshot,
    unregistered,
)
from tests._helpers import (
    ARCH,
    FIT,
)

# --------------------------------------------------------------------------------- invalid input


def _nan_counts(a):
    a.layers["counts"].data[3] = np.nan


def _inf_counts(a):
    a.layers["counts"].data[3] = np.inf


def _negative_counts(a):
    a.layers["counts"].data[3] = -2.0


def _lognormalised(a):
    x = a.layers["counts"].copy()
    x = sp.csr_matrix(x.multiply(1e4 / x.sum(1)))
    x.data = np.log1p(x.data)
    a.layers["counts"] = x.astype(np.float32)


def _nan_in_x(a):
    a.X = a.X.copy()
    a.X.data[0] = np.nan


def _coords_nan(a):
    a.obsm["spatial"][5] = np.nan


def _coords_one_column(a):
    a.obsm["spatial"] = a.obsm["spatial"][:, :1]


SETUP = {"layer": "counts", "spatial_key": "spatial", "library_key": "slide", "max_cells": 200}

INVALID = {
    "nan_counts": (_nan_counts, {}, ValueError, r"layers\['counts'\] contains NaN or infinite"),
    "inf_counts": (_inf_counts, {}, ValueError, r"layers\['counts'\] contains NaN or infinite"),
    "negative_counts": (_negative_counts, {}, ValueError, "contains negative values"),
    "lognormalised": (_lognormalised, {}, ValueError, "non-integer values"),
    "nan_in_X": (_nan_in_x, {"layer": None}, ValueError, r"adata\.X contains NaN"),
    "missing_layer": (None, {"layer": "raw"}, KeyError, "layer='raw' is not in adata.layers"),
    "missing_batch_key": (None, {"batch_key": "nope"}, KeyError, "batch_key='nope'"),
    "missing_labels_key": (None, {"labels_key": "nope"}, KeyError, "labels_key='nope'"),
    "missing_library_key": (None, {"library_key": "nope"}, KeyError, "library_key='nope'"),
    "missing_tissue_key": (None, {"tissue_key": "nope"}, KeyError, "tissue_key='nope'"),
    "missing_spatial_key": (None, {"spatial_key": "nope"}, KeyError, "spatial_key='nope'"),
    "coords_nan": (_coords_nan, {}, ValueError, "NaN or infinite coordinates"),
    "coords_n_by_1": (_coords_one_column, {}, ValueError, r"must have shape \(n_cells, 2\)"),
    "empty": ("empty", {}, ValueError, "no cells"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_setup_rejects_invalid_input(slides, case):
    mutate, kwargs, error, match = INVALID[case]
    adata = slides[:0].copy() if mutate == "empty" else slides.copy()
    if callable(mutate):
        mutate(adata)
    before = snapshot(adata)
    with pytest.raises(error, match=match):
        CellPLM.setup_anndata(adata, **{**SETUP, **kwargs})
    assert_data_unchanged(adata, before)
    # a failed setup writes nothing
    assert list(adata.obs.columns) == list(before["obs"].columns)
    assert set(adata.uns) == before["uns"]


def test_missing_values_in_obs_keys_are_rejected(slides):
    adata = slides.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.loc[adata.obs_names[0], "cell_type"] = np.nan
    before = snapshot(adata)
    with pytest.raises(ValueError, match="missing values"):
        CellPLM.setup_anndata(adata, **SETUP, labels_key="cell_type")
    assert_data_unchanged(adata, before)


def test_single_cell_tissue_warns_and_trains(slides, caplog):
    adata = slides.copy()
    tissue = np.where(adata.obs["slide"] == "slide0", "A", "B").astype(object)
    tissue[0] = "solo"
    adata.obs["tissue"] = pd.Categorical(tissue)
    with caplog.at_level(logging.WARNING, logger="cellplm_scvi"):
        CellPLM.setup_anndata(adata, layer="counts", tissue_key="tissue")
    assert any("single cell" in r.getMessage() for r in caplog.records), caplog.text
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=1, train_size=1.0, **FIT)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    z = model.get_latent_representation()
    assert np.isfinite(z).all()
    assert np.abs(z[0]).sum() > 0  # the lone cell was embedded, not left as zeros


def test_spatial_pe_without_coordinates(slides):
    adata = slides.copy()
    CellPLM.setup_anndata(adata, layer="counts", tissue_key="fov")
    with pytest.raises(ValueError, match="spatial_pe=True needs coordinates"):
        CellPLM(adata, spatial_pe=True, **ARCH)
    assert not CellPLM(adata, **ARCH).module.use_spatial_pe


def test_unknown_latent_is_rejected(slides):
    adata = slides.copy()
    CellPLM.setup_anndata(adata, layer="counts", tissue_key="fov")
    with pytest.raises(ValueError, match="latent must be 'gmvae' or 'vae'"):
        CellPLM(adata, latent="flow", **ARCH)


# ---------------------------------------------------------------------------------- side effects


@pytest.mark.parametrize("tissue_key", [None, "fov"])
def test_setup_writes_only_documented_fields(slides, tissue_key):
    adata = slides.copy()
    before = snapshot(adata)
    CellPLM.setup_anndata(
        adata,
        layer="counts",
        batch_key="slide",
        labels_key="cell_type",
        spatial_key="spatial",
        library_key="slide",
        tissue_key=tissue_key,
        max_cells=200,
    )
    assert_data_unchanged(adata, before)
    pd.testing.assert_frame_equal(adata.var, before["var"])
    old = list(before["obs"].columns)
    pd.testing.assert_frame_equal(adata.obs[old], before["obs"])
    written = CELLPLM_OBS if tissue_key is None else CELLPLM_OBS - {"cellplm_tissue"}
    assert set(adata.obs.columns) - set(old) == written | SCVI_OBS
    # assign_tissues also records its parameters in uns["cellplm_tissue"]
    added_uns = SCVI_UNS | ({"cellplm_tissue"} if tissue_key is None else set())
    assert set(adata.uns) - before["uns"] == added_uns
    np.testing.assert_array_equal(adata.obs["_cellplm_indices"], np.arange(adata.n_obs))
    assert adata.obs["_cellplm_tissue_code"].dtype == np.int64


# ------------------------------------------------------------------------------ computed tissues


def _by_name(values: np.ndarray, adata: ad.AnnData) -> pd.DataFrame:
    return pd.DataFrame(values, index=adata.obs_names)


def _tissue_sets(adata: ad.AnnData) -> set[frozenset]:
    groups = adata.obs.groupby("cellplm_tissue", observed=True).groups
    return {frozenset(index) for index in groups.values()}


def test_computed_tissues_do_not_depend_on_row_order(fov_slides):
    setup = {"spatial_key": "spatial", "library_key": "slide", "max_cells": 60}
    adata = fov_slides.copy()
    CellPLM.setup_anndata(adata, **setup)
    shuffled = fov_slides[np.random.default_rng(4).permutation(fov_slides.n_obs)].copy()
    CellPLM.setup_anndata(shuffled, **setup)
    tissues = _tissue_sets(adata)
    assert len(tissues) > 4
    assert tissues == _tissue_sets(shuffled)
    # so the embeddings of an (untrained, eval-mode) model agree cell by cell
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.is_trained_ = True  # random weights suffice; scvi-tools refuses untrained models
    z = _by_name(model.get_latent_representation(), adata)
    transferred = unregistered(fov_slides[np.random.default_rng(5).permutation(fov_slides.n_obs)])
    got = _by_name(model.get_latent_representation(transferred), transferred)
    assert _tissue_sets(transferred) == tissues
    np.testing.assert_allclose(got.to_numpy(), z.loc[got.index].to_numpy(), atol=1e-5)
