"""Tests of the ``CellPLM`` scvi-tools model: setup, training, embeddings, save/load, errors.

Data are small simulated slides (:func:`cellplm_scvi.datasets.simulate_tissue`, 765 genes) and
networks are tiny, so the whole file runs in well under two minutes on one CPU thread.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch

from cellplm_scvi import CellPLM
from tests._anndata_checks import (
    SCVI_UNS,
    assert_data_unchanged,
    snapshot,
    unregistered,
)
from tests._helpers import ARCH, FIT, simulated_slides

N_CELLS = 800
VAL = {"check_val_every_n_epoch": 1}  # validation loss every epoch
CELLPLM_OBS = {"cellplm_tissue", "_cellplm_tissue_code", "_cellplm_indices"}
SCVI_OBS = {"_scvi_batch", "_scvi_labels"}  # written by scvi-tools' categorical obs fields


# ------------------------------------------------------------------------------ helpers


def _embedding_by_name(model: CellPLM, adata: ad.AnnData) -> pd.DataFrame:
    return pd.DataFrame(model.get_latent_representation(adata), index=adata.obs_names)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def simulated() -> ad.AnnData:
    """Read-only source; tests take copies."""
    return simulated_slides(N_CELLS)


@pytest.fixture(scope="module")
def fitted(simulated, tmp_path_factory):
    """Spatial AnnData written to .h5ad, read back, set up with computed tissues, 2 epochs."""
    path = tmp_path_factory.mktemp("h5ad") / "slides.h5ad"
    simulated.write_h5ad(path)
    adata = ad.read_h5ad(path)
    CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", library_key="slide", max_cells=200
    )
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=2, train_size=0.8, **FIT, **VAL)
    return model, adata


@pytest.fixture(scope="module")
def fov_model(simulated):
    """Tissues given explicitly (``tissue_key="fov"``), coordinates registered, 1 epoch."""
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial", tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=1, **FIT)
    return model, adata


# ------------------------------------------------------------------------------ training


def test_train_from_h5ad_with_validation_tissues(fitted):
    model, adata = fitted
    assert model.is_trained
    # a from-scratch spatial model hides cells (issue 14) and then leaves the encoding off
    assert model.module.hide_cell_rate > 0 and not model.module.use_spatial_pe
    history = model.history
    for key in ("train_loss", "validation_loss"):
        assert key in history, f"{key} missing from history ({list(history)})"
        values = history[key].to_numpy(dtype=float).ravel()
        assert len(values) == 2
        assert np.isfinite(values).all()
    # validation tissues are whole tissues disjoint from the training tissues
    tissues = adata.obs["_cellplm_tissue_code"].to_numpy()
    assert len(np.unique(tissues)) > 2
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, ARCH["n_latent"])
    assert np.isfinite(z).all()


def test_loss_decreases(fitted):
    _, adata = fitted
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    assert not model.is_trained
    model.train(max_epochs=5, lr=1e-3, train_size=0.8, **FIT, **VAL)
    train = model.history["train_loss"].to_numpy(dtype=float).ravel()
    val = model.history["validation_loss"].to_numpy(dtype=float).ravel()
    assert len(train) == len(val) == 5
    assert np.isfinite(train).all() and np.isfinite(val).all()
    assert val[-1] < val[0], val
    assert train[-2:].mean() < train[0], train


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
@pytest.mark.parametrize("spatial_pe", [True, False])
def test_latents_and_spatial_encoding(simulated, latent, spatial_pe):
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial", tissue_key="fov")
    scvi.settings.seed = 0
    # no local heads: they too read the coordinates (tests/test_spatial_kernel.py)
    model = CellPLM(adata, latent=latent, spatial_pe=spatial_pe, n_local_heads=0, **ARCH)
    assert model.module.latent_type == latent
    assert model.module.use_spatial_pe is spatial_pe
    model.train(max_epochs=1, **FIT)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, ARCH["n_latent"])
    assert np.isfinite(z).all()

    # Same cells and tissues, coordinates swapped between cells: only the encoding changes.
    moved = unregistered(adata)
    moved.obsm["spatial"] = adata.obsm["spatial"][np.random.default_rng(0).permutation(N_CELLS)]
    z_moved = model.get_latent_representation(moved)
    if spatial_pe:
        assert np.abs(z_moved - z).max() > 1e-3
    else:
        np.testing.assert_allclose(z_moved, z, atol=1e-5)


def test_non_spatial_grouped_by_batch(simulated):
    adata = simulated.copy()
    del adata.obsm["spatial"]
    CellPLM.setup_anndata(adata, layer="counts", batch_key="slide", max_cells=150)
    tissues = adata.obs["cellplm_tissue"]
    assert tissues.value_counts().max() <= 150
    assert (adata.obs.groupby(tissues, observed=True)["slide"].nunique() == 1).all()
    with pytest.raises(ValueError, match="spatial_pe=True needs coordinates"):
        CellPLM(adata, spatial_pe=True, **ARCH)
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    assert not model.module.use_spatial_pe
    assert model.summary_stats.n_batch == 2
    model.train(max_epochs=1, **FIT)
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, ARCH["n_latent"])
    assert np.isfinite(z).all()


def test_tissue_key_given_explicitly(fov_model):
    model, adata = fov_model
    assert model.is_trained
    assert "cellplm_tissue" not in adata.obs  # no tissues computed
    codes = adata.obs["_cellplm_tissue_code"]
    # one code per field of view, and one field of view per code
    assert (adata.obs.groupby("fov", observed=True)["_cellplm_tissue_code"].nunique() == 1).all()
    assert (adata.obs.groupby(codes)["fov"].nunique() == 1).all()
    assert codes.nunique() == adata.obs["fov"].nunique()


# ------------------------------------------------------------------------------ embeddings


def test_latent_shape_finite_deterministic(fitted):
    model, adata = fitted
    z1 = model.get_latent_representation()
    z2 = model.get_latent_representation()
    assert z1.shape == (adata.n_obs, ARCH["n_latent"])
    assert np.isfinite(z1).all()
    np.testing.assert_array_equal(z1, z2)
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(mean, z1)
    assert (var > 0).all()
    # different cells get different embeddings
    assert np.unique(np.round(z1, 5), axis=0).shape[0] > adata.n_obs // 2


def test_indices_follow_the_given_order(fitted):
    model, adata = fitted
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(adata.n_obs, 300, replace=False))
    z_sorted = model.get_latent_representation(indices=subset)
    assert z_sorted.shape == (300, ARCH["n_latent"])
    shuffled = rng.permutation(subset)
    z_shuffled = model.get_latent_representation(indices=shuffled)
    expected = z_sorted[np.searchsorted(subset, shuffled)]
    np.testing.assert_allclose(z_shuffled, expected, atol=1e-5)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[subset] = True
    np.testing.assert_allclose(model.get_latent_representation(indices=mask), z_sorted, atol=1e-5)


def test_duplicated_indices_repeat_rows(fitted):
    """scvi-tools' DE may ask for a cell twice: each request gets that cell's row."""
    model, _ = fitted
    z = model.get_latent_representation(indices=[5, 6])
    np.testing.assert_array_equal(model.get_latent_representation(indices=[5, 5, 6]), z[[0, 0, 1]])


def test_row_order_invariance(fov_model):
    model, adata = fov_model
    reference = _embedding_by_name(model, adata)
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    shuffled = unregistered(adata[perm])
    assert not (shuffled.obs_names == adata.obs_names).all()
    result = _embedding_by_name(model, shuffled)
    np.testing.assert_allclose(
        result.to_numpy(), reference.loc[result.index].to_numpy(), atol=1e-5
    )
    # the bookkeeping columns were rewritten for the new row order
    np.testing.assert_array_equal(shuffled.obs["_cellplm_indices"], np.arange(adata.n_obs))


@pytest.mark.parametrize("kind", ["shuffled_copy", "shuffled_view"])
def test_row_order_invariance_registered_copy(fov_model, kind):
    model, adata = fov_model
    reference = _embedding_by_name(model, adata)
    perm = np.random.default_rng(2).permutation(adata.n_obs)
    other = adata[perm].copy() if kind == "shuffled_copy" else adata[perm]
    result = pd.DataFrame(model.get_latent_representation(other), index=adata.obs_names[perm])
    np.testing.assert_allclose(
        result.to_numpy(), reference.loc[result.index].to_numpy(), atol=1e-5
    )


def test_subset_copy_of_registered_anndata(fov_model):
    """A subset *copy* is a new AnnData: its tissues hold its own cells only (unlike
    ``indices=``, which keeps the registered tissues as context)."""
    model, adata = fov_model
    rows = np.arange(100, 300)
    expected = model.get_latent_representation(unregistered(adata[rows].copy()))
    np.testing.assert_allclose(
        model.get_latent_representation(adata[rows].copy()), expected, atol=1e-5
    )
    in_context = model.get_latent_representation(indices=rows)
    assert np.abs(in_context - expected).max() > 1e-3  # the context differs


def test_transfer_to_new_anndata(fitted, simulated):
    model, adata = fitted
    z = model.get_latent_representation()

    # never set up: tissues are computed with the training setup, same cells -> same result
    fresh = simulated.copy()
    before = snapshot(fresh)
    np.testing.assert_allclose(model.get_latent_representation(fresh), z, atol=1e-5)
    assert_data_unchanged(fresh, before)
    assert CELLPLM_OBS <= set(fresh.obs)
    np.testing.assert_array_equal(fresh.obs["cellplm_tissue"], adata.obs["cellplm_tissue"])

    # set up separately with the same arguments
    same_setup = simulated.copy()
    CellPLM.setup_anndata(
        same_setup, layer="counts", spatial_key="spatial", library_key="slide", max_cells=200
    )
    np.testing.assert_allclose(model.get_latent_representation(same_setup), z, atol=1e-5)

    # other cells
    other = simulated_slides(600, seed=1)
    z_other = model.get_latent_representation(other)
    assert z_other.shape == (600, ARCH["n_latent"])
    assert np.isfinite(z_other).all()
    assert other.obs["cellplm_tissue"].value_counts().max() <= 200


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda a: a.layers.__delitem__("counts"), KeyError, "layer='counts'"),
        (lambda a: a.layers["counts"].data.__setitem__(0, np.nan), ValueError, "NaN or infinite"),
        (lambda a: a.layers["counts"].data.__setitem__(0, -1.0), ValueError, "negative"),
        (lambda a: a.obsm.__delitem__("spatial"), KeyError, "spatial_key='spatial'"),
        (lambda a: a.obsm["spatial"].__setitem__((0, 0), np.nan), ValueError, "coordinates"),
        (lambda a: None, ValueError, "no cells"),  # replaced by an empty AnnData below
    ],
    ids=["missing_layer", "nan_counts", "negative_counts", "no_coords", "nan_coords", "empty"],
)
def test_transfer_validates_new_anndata(fitted, simulated, mutate, error, match):
    model, _ = fitted
    new = simulated[:0].copy() if match == "no cells" else simulated.copy()
    mutate(new)
    before = snapshot(new)
    with pytest.raises(error, match=match):
        model.get_latent_representation(new)
    assert_data_unchanged(new, before)


# ------------------------------------------------------------------------------ save / load


def test_save_load_roundtrip_and_resume(fitted, simulated, tmp_path):
    model, adata = fitted
    z = model.get_latent_representation()
    model.save(tmp_path / "model", save_anndata=True)

    loaded = CellPLM.load(tmp_path / "model")
    assert loaded.is_trained
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-6)

    with_adata = CellPLM.load(tmp_path / "model", adata=adata)
    np.testing.assert_allclose(with_adata.get_latent_representation(), z, atol=1e-6)

    # an AnnData that was never set up is set up from the saved registry
    fresh = simulated.copy()
    from_registry = CellPLM.load(tmp_path / "model", adata=fresh)
    np.testing.assert_allclose(from_registry.get_latent_representation(), z, atol=1e-6)

    # resume training after loading
    scvi.settings.seed = 0
    with_adata.train(max_epochs=1, train_size=0.8, **FIT, **VAL)
    assert with_adata.is_trained
    for key in ("train_loss", "validation_loss"):
        assert np.isfinite(with_adata.history[key].to_numpy(dtype=float)).all()
    z_resumed = with_adata.get_latent_representation()
    assert np.isfinite(z_resumed).all()
    assert np.abs(z_resumed - z).max() > 1e-6  # the weights moved
    # the original model is untouched by training its loaded copy
    np.testing.assert_array_equal(model.get_latent_representation(), z)


def test_second_train_call_uses_the_training_objective(simulated, monkeypatch):
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, layer="counts", tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=1, train_size=1.0, **FIT)
    inference, masked = model.module.inference, []

    def spy(*args, **kwargs):
        out = inference(*args, **kwargs)
        masked.append(out["mask"] is not None)
        return out

    monkeypatch.setattr(model.module, "inference", spy)
    model.train(max_epochs=1, train_size=1.0, **FIT)  # no validation: every call is a step
    assert masked, "no training step ran"
    assert all(masked), "training steps ran in eval mode (no masking)"


# ------------------------------------------------------------------------------ validation


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
def test_setup_rejects_invalid_input(simulated, case):
    mutate, kwargs, error, match = INVALID[case]
    adata = simulated[:0].copy() if mutate == "empty" else simulated.copy()
    if callable(mutate):
        mutate(adata)
    before = snapshot(adata)
    with pytest.raises(error, match=match):
        CellPLM.setup_anndata(adata, **{**SETUP, **kwargs})
    assert_data_unchanged(adata, before)
    # a failed setup writes nothing
    assert list(adata.obs.columns) == list(before["obs"].columns)
    assert set(adata.uns) == before["uns"]


def test_missing_values_in_obs_keys_are_rejected(simulated):
    adata = simulated.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.loc[adata.obs_names[0], "cell_type"] = np.nan
    before = snapshot(adata)
    with pytest.raises(ValueError, match="missing values"):
        CellPLM.setup_anndata(adata, **SETUP, labels_key="cell_type")
    assert_data_unchanged(adata, before)


def test_single_cell_tissue_warns_and_trains(simulated, caplog):
    adata = simulated.copy()
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


def test_spatial_pe_without_coordinates(simulated):
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, layer="counts", tissue_key="fov")
    with pytest.raises(ValueError, match="spatial_pe=True needs coordinates"):
        CellPLM(adata, spatial_pe=True, **ARCH)
    assert not CellPLM(adata, **ARCH).module.use_spatial_pe


def test_unknown_latent_is_rejected(simulated):
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, layer="counts", tissue_key="fov")
    with pytest.raises(ValueError, match="latent must be 'gmvae' or 'vae'"):
        CellPLM(adata, latent="flow", **ARCH)


# ------------------------------------------------------------------------------ side effects


@pytest.mark.parametrize("tissue_key", [None, "fov"])
def test_setup_writes_only_documented_fields(simulated, tissue_key):
    adata = simulated.copy()
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


# ------------------------------------------------------------------------------ matrix types

FORMATS = [
    pytest.param(sp.csr_matrix, id="csr"),
    pytest.param(sp.csc_matrix, id="csc"),
    pytest.param(lambda x: np.asarray(x.toarray()), id="dense"),
    pytest.param(sp.csr_array, id="csr_array"),
]


def _with_counts_in_x(adata: ad.AnnData, convert) -> ad.AnnData:
    """Unregistered copy with the counts, converted, in ``X`` and no layers."""
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    out = unregistered(adata)
    out.X = convert(sp.csr_matrix(counts))
    for key in [k for k in out.layers if k is not None]:  # anndata >= 0.13 lists X as None
        del out.layers[key]
    return out


@pytest.fixture(scope="module")
def csr_model(simulated):
    """Untrained model on counts in a CSR ``X``; eval mode is deterministic."""
    adata = _with_counts_in_x(simulated[:600], sp.csr_matrix)
    CellPLM.setup_anndata(adata, tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.is_trained_ = True  # random weights are enough here; scvi-tools refuses untrained
    return model, adata


@pytest.mark.parametrize("convert", FORMATS)
def test_matrix_type_trains(simulated, convert):
    adata = _with_counts_in_x(simulated[:600], convert)
    CellPLM.setup_anndata(adata, tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=1, **FIT)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert np.isfinite(model.get_latent_representation()).all()


def _check_tissue_loader_rows(model: CellPLM, adata: ad.AnnData, counts: sp.csr_matrix) -> None:
    """Every minibatch holds the exact counts of its rows, as a float32 CSR tensor whose
    indices keep scipy's int32 (no int64 copy); every row comes exactly once."""
    from cellplm_scvi._constants import INDICES_KEY, X_KEY

    seen = []
    for tensors in model._make_data_loader(model._validate_anndata(adata)):
        x, rows = tensors[X_KEY], tensors[INDICES_KEY].view(-1).numpy()
        assert x.layout == torch.sparse_csr and x.dtype == torch.float32
        assert x.crow_indices().dtype == x.col_indices().dtype == torch.int32
        np.testing.assert_array_equal(x.to_dense().numpy(), counts[rows].toarray())
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(adata.n_obs))


@pytest.mark.parametrize("convert", FORMATS)
@pytest.mark.parametrize("layout", ["as_simulated", "tissues_contiguous"])
def test_tissue_loader_reads_exact_rows(csr_model, convert, layout):
    """Scattered tissues are read by a row index, contiguous ones by one slice."""
    model, adata = csr_model
    other = _with_counts_in_x(adata, convert)
    if layout == "tissues_contiguous":
        other = other[np.argsort(other.obs["fov"].to_numpy(), kind="stable")].copy()
    _check_tissue_loader_rows(model, other, sp.csr_matrix(other.X))


class _FullSliceIsSelf(sp.csr_matrix):
    """CSR matrix whose full row slice is the matrix itself (as in some scipy versions)."""

    def __getitem__(self, key):
        if isinstance(key, slice) and key.indices(self.shape[0]) == (0, self.shape[0], 1):
            return self
        return super().__getitem__(key)


def test_tissue_loader_never_shares_the_users_buffers():
    """One tissue spanning every row is read as a full slice; even where that slice is the
    user's matrix itself, the minibatch owns its arrays."""
    from cellplm_scvi._constants import X_KEY

    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (50, 30)).astype(np.float32)))
    adata.var_names = [f"g{i}" for i in range(30)]
    adata.obs["tissue"] = "one"
    CellPLM.setup_anndata(adata, tissue_key="tissue")
    model = CellPLM(adata, **ARCH)
    loader = model._make_data_loader(model._validate_anndata(adata))
    users = loader.dataset.x = _FullSliceIsSelf(loader.dataset.x)
    assert users[0 : adata.n_obs] is users  # the case guarded against
    (tensors,) = list(loader)
    x = tensors[X_KEY]
    np.testing.assert_array_equal(x.to_dense().numpy(), users.toarray())
    for mine, theirs in [
        (x.values(), users.data),
        (x.col_indices(), users.indices),
        (x.crow_indices(), users.indptr),
    ]:
        assert not np.shares_memory(mine.numpy(), theirs)


@pytest.mark.parametrize("layout", ["as_simulated", "tissues_contiguous"])
def test_tissue_loader_reads_exact_rows_from_backed_h5ad(csr_model, tmp_path, layout):
    model, adata = csr_model
    if layout == "tissues_contiguous":
        adata = adata[np.argsort(adata.obs["fov"].to_numpy(), kind="stable")]
    unregistered(adata).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    _check_tissue_loader_rows(model, backed, sp.csr_matrix(adata.X))
    assert backed.isbacked


@pytest.mark.parametrize("convert", FORMATS)
def test_matrix_type_gives_same_embedding(csr_model, convert):
    model, adata = csr_model
    reference = model.get_latent_representation()
    other = _with_counts_in_x(adata, convert)
    before = snapshot(other)
    np.testing.assert_allclose(model.get_latent_representation(other), reference, atol=1e-5)
    assert_data_unchanged(other, before)
