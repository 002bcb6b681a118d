"""Hardening (issue 23): odd matrices, odd coordinates, bad arguments, damaged files, and the
scvi-tools names of SCANVI's metrics and of minified data.

Every test here failed before its fix. Tiny networks on small simulated slides.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch

import cellplm_scvi as cp
from cellplm_scvi import CellPLM
from cellplm_scvi._genes import official_config
from cellplm_scvi.data import TissueCorpus, TissueDataLoader
from cellplm_scvi.module._masking import TissueMask, apply_mask
from cellplm_scvi.pp._tissues import _warn_one_cell_tissues
from tests._anndata_checks import unregistered

ARCH = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "n_latent": 4}
FIT = {"accelerator": "cpu", "enable_progress_bar": False}
N_CELLS = 200


def _simulate(seed: int = 0) -> ad.AnnData:
    return cp.datasets.simulate_tissue(n_cells=N_CELLS, n_slides=1, seed=seed)


@pytest.fixture(scope="module")
def trained():
    """A tiny spatial model with a cell-type head, trained two epochs with validation."""
    scvi.settings.seed = 0
    adata = _simulate()
    CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", labels_key="cell_type", max_cells=50
    )
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=2, train_size=0.75, check_val_every_n_epoch=1, **FIT)
    return model, adata


# ------------------------------------------------------------------ D3: duplicate entries


def _with_duplicates(x: sp.csr_matrix) -> sp.csr_matrix:
    """The same matrix to scipy, each stored count split into two entries of one gene."""
    half = np.floor(x.data / 2)
    data = np.stack([half, x.data - half], axis=1).ravel()
    return sp.csr_matrix((data, np.repeat(x.indices, 2), x.indptr * 2), shape=x.shape)


def test_duplicate_entries_embed_like_the_canonical_matrix(trained):
    model, adata = trained
    canonical = sp.csr_matrix(adata.layers["counts"])
    duplicated = _with_duplicates(canonical)
    assert not duplicated.has_canonical_format and abs(duplicated - canonical).max() == 0
    other = adata.copy()
    other.layers["counts"] = duplicated
    arrays = [a.copy() for a in (duplicated.data, duplicated.indices, duplicated.indptr)]
    expected = model.get_latent_representation(adata)
    np.testing.assert_allclose(model.get_latent_representation(other), expected, atol=1e-5)
    stored = other.layers["counts"]  # the user's matrix: untouched, duplicates kept
    for before, after in zip(arrays, (stored.data, stored.indices, stored.indptr)):
        np.testing.assert_array_equal(before, after)


# ------------------------------------------------------------------ D8: repeated coordinates


@pytest.mark.parametrize("n_repeated", [N_CELLS, 150])
def test_repeated_coordinates_give_whole_tissues(n_repeated):
    adata = _simulate()
    adata.obsm["spatial"][:n_repeated] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # and no one-cell tissue to warn about
        cp.pp.assign_tissues(adata, spatial_key="spatial", max_cells=50)
    sizes = adata.obs["cellplm_tissue"].value_counts()
    assert sizes.max() <= 50 and sizes.min() >= 25, sizes.to_dict()


def test_one_cell_tissues_warn():
    strata = np.zeros(100, dtype=np.int64)
    groups = np.r_[np.zeros(50), np.arange(1, 51)].astype(np.int64)  # 50 cells alone
    with pytest.warns(UserWarning, match="alone in their tissue.*spatial_key"):
        _warn_one_cell_tissues(groups, strata, "spatial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_one_cell_tissues(np.arange(3), np.arange(3), "spatial")  # one-cell slides


# ------------------------------------------------------------------ D9: one-cell tissue niche


def test_an_empty_mask_leaves_the_tissue_unchanged():
    x = torch.arange(12.0).view(3, 4).to_sparse_csr()
    empty = TissueMask(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.bool))
    out = apply_mask(x, empty)
    assert torch.equal(out.to_dense(), x.to_dense())


def test_niche_read_out_of_a_one_cell_tissue():
    scvi.settings.seed = 0
    adata = cp.datasets.simulate_tissue(n_cells=80, n_slides=1, seed=1)
    tissue = np.where(np.arange(80) < 40, "a", "b").astype(object)
    tissue[0] = "alone"
    adata.obs["tissue"] = pd.Categorical(tissue)
    CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial", tissue_key="tissue")
    assert adata.obs["_cellplm_tissue_code"].value_counts().min() == 1
    model = CellPLM(adata, **ARCH)
    assert model.module.hide_cell_rate > 0
    model.train(max_epochs=1, train_size=1.0, **FIT)
    niche = model.get_latent_representation(representation="niche")
    assert niche.shape == (80, ARCH["n_latent"]) and np.isfinite(niche).all()
    subset = model.get_latent_representation(indices=[0, 5], representation="niche")
    np.testing.assert_allclose(subset, niche[[0, 5]], atol=1e-5)


# ------------------------------------------------------------------ D11/D12: arguments


def test_huge_coordinates_name_spatial_key():
    adata = _simulate()
    adata.obsm["spatial"] = adata.obsm["spatial"] * 1e300
    with pytest.raises(ValueError, match=r"spatial_key.*Rescale"):
        CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial")
    with pytest.raises(ValueError, match=r"spatial_key.*Rescale"):
        cp.pp.assign_tissues(adata, spatial_key="spatial")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"indices": []}, "selects no cell"),
        ({"indices": [1.0, 2.5]}, "integer row positions"),
        ({"indices": np.array([[0, 1]])}, "one-dimensional"),
        ({"batch_size": -5}, "batch_size must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ],
)
def test_inference_arguments_are_checked(trained, kwargs, match):
    model, adata = trained
    for method in (model.get_latent_representation, model.get_elbo):
        with pytest.raises(ValueError, match=match):
            method(adata, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": -1}, "batch_size must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"drop_node_rate": 1.5}, r"drop_node_rate must be in \[0, 1\)"),
        ({"datasplitter_kwargs": {"drop_last": True}}, "drop_last=True is not supported"),
        ({"datasplitter_kwargs": {"load_sparse_tensor": False}}, "load_sparse_tensor=False"),
        ({"datasplitter_kwargs": {"batch_size": 10}}, r"train\(batch_size=...\)"),
    ],
)
def test_training_arguments_are_checked(trained, kwargs, match):
    model, _ = trained
    with pytest.raises(ValueError, match=match):
        model.train(max_epochs=1, **FIT, **kwargs)


def test_loader_refuses_options_it_cannot_honour(trained):
    model, _ = trained
    manager = model.adata_manager
    for option, match in [
        ({"drop_last": True}, "drop_last"),
        ({"load_sparse_tensor": False}, "load_sparse_tensor"),
        ({"load_sparse_tensor": "yes"}, "load_sparse_tensor must be a bool"),
        ({"data_and_attributes": ["X"]}, "data_and_attributes"),
        ({"batch_size": 0}, "batch_size"),
        ({"shuffle": True, "drop_node_rate": 1.0}, "drop_node_rate"),
    ]:
        with pytest.raises(ValueError, match=match):
            TissueDataLoader(manager, **option)
    batch = next(iter(TissueDataLoader(manager, load_sparse_tensor=True)))
    assert batch["X"].layout == torch.sparse_csr  # what it always reads
    with pytest.raises(ValueError, match="data_and_attributes"):
        model.get_latent_representation(data_and_attributes=["X"])


# ------------------------------------------------------------------ D10/D11: corpus files

VOCAB = official_config()["gene_list"][:20]


def _corpus_file(path, n_cells: int) -> str:
    rng = np.random.default_rng(n_cells)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, (n_cells, 20)).astype(np.float32)))
    adata.var_names = VOCAB
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.write_h5ad(path)
    return str(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_npz"])
def test_damaged_tissue_cache_is_rebuilt(tmp_path, damage):
    path = _corpus_file(tmp_path / "a.h5ad", 120)
    kwargs = {"vocabulary": VOCAB, "max_cells": 30, "cache_dir": tmp_path / "cache"}
    first = TissueCorpus([path], **kwargs)
    (cache,) = (tmp_path / "cache").glob("*.npz")
    whole = cache.read_bytes()
    damaged = {"truncated": whole[: len(whole) // 2], "empty": b"", "not_npz": b"x" * 64}
    cache.write_bytes(damaged[damage])
    again = TissueCorpus([path], **kwargs)
    assert not again.alignment_report["cached"].any()  # recomputed
    np.testing.assert_array_equal(again.tissue_codes, first.tissue_codes)
    assert TissueCorpus([path], **kwargs).alignment_report["cached"].all()  # and rewritten


def test_corpus_file_rewritten_after_construction(tmp_path):
    path = _corpus_file(tmp_path / "a.h5ad", 200)
    dm = TissueCorpus([path], vocabulary=VOCAB, max_cells=50, cache_dir=tmp_path / "cache")
    _corpus_file(tmp_path / "a.h5ad", 100)  # fewer cells
    rows = next(iter(dm.sampler("train")))
    with pytest.raises(ValueError, match=r"a\.h5ad.*changed.*Build the TissueCorpus again"):
        dm.dataset[rows]


# ------------------------------------------------------------------ scvi-tools contract


def test_scanvi_validation_metrics(trained):
    model, _ = trained
    history = model.history_
    for name in (
        "validation_classification_loss",
        "validation_accuracy",
        "validation_f1_score",
        "validation_calibration_error",
        "validation_f1",
    ):
        assert name in history, sorted(history)
        values = history[name][name].dropna().to_numpy(dtype=float)
        assert len(values) == 2 and np.isfinite(values).all()
    accuracy = history["validation_accuracy"]["validation_accuracy"].to_numpy(dtype=float)
    micro_f1 = history["validation_f1_score"]["validation_f1_score"].to_numpy(dtype=float)
    np.testing.assert_allclose(micro_f1, accuracy, atol=1e-6)  # micro-F1 = accuracy
    assert ((0 <= accuracy) & (accuracy <= 1)).all()


def test_early_stopping_on_validation_accuracy():
    scvi.settings.seed = 0
    adata = _simulate(seed=2)
    CellPLM.setup_anndata(adata, layer="counts", labels_key="cell_type", max_cells=50)
    model = CellPLM(adata, **ARCH)
    model.train(
        max_epochs=2,
        train_size=0.75,
        early_stopping=True,
        early_stopping_monitor="validation_accuracy",
        early_stopping_mode="max",
        check_val_every_n_epoch=1,
        **FIT,
    )
    assert len(model.history_["validation_accuracy"]) == 2


def test_minified_library_size_is_the_integer_sum(trained):
    model, adata = trained
    other = unregistered(adata)
    CellPLM.setup_anndata(other, **model.adata_manager.registry["setup_args"])
    copy = CellPLM(other, **ARCH)
    copy.module.load_state_dict(model.module.state_dict())
    copy.is_trained_ = True
    expected = copy.get_latent_library_size().reshape(-1)
    copy.minify_adata()
    library = copy.adata.obs["observed_lib_size"]
    assert np.issubdtype(library.dtype, np.integer)
    np.testing.assert_array_equal(library.to_numpy(), expected)
