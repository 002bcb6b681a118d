"""Inference on an AnnData with genes outside the model vocabulary (an official checkpoint).

scvi-tools' methods return one column per ``adata.var_names``, in that order; CellPLM cannot
decode a gene outside its vocabulary, so it gets scale/mean 0 there. ``differential_expression``
builds its table on ``var_names`` from ``get_normalized_expression``, so it needs that shape.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import sparse
import torch

import cellplm_scvi as cp
from cellplm_scvi.datasets import random_official_checkpoint

UNKNOWN = ["NOT_A_GENE_1", "NOT_A_GENE_2"]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Random official 19,374-gene checkpoint on 25 vocabulary genes + 2 unknown ones (first
    and in the middle), 60 cells in 2 tissues, 2 groups."""
    prefix = tmp_path_factory.mktemp("official") / "random"
    config, _ = random_official_checkpoint(prefix, n_hidden=16, n_layers=1, n_latent=4)
    vocab = json.loads(config.read_text())["gene_list"]
    genes = [UNKNOWN[0], *vocab[:12], UNKNOWN[1], *vocab[12:25]]
    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, (60, len(genes))).astype(np.float32)))
    adata.var_names = genes
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.obs["tissue"] = pd.Categorical(np.repeat(["a", "b"], 30))
    adata.obs["group"] = pd.Categorical(np.tile(["x", "y"], 30))
    cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
    model = cp.CellPLM.load_official(prefix, adata)
    assert len(model.matched_genes) == 25
    return model, adata


def test_differential_expression_reports_every_gene(official):
    model, adata = official
    torch.manual_seed(0)
    de = model.differential_expression(groupby="group", group1="x", mode="change")
    assert sorted(de.index) == sorted(adata.var_names)
    out = de.loc[UNKNOWN]  # not decoded: scale 0 in both groups, no change
    np.testing.assert_array_equal(out[["scale1", "scale2", "lfc_mean"]].to_numpy(), 0)
    np.testing.assert_array_equal(out["proba_de"].to_numpy(), 0)
    assert not out["is_de_fdr_0.05"].any()
    known = de.drop(UNKNOWN)
    assert (known["scale1"] > 0).all() and known["lfc_std"].gt(0).all()
    vanilla = model.differential_expression(groupby="group", group1="x", mode="vanilla")
    assert sorted(vanilla.index) == sorted(adata.var_names)
    np.testing.assert_array_equal(vanilla.loc[UNKNOWN, "proba_m1"].to_numpy(), 0)


def test_normalized_expression_has_the_anndatas_genes(official):
    model, adata = official
    unknown = adata.var_names.isin(UNKNOWN)
    expr = model.get_normalized_expression(indices=np.arange(10, 0, -1))
    assert list(expr.columns) == list(adata.var_names) and expr.shape == (10, adata.n_vars)
    assert list(expr.index) == list(adata.obs_names[np.arange(10, 0, -1)])
    np.testing.assert_array_equal(expr.to_numpy()[:, unknown], 0)
    np.testing.assert_allclose(expr.to_numpy().sum(1), 1.0, rtol=1e-5)
    counts = model.get_normalized_expression(library_size="observed", return_numpy=True)
    observed = np.asarray(adata.X[:, ~unknown].sum(1)).ravel()  # decoded genes' counts
    np.testing.assert_allclose(counts.sum(1), observed, rtol=1e-4)
    adata_copy = adata.copy()
    adata_copy.layers["cellplm"] = model.get_normalized_expression(adata_copy)  # README recipe
    samples = model.get_normalized_expression(n_samples=3, return_mean=False)
    assert samples.shape == (3, adata.n_obs, adata.n_vars)
    genes = [adata.var_names[20], adata.var_names[3]]
    full = model.get_normalized_expression()
    picked = model.get_normalized_expression(gene_list=genes)
    assert list(picked.columns) == genes
    np.testing.assert_allclose(picked.to_numpy(), full[genes].to_numpy(), rtol=1e-6)
    with pytest.raises(KeyError, match="cannot decode"):
        model.get_normalized_expression(gene_list=[UNKNOWN[1], genes[0]])


@pytest.mark.slow  # alone ~30 s: the first sparse.GCXS of a process compiles numba code
def test_sampling_and_likelihood_methods_have_the_anndatas_genes(official):
    model, adata = official
    n, g = adata.n_obs, adata.n_vars
    unknown = adata.var_names.isin(UNKNOWN)
    draws = model.posterior_predictive_sample(n_samples=2)
    assert isinstance(draws, sparse.GCXS) and draws.shape == (n, g, 2)
    assert np.all(draws.todense()[:, unknown] == 0)
    assert model.posterior_predictive_sample(gene_list=list(adata.var_names[[5, 1]])).shape == (
        n,
        2,
    )
    params = model.get_likelihood_parameters()
    assert {k: v.shape for k, v in params.items()} == {"mean": (n, g), "dispersions": (n, g)}
    np.testing.assert_array_equal(params["mean"][:, unknown], 0)
    assert (params["mean"][:, ~unknown] > 0).all()
    denoised = model._get_denoised_samples(n_samples=2)
    assert denoised.shape == (n, g, 2)
    corr = model.get_feature_correlation_matrix(n_samples=2, correlation_type="pearson")
    assert list(corr.index) == list(adata.var_names) == list(corr.columns)
    assert np.isfinite(corr.to_numpy()[np.ix_(~unknown, ~unknown)]).all()
    torch.manual_seed(0)
    for value in (
        model.get_marginal_ll(n_mc_samples=3, return_mean=False),
        model.get_elbo(return_mean=False),
        model.get_reconstruction_error(return_mean=False)["reconstruction_loss"],
    ):
        assert value.shape == (n,) and torch.isfinite(value).all()
