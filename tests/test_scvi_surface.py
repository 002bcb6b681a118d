"""The scvi-tools surface of ``CellPLM`` (SCVI/SCANVI methods), always in tissue context.

Each method is checked three ways against the plain call: with shuffled ``indices``, with a
row-permuted AnnData, and on a 30% subset (a cell's context is its whole registered tissue, so
a subset gives the same rows as the full call).
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

import cellplm_scvi as cp
from cellplm_scvi import CellPLM
from tests._anndata_checks import unregistered
from tests._helpers import ARCH, FIT


def _simulate(n_cells: int = 600, seed: int = 0) -> ad.AnnData:
    adata = cp.datasets.simulate_tissue(n_cells=n_cells, n_slides=2, seed=seed)
    adata.obs["sample"] = adata.obs["slide"].astype(str)
    adata.obs["platform"] = np.where(np.arange(adata.n_obs) % 3 == 0, "a", "b")
    return adata


@pytest.fixture(scope="module")
def trained():
    """Two slides as two batches, labels, a categorical covariate; tissues <= 150 cells."""
    adata = _simulate()
    CellPLM.setup_anndata(
        adata,
        layer="counts",
        batch_key="sample",
        labels_key="cell_type",
        categorical_covariate_keys=["platform"],
        spatial_key="spatial",
        library_key="slide",
        max_cells=150,
    )
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=3, batch_size=200, **FIT)
    return model, adata


@pytest.fixture
def fresh(trained):
    """A new, untrained model on the trained model's AnnData: tests that call ``train`` use it,
    so the shared model stays as the fixture trained it."""
    _, adata = trained
    scvi.settings.seed = 0
    return CellPLM(adata, **ARCH), adata


def _permuted(adata: ad.AnnData, seed: int = 1) -> tuple[ad.AnnData, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(adata.n_obs)
    return unregistered(adata[perm].copy()), perm


# ------------------------------------------------------------------ tissue context, order


def test_subset_embeddings_equal_full_rows(trained):
    model, adata = trained
    full = model.get_latent_representation()
    subset = np.random.default_rng(0).choice(adata.n_obs, int(0.3 * adata.n_obs), replace=False)
    np.testing.assert_allclose(
        model.get_latent_representation(indices=subset), full[subset], atol=1e-5
    )


# (method, kwargs, how to pick the per-cell rows of the result)
DETERMINISTIC = {
    "latent": (lambda m, **k: m.get_latent_representation(**k), lambda r, i: r[i]),
    "latent_dist": (
        lambda m, **k: np.concatenate(m.get_latent_representation(return_dist=True, **k), 1),
        lambda r, i: r[i],
    ),
    "normalized": (
        lambda m, **k: m.get_normalized_expression(return_numpy=True, **k),
        lambda r, i: r[i],
    ),
    "normalized_latent_library": (
        lambda m, **k: m.get_normalized_expression(library_size="latent", **k).to_numpy(),
        lambda r, i: r[i],
    ),
    "likelihood": (
        lambda m, **k: m.get_likelihood_parameters(**k)["mean"],
        lambda r, i: r[i],
    ),
    "predict_soft": (lambda m, **k: m.predict(soft=True, **k).to_numpy(), lambda r, i: r[i]),
    "reconstruction": (
        lambda m, **k: m.get_reconstruction_error(return_mean=False, **k)[
            "reconstruction_loss"
        ].numpy(),
        lambda r, i: r[i],
    ),
    "library": (lambda m, **k: m.get_latent_library_size(**k), lambda r, i: r[i]),
}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_shuffled_indices_and_permuted_anndata(trained, name):
    model, adata = trained
    call, rows = DETERMINISTIC[name]
    reference = call(model)
    shuffled = np.random.default_rng(2).permutation(adata.n_obs)[:250]
    close = {"rtol": 1e-5, "atol": 1e-4}  # per-cell losses are ~1e3: float32 summation order
    np.testing.assert_allclose(call(model, indices=shuffled), rows(reference, shuffled), **close)
    other, perm = _permuted(adata)
    np.testing.assert_allclose(call(model, adata=other), rows(reference, perm), **close)


def test_dataframes_are_labelled_in_the_callers_order(trained):
    model, adata = trained
    idx = np.array([7, 3, 500, 1])
    expr = model.get_normalized_expression(indices=idx)
    assert list(expr.index) == list(adata.obs_names[idx])
    full = model.get_normalized_expression()
    pd.testing.assert_frame_equal(expr, full.iloc[idx], atol=1e-5)
    probs = model.predict(indices=idx, soft=True)
    assert list(probs.index) == list(adata.obs_names[idx])


def test_sampled_outputs_follow_the_callers_order(trained):
    model, adata = trained
    idx = np.random.default_rng(3).permutation(adata.n_obs)[:80]
    torch.manual_seed(0)
    draws = model.posterior_predictive_sample(indices=np.sort(idx), n_samples=1)
    torch.manual_seed(0)
    shuffled = model.posterior_predictive_sample(indices=idx, n_samples=1)
    order = np.searchsorted(np.sort(idx), idx)
    np.testing.assert_array_equal(shuffled.todense(), draws.todense()[order])
    torch.manual_seed(0)
    z = model.get_latent_representation(indices=np.sort(idx), give_mean=False)
    torch.manual_seed(0)
    np.testing.assert_allclose(model.get_latent_representation(indices=idx, give_mean=False),
                               z[order], atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------ scvi-tools methods


def test_normalized_expression_options(trained):
    model, adata = trained
    idx = np.arange(40)
    base = model.get_normalized_expression(indices=idx, library_size=1.0)
    np.testing.assert_allclose(base.to_numpy().sum(1), 1.0, rtol=1e-4)
    samples = model.get_normalized_expression(indices=idx, n_samples=4, return_mean=False)
    assert isinstance(samples, np.ndarray) and samples.shape == (4, 40, adata.n_vars)
    assert np.abs(samples[0] - samples[1]).max() > 0  # posterior samples differ
    batches = list(model.adata_manager.get_state_registry("batch").categorical_mapping)
    other = model.get_normalized_expression(indices=idx, transform_batch=batches[1])
    mixed = model.get_normalized_expression(indices=idx, transform_batch=batches)
    assert np.abs(other.to_numpy() - base.to_numpy()).max() > 0
    assert mixed.shape == base.shape
    counts = model.get_normalized_expression(indices=idx, library_size="latent")
    observed = np.asarray(adata.layers["counts"][idx].sum(1)).ravel()
    np.testing.assert_allclose(counts.to_numpy().sum(1), observed, rtol=1e-4)
    genes = list(adata.var_names[[5, 2]])
    assert list(model.get_normalized_expression(indices=idx, gene_list=genes).columns) == genes
    with pytest.raises(ValueError, match="importance"):
        model.get_normalized_expression(weights="importance")
    with pytest.raises(KeyError, match="cannot decode"):
        model.get_normalized_expression(gene_list=["not_a_gene"])


def test_posterior_predictive_sample_like_scvi(trained):
    import sparse

    model, adata = trained
    one = model.posterior_predictive_sample(indices=np.arange(30))
    assert isinstance(one, sparse.GCXS) and one.shape == (30, adata.n_vars)
    assert np.all(one.todense() >= 0) and np.all(one.todense() == np.round(one.todense()))
    many = model.posterior_predictive_sample(indices=np.arange(30), n_samples=3)
    assert many.shape == (30, adata.n_vars, 3)
    genes = list(adata.var_names[:4])
    assert model.posterior_predictive_sample(indices=np.arange(5), gene_list=genes).shape == (5, 4)
    # the draws follow the library-rescaled NB mean: totals track the observed library sizes
    many = model.posterior_predictive_sample(n_samples=5).todense().mean(-1).sum(1)
    observed = np.asarray(adata.layers["counts"].sum(1)).ravel()
    assert np.corrcoef(many, observed)[0, 1] > 0.95


def test_elbo_marginal_ll_and_correlation(trained):
    model, adata = trained
    elbo = model.get_elbo(indices=np.arange(100))
    assert np.isfinite(float(elbo)) and float(elbo) < 0
    per_cell = model.get_elbo(indices=np.arange(100), return_mean=False)
    assert per_cell.shape == (100,)
    recon = model.get_reconstruction_error(indices=np.arange(100))
    assert float(recon["reconstruction_loss"]) > 0
    torch.manual_seed(0)
    ll = model.get_marginal_ll(indices=np.arange(30), n_mc_samples=20, return_mean=False)
    assert ll.shape == (30,) and torch.isfinite(ll).all()
    # log p(x) >= ELBO in expectation (importance sampling tightens the bound)
    assert (
        ll.mean()
        > -model.get_reconstruction_error(indices=np.arange(30))["reconstruction_loss"] - 1e4
    )
    corr = model.get_feature_correlation_matrix(indices=np.arange(60), n_samples=2)
    assert corr.shape == (adata.n_vars, adata.n_vars)
    assert list(corr.index) == list(adata.var_names)


def test_differential_expression_runs_in_both_modes(trained):
    model, adata = trained
    types = adata.obs["cell_type"].value_counts().index[:2]
    change = model.differential_expression(groupby="cell_type", group1=[types[0]], mode="change")
    assert {"proba_de", "lfc_mean", "bayes_factor", "is_de_fdr_0.05"} <= set(change.columns)
    vanilla = model.differential_expression(
        groupby="cell_type", group1=[types[0]], group2=types[1], mode="vanilla"
    )
    assert {"proba_m1", "bayes_factor"} <= set(vanilla.columns)
    one_type = np.flatnonzero(adata.obs["cell_type"] == types[0])
    halves = model.differential_expression(idx1=one_type[::2], idx2=one_type[1::2])
    assert len(halves) == adata.n_vars


def test_latent_representation_scvi_arguments(trained):
    model, adata = trained
    z = model.get_latent_representation()
    qz_m, qz_v = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(qz_m, z, atol=1e-6)
    # give_mean=False: one draw of q(z|x) per cell, N(0, 1) once standardised
    torch.manual_seed(0)
    sample = model.get_latent_representation(give_mean=False)
    standardised = (sample - qz_m) / np.sqrt(qz_v)
    assert abs(standardised.mean()) < 0.1 and abs(standardised.std() - 1) < 0.1
    loader = model._make_data_loader(adata, indices=np.arange(50)[::-1])
    np.testing.assert_allclose(
        model.get_latent_representation(dataloader=loader), z[np.arange(50)[::-1]], atol=1e-5
    )
    # positional calls in scvi-tools' order: (adata, indices, give_mean, mc_samples, ...)
    np.testing.assert_allclose(model.get_latent_representation(None, None, True), z, atol=1e-6)
    torch.manual_seed(0)
    positional = model.get_latent_representation(None, None, False, 10)
    np.testing.assert_allclose(positional, sample, atol=1e-6)


def test_predict_scanvi_arguments(trained):
    model, _ = trained
    labels = model.predict(use_posterior_mean=True)
    assert labels.shape == (model.adata.n_obs,)
    with pytest.raises(ValueError, match="use_posterior_mean=False"):
        model.predict(use_posterior_mean=False)
    with pytest.raises(ValueError, match="Integrated-gradient"):
        model.predict(ig_interpretability=True)


# ------------------------------------------------------------------ train / setup arguments


def test_train_takes_scvi_arguments(fresh):
    model, _ = fresh
    seen = []

    class Spy(cp.data.TissueDataSplitter):
        def train_dataloader(self):
            loader = super().train_dataloader()
            seen.append(loader.sampler.max_cells)
            return loader

    splitter = Spy(model.adata_manager, max_cells_per_step=64)
    model.train(
        max_epochs=1,
        datamodule=splitter,
        plan_config={"weight_decay": 0.0},
        trainer_config={"enable_progress_bar": False},
        load_sparse_tensor=True,
        accelerator="cpu",
    )
    assert seen == [64]  # the data module's own cell budget, not train()'s batch_size
    # scvi-tools 1.5 forwards batch_size and the split sizes to a data module's
    # set_batch_size/set_split: CellPLM's data modules have none, so their settings hold
    for module_cls in (cp.data.TissueDataSplitter, cp.data.TissueCorpus):
        assert not hasattr(module_cls, "set_batch_size")
        assert not hasattr(module_cls, "set_split")
    model.train(max_epochs=1, batch_size=50, shuffle_set_split=False, **FIT)
    splitter = model.trainer.datamodule  # built by train, handed to scvi-tools as a data module
    assert type(splitter) is cp.data.TissueDataSplitter
    assert splitter.max_cells_per_step == 50
    with pytest.raises(ValueError, match="no batch_size.*max_cells_per_step"):
        cp.data.TissueDataSplitter(model.adata_manager, batch_size=50)
    steps = list(splitter.train_dataloader().sampler)
    assert max(len(rows) for rows in steps) <= 50


def test_reduce_lr_on_plateau_gives_scvis_scheduler(fresh):
    model, _ = fresh
    model.train(
        max_epochs=2,
        train_size=0.7,
        plan_kwargs={"reduce_lr_on_plateau": True, "lr_patience": 1},
        **FIT,
    )
    schedulers = [c.scheduler for c in model.trainer.lr_scheduler_configs]
    assert any(isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) for s in schedulers)


def test_setup_covariates_size_factor_and_errors():
    adata = _simulate(300)
    adata.obs["size"] = np.asarray(adata.layers["counts"].sum(1)).ravel() * 2.0
    CellPLM.setup_anndata(
        adata, layer="counts", size_factor_key="size", categorical_covariate_keys=["platform"]
    )
    model = CellPLM(adata, **ARCH)
    model.is_trained_ = True
    assert "cov_platform" in model.module.decoder.covariate_layers[0]
    counts = model.get_normalized_expression(library_size="latent", indices=np.arange(20))
    np.testing.assert_allclose(counts.sum(1), adata.obs["size"].to_numpy()[:20], rtol=1e-4)
    with pytest.raises(ValueError, match="continuous_covariate_keys"):
        CellPLM.setup_anndata(adata, layer="counts", continuous_covariate_keys=["size"])
    with pytest.raises(ValueError, match="adata.copy()"):
        CellPLM.setup_anndata(adata[:10], layer="counts")
    adata.obs["bad"] = -1.0
    with pytest.raises(ValueError, match="size_factor_key"):
        CellPLM.setup_anndata(adata, layer="counts", size_factor_key="bad")


def test_setup_again_says_tissues_are_recomputed(caplog):
    adata = _simulate(200)
    CellPLM.setup_anndata(adata, layer="counts")
    with caplog.at_level(logging.WARNING, logger="cellplm_scvi"):
        CellPLM.setup_anndata(adata, layer="counts")
    assert "is recomputed" in caplog.text


# ------------------------------------------------------------------ query mapping


def test_prepare_query_pads_missing_genes_as_unmeasured(trained, tmp_path, caplog):
    model, adata = trained
    model.save(tmp_path / "ref")
    query = _simulate(200, seed=5)
    query.obs["sample"] = "query"
    keep = np.r_[10 : adata.n_vars]  # 10 reference genes missing, order shuffled
    shuffled = np.random.default_rng(0).permutation(keep)
    query = query[:, shuffled].copy()
    with caplog.at_level(logging.INFO, logger="cellplm_scvi"):
        CellPLM.prepare_query_anndata(query, tmp_path / "ref")
    assert "10 of 765 reference genes missing" in caplog.text
    assert list(query.var_names) == list(adata.var_names)
    assert query.var["_cellplm_padded"].sum() == 10
    assert sp.csr_matrix(query.layers["counts"])[:, :10].nnz == 0
    names = CellPLM.prepare_query_anndata(query, model, return_reference_var_names=True)
    assert names == list(adata.var_names)
    q = CellPLM.load_query_data(query, tmp_path / "ref")
    layout = q._layout_of(q.adata).tensors()  # as the loader puts it in each minibatch
    measured = q.module.measured_weights(
        {"batch": torch.as_tensor(q.adata_manager.get_from_registry("batch")), **layout}
    )
    assert not measured[:, :10].any() and measured[:, 10:].all()
    # padded genes enter neither the library size nor the loss
    lib = q.get_latent_library_size(indices=np.arange(5)).ravel()
    observed = np.asarray(query.layers["counts"][:5].sum(1)).ravel()
    np.testing.assert_allclose(lib, observed)


def test_load_query_data_arches_arguments(trained):
    model, adata = trained
    query = _simulate(200, seed=6)
    query.obs["sample"] = "query"
    frozen = CellPLM.load_query_data(query.copy(), model)
    trainable = {n for n, p in frozen.module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.covariate_layers") for n in trainable)
    free = CellPLM.load_query_data(query.copy(), model, unfrozen=True)
    assert all(p.requires_grad for p in free.module.parameters())
    head = CellPLM.load_query_data(query.copy(), model, freeze_classifier=False)
    assert any(n.startswith("classifier.") and p.requires_grad
               for n, p in head.module.named_parameters())  # fmt: skip
    no_dropout = CellPLM.load_query_data(query.copy(), model, freeze_dropout=True)
    assert all(m.p == 0 for m in no_dropout.module.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match="freeze_batchnorm_encoder"):
        CellPLM.load_query_data(query.copy(), model, freeze_batchnorm_encoder=True)
    with pytest.raises(ValueError, match="prepare_query_anndata"):
        CellPLM.load_query_data(query[:, ::-1].copy(), model)
    subset = CellPLM.load_query_data(query[:, ::-1].copy(), model, inplace_subset_query_vars=True)
    assert list(subset.adata.var_names) == list(adata.var_names)


# ------------------------------------------------------------------ minified models


def test_minified_model_gives_the_same_expression_and_de(trained):
    model, adata = trained
    expected = model.get_normalized_expression(indices=np.arange(50))
    expected_counts = model.get_normalized_expression(indices=np.arange(50), library_size="latent")
    types = adata.obs["cell_type"].value_counts().index[:1]
    other = unregistered(adata)  # keep the fixture's AnnData: minify a registered copy
    CellPLM.setup_anndata(other, **model.adata_manager.registry["setup_args"])
    copy = CellPLM(other, **ARCH)
    copy.module.load_state_dict(model.module.state_dict())
    copy.is_trained_ = True
    copy.minify_adata()
    assert copy.minified_data_type is not None
    assert sp.issparse(copy.adata.X) and copy.adata.X.nnz == 0
    pd.testing.assert_frame_equal(
        copy.get_normalized_expression(indices=np.arange(50)), expected, atol=1e-5
    )
    pd.testing.assert_frame_equal(
        copy.get_normalized_expression(indices=np.arange(50), library_size="latent"),
        expected_counts,
        atol=1e-3,
        rtol=1e-5,
    )
    de = copy.differential_expression(groupby="cell_type", group1=list(types))
    assert len(de) == adata.n_vars
    for method in (copy.predict, lambda: copy.impute_genes(list(adata.var_names[:2]))):
        with pytest.raises(ValueError, match="minified"):
            method()
    with pytest.raises(ValueError, match="minified"):
        copy.get_elbo()
