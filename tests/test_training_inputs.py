"""What ``CellPLM.train`` and the model check before they use the registered data (issue 23).

Counts replaced after ``setup_anndata`` (D5), tissues rewritten by a second ``setup_anndata``
(D6), a minified AnnData, scvi-tools' ``external_indexing`` split and ``batch_size`` /
``load_sparse_tensor`` values that were misread or ignored. Tiny networks on 300 simulated
cells; the whole file runs in a few seconds on one CPU thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellplm_scvi as cp
from cellplm_scvi import CellPLM

ARCH = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "n_latent": 4}
FIT = {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False}
SETUP = {"layer": "counts", "spatial_key": "spatial", "max_cells": 100}


@pytest.fixture(scope="module")
def simulated():
    """Read-only source; tests take copies."""
    return cp.datasets.simulate_tissue(n_cells=300, n_slides=1, seed=0)


def _model(simulated, trained: bool = False, **setup):
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, **{**SETUP, **setup})
    model = CellPLM(adata, **ARCH)
    if trained:
        model.train(**FIT)
    return model, adata


def test_train_checks_counts_replaced_after_setup(simulated):
    model, adata = _model(simulated)
    counts = adata.layers["counts"]
    normalised = sp.csr_matrix(counts, dtype=np.float32)
    normalised.data = np.log1p(normalised.data / 3.0)
    adata.layers["counts"] = normalised  # log-normalised values under the registered name
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\].*non-integer.*sampled"):
        model.train(**FIT)
    adata.layers["counts"] = counts
    model.train(**FIT)  # raw counts again: trains


def test_sampled_count_check_keeps_global_random_state(simulated):
    from cellplm_scvi._validation import check_counts_sample

    adata = simulated.copy()
    x = adata.layers["counts"].toarray().astype(np.float32)
    x[7] = x[7] * 0.5 + 0.25  # one row of non-counts
    adata.layers["counts"] = sp.csr_matrix(x)
    state = np.random.get_state()  # noqa: NPY002 (the global state is what is checked)
    with pytest.raises(ValueError, match="non-integer"):
        check_counts_sample(adata, "counts", n_rows=adata.n_obs)
    check_counts_sample(simulated, "counts", n_rows=10)
    assert np.array_equal(np.random.get_state()[1], state[1])  # noqa: NPY002


def test_setup_again_with_other_tissues_is_caught(simulated):
    model, adata = _model(simulated, trained=True)
    before = model.get_latent_representation()
    codes = adata.obs["_cellplm_tissue_code"].to_numpy().copy()
    CellPLM.setup_anndata(adata, **{**SETUP, "max_cells": 50})  # other tissues
    assert not np.array_equal(adata.obs["_cellplm_tissue_code"].to_numpy(), codes)
    with pytest.raises(ValueError, match=r"setup_anndata.*registry\['setup_args'\]"):
        model.get_latent_representation()
    with pytest.raises(ValueError, match="tissues"):
        model.train(**FIT)
    # the fix the message names: the model's own setup again
    CellPLM.setup_anndata(adata, **model.adata_manager.registry["setup_args"])
    np.testing.assert_allclose(model.get_latent_representation(), before, rtol=1e-5, atol=1e-6)


def test_setup_again_with_same_tissues_is_accepted(simulated):
    model, adata = _model(simulated, labels_key="cell_type")
    CellPLM.setup_anndata(adata, **SETUP)  # other labels, same tissues: the model's setup wins
    model.train(**FIT)
    assert model.get_latent_representation().shape == (adata.n_obs, ARCH["n_latent"])


@pytest.mark.parametrize("labels_key", [None, "cell_type"])
def test_minified_model_does_not_train(simulated, labels_key):
    model, _ = _model(simulated, trained=True, labels_key=labels_key)
    model.minify_adata()
    with pytest.raises(ValueError, match=r"minified.*CellPLM.load"):
        model.train(**FIT)


def test_external_indexing_is_refused_naming_split_key(simulated):
    model, adata = _model(simulated)
    rows = np.arange(adata.n_obs)
    with pytest.raises(ValueError, match=r"external_indexing.*split_key"):
        model.train(**FIT, datasplitter_kwargs={"external_indexing": [rows[:200], rows[200:]]})


@pytest.mark.parametrize(
    "arguments",
    [
        {"batch_size": 0},
        {"batch_size": -1},
        {"batch_size": 2.5},
        {"batch_size": True},
        {"max_cells_per_step": 0},
        {"load_sparse_tensor": "yes"},
    ],
)
def test_train_refuses_misread_arguments(simulated, arguments):
    model, _ = _model(simulated)
    (name,) = arguments
    with pytest.raises(ValueError, match=name):
        model.train(**FIT, **arguments)


def test_load_sparse_tensor_true_is_honoured(simulated):
    model, _ = _model(simulated)
    model.train(**FIT, load_sparse_tensor=True)  # CellPLM's loader is sparse either way
    tensors = next(iter(model.trainer.datamodule.train_dataloader()))
    assert tensors["X"].layout == torch.sparse_csr
