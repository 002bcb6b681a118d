"""The default split never starves training: cells are split within every tissue (so every
slide and batch trains); holding out whole tissues is refused when it would hide a batch."""

from __future__ import annotations

import numpy as np
import pytest
import scvi

import cellplm_scvi as cp
from cellplm_scvi.data import TissueDataSplitter
from cellplm_scvi.data._tissue_loader import MIN_CELLS_TO_SPLIT

ARCH = {"n_hidden": 16, "n_layers": 1, "n_heads": 4, "n_latent": 4}


@pytest.fixture(scope="module")
def slides():
    """400 simulated cells on 2 slides, one tissue per slide (README settings)."""
    adata = cp.datasets.simulate_tissue(n_cells=400, n_slides=2, seed=0)
    adata.layers["counts"] = adata.X.copy()
    return adata


def _manager(adata, **setup):
    cp.CellPLM.setup_anndata(adata, layer="counts", **setup)
    return cp.CellPLM(adata, **ARCH).adata_manager


def test_default_split_trains_every_tissue_and_slide(slides):
    adata = slides.copy()
    adata.obs["tissue"] = adata.obs["slide"].astype(str)
    adata.obs.loc[adata.obs_names[:5], "tissue"] = "small"  # fewer than MIN_CELLS_TO_SPLIT
    manager = _manager(adata, spatial_key="spatial", tissue_key="tissue")
    scvi.settings.seed = 0
    splitter = TissueDataSplitter(manager)
    assert splitter.split_by == "cells"
    tissue = adata.obs["tissue"].to_numpy()
    for name in np.unique(tissue):
        rows = np.flatnonzero(tissue == name)
        n_train = np.isin(rows, splitter.train_idx).sum()
        if len(rows) < MIN_CELLS_TO_SPLIT:
            assert n_train == len(rows)  # a small tissue goes wholly to training
        else:
            assert n_train == round(0.9 * len(rows)), name  # stratified per tissue
    assert set(adata.obs["slide"].iloc[splitter.val_idx]) == set(adata.obs["slide"])
    assert len(splitter.test_idx) == 0 and splitter.n_val > 0
    assert not set(splitter.train_idx) & set(splitter.val_idx)
    # deterministic for a seed; shuffle_set_split=False takes each tissue's cells in order
    again = TissueDataSplitter(manager)
    np.testing.assert_array_equal(again.val_idx, splitter.val_idx)
    ordered = TissueDataSplitter(manager, shuffle_set_split=False)
    slide0 = np.flatnonzero(tissue == tissue[-1])
    np.testing.assert_array_equal(ordered.val_idx[ordered.val_idx >= slide0[0]], slide0[-20:])
    # validation and training loaders read whole tissues; the loss masks differ
    assert splitter.val_dataloader() is not None


def test_holding_out_tissues_is_refused_when_a_batch_would_be_unseen(slides):
    adata = slides.copy()
    adata.obs["batch"] = adata.obs["slide"]
    manager = _manager(adata, batch_key="batch")  # no coordinates: one tissue per batch
    with pytest.raises(ValueError, match="split_by='cells'") as info:
        TissueDataSplitter(manager, split_by="tissues")
    assert "holds out a batch" in str(info.value)
    TissueDataSplitter(manager, split_by="tissues", train_size=1.0)  # nothing held out
    default = TissueDataSplitter(manager)  # the cell split trains every batch
    assert set(adata.obs["batch"].iloc[default.train_idx]) == set(adata.obs["batch"])


def test_holding_out_tissues_stays_possible(slides):
    adata = slides.copy()
    manager = _manager(adata, spatial_key="spatial", library_key="slide", max_cells=50)
    splitter = TissueDataSplitter(manager, split_by="tissues", train_size=0.75)
    codes = adata.obs["_cellplm_tissue_code"].to_numpy()
    held_out = set(codes[splitter.val_idx])
    assert held_out and not held_out & set(codes[splitter.train_idx])
