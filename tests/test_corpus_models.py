"""A model trained on a TissueCorpus reads new AnnDatas; continued pretraining of official files.

A model built from ``TissueCorpus.registry`` has no AnnData: any AnnData set up with
``CellPLM.setup_anndata`` is aligned to its vocabulary as ``load_official`` aligns one, and must
embed the cells exactly as the corpus loader does (the same tissues: the corpus' tissue codes
are passed as ``tissue_key``) and as the model exported to the official files does.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch

import cellplm_scvi as cp
from cellplm_scvi.data import TissueCorpus
from cellplm_scvi.datasets import random_official_checkpoint
from cellplm_scvi.model import PRETRAINING_CORPUS_KWARGS, pretraining_recipe
from tests._helpers import CORPUS_KWARGS, FIT, corpus

ATOL = 1e-5
GENE_KEYS = CORPUS_KWARGS["gene_key"]  # file 1 names its genes by symbol in var["symbol"]


@pytest.fixture(scope="module")
def trained(corpus_files, tmp_path_factory):
    dm = corpus(corpus_files, cache_dir=tmp_path_factory.mktemp("cache"), validation_size=0.5)
    torch.manual_seed(0)
    model = cp.CellPLM(
        adata=None, registry=dm.registry, n_hidden=32, n_layers=1, n_heads=4, n_latent=8,
        spatial_pe=False,
    )  # fmt: skip
    model.train(datamodule=dm, max_epochs=1, **FIT)
    return dm, model


def _file_adata(dm: TissueCorpus, path, k: int) -> ad.AnnData:
    """Corpus file ``k`` in memory, set up with the corpus' tissues of its cells."""
    adata = ad.read_h5ad(path)
    adata.obs["tissue"] = dm.tissue_codes[dm.offsets[k] : dm.offsets[k + 1]].astype(str)
    cp.CellPLM.setup_anndata(adata, tissue_key="tissue", gene_key=GENE_KEYS[k])
    return adata


def _corpus_embedding(dm: TissueCorpus, model) -> tuple[np.ndarray, np.ndarray]:
    """(global rows, embeddings) of the validation tissues through the corpus loader."""
    z = model.get_latent_representation(dataloader=dm.val_dataloader())
    rows = np.concatenate([b["ind_x"].view(-1).numpy() for b in dm.val_dataloader()])
    return rows, z


@pytest.mark.parametrize("k", [0, 1])  # Ensembl IDs; symbols (gene_key) plus unknown genes
def test_new_adata_embeds_as_the_corpus_and_the_official_export(
    trained, corpus_files, k, tmp_path
):
    dm, model = trained
    adata = _file_adata(dm, corpus_files[k], k)
    z = model.get_latent_representation(adata)
    assert z.shape == (adata.n_obs, 8)
    rows, z_corpus = _corpus_embedding(dm, model)
    in_file = (rows >= dm.offsets[k]) & (rows < dm.offsets[k + 1])
    assert in_file.sum() > 20
    np.testing.assert_allclose(z[rows[in_file] - dm.offsets[k]], z_corpus[in_file], atol=ATOL)

    model.save_official(tmp_path / "export")
    official = cp.CellPLM.load_official(tmp_path / "export", _file_adata(dm, corpus_files[k], k))
    np.testing.assert_allclose(official.get_latent_representation(), z, atol=ATOL)
    expression = model.get_normalized_expression(adata, library_size="observed")
    np.testing.assert_allclose(
        expression.to_numpy(),
        official.get_normalized_expression(library_size="observed").to_numpy(),
        rtol=1e-5,
    )
    assert list(expression.columns) == list(adata.var_names)  # 0 outside the vocabulary


def test_spatial_encoding_with_and_without_coordinates(corpus_files, tmp_path):
    """A model with the spatial encoding (asked for: a spatial from-scratch model leaves it off
    by default, issue 14) reads the spatial file (set up with its coordinates) and a file
    without coordinates (the learned missing-coordinate encoding) as the corpus loader does."""
    dm = corpus(corpus_files, cache_dir=tmp_path, validation_size=0.5)
    torch.manual_seed(0)
    model = cp.CellPLM(
        adata=None, registry=dm.registry, n_hidden=16, n_layers=1, n_latent=4, spatial_pe=True
    )
    assert model.module.use_spatial_pe
    model.train(datamodule=dm, max_epochs=1, **FIT)
    rows, z_corpus = _corpus_embedding(dm, model)
    for k in (0, 2):
        adata = ad.read_h5ad(corpus_files[k])
        adata.obs["tissue"] = dm.tissue_codes[dm.offsets[k] : dm.offsets[k + 1]].astype(str)
        spatial_key = "spatial" if k == 2 else None
        cp.CellPLM.setup_anndata(adata, tissue_key="tissue", spatial_key=spatial_key)
        z = model.get_latent_representation(adata)
        in_file = (rows >= dm.offsets[k]) & (rows < dm.offsets[k + 1])
        assert in_file.sum() > 20
        np.testing.assert_allclose(z[rows[in_file] - dm.offsets[k]], z_corpus[in_file], atol=ATOL)


def test_gene_order_and_unknown_genes_do_not_matter(trained, corpus_files):
    dm, model = trained
    adata = _file_adata(dm, corpus_files[0], 0)
    z = model.get_latent_representation(adata)
    rng = np.random.default_rng(3)
    raw = ad.read_h5ad(corpus_files[0])
    extra = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, (raw.n_obs, 3)).astype(np.float32)))
    extra.var_names, extra.obs_names = ["NOT_A_GENE", "ALSO_NOT", "XYZ123"], raw.obs_names
    other = ad.concat([raw, extra], axis=1, merge="first")
    other = other[:, rng.permutation(other.n_vars)].copy()
    other.obs["tissue"] = adata.obs["tissue"].to_numpy()
    cp.CellPLM.setup_anndata(other, tissue_key="tissue")
    np.testing.assert_allclose(model.get_latent_representation(other), z, atol=ATOL)
    x = model.get_normalized_expression(other)
    assert list(x.columns) == list(other.var_names)  # one column per gene, in order
    unknown = ["NOT_A_GENE", "ALSO_NOT", "XYZ123"]
    assert (x[unknown].to_numpy() == 0).all()  # genes outside the vocabulary are not decoded
    assert (x.drop(columns=unknown).to_numpy() > 0).all()


def test_unusable_adata_is_refused(trained, corpus_files):
    _, model = trained
    raw = ad.read_h5ad(corpus_files[0])
    with pytest.raises(ValueError, match=r"not set up.*setup_anndata"):
        model.get_latent_representation(raw)
    unknown = raw.copy()
    unknown.var_names = [f"UNKNOWN{i}" for i in range(raw.n_vars)]
    cp.CellPLM.setup_anndata(unknown)
    with pytest.raises(ValueError, match=r"cannot be read by this model.*None of the 25"):
        model.get_latent_representation(unknown)
    with pytest.raises(ValueError, match="no AnnData"):
        model.get_latent_representation()


def test_other_methods_and_save_load(trained, corpus_files, tmp_path):
    dm, model = trained
    adata = _file_adata(dm, corpus_files[1], 1)
    z = model.get_latent_representation(adata)
    elbo = model.get_elbo(adata)
    assert np.isfinite(float(elbo))
    assert np.isfinite(model.get_reconstruction_error(adata)["reconstruction_loss"])
    params = model.get_likelihood_parameters(adata)
    assert params["mean"].shape == (adata.n_obs, adata.n_vars)
    unknown = ~adata.var["symbol"].str.startswith("NOT_A_GENE").to_numpy()
    assert (params["mean"][:, ~unknown] == 0).all() and (params["mean"][:, unknown] > 0).all()
    assert model.get_latent_library_size(adata).shape == (adata.n_obs, 1)
    ensembl = _file_adata(dm, corpus_files[0], 0)  # every gene in the vocabulary
    ensembl.obs["half"] = np.where(np.arange(ensembl.n_obs) % 2 == 0, "even", "odd")
    de = model.differential_expression(ensembl, groupby="half", group1="even")
    assert set(de.index) == set(ensembl.var_names)

    model.save(tmp_path / "saved")
    loaded = cp.CellPLM.load(tmp_path / "saved")
    assert loaded.adata is None
    np.testing.assert_allclose(loaded.get_latent_representation(adata), z, atol=1e-6)
    np.testing.assert_allclose(float(loaded.get_elbo(adata)), float(elbo), rtol=1e-2)  # KL draw
    again = cp.CellPLM.load(tmp_path / "saved", adata=adata)
    np.testing.assert_allclose(again.get_latent_representation(adata), z, atol=1e-6)
    unknown_adata = ad.read_h5ad(corpus_files[1])
    cp.CellPLM.setup_anndata(unknown_adata)  # symbols live in var["symbol"]: nothing matches
    with pytest.raises(ValueError, match="gene_key"):
        cp.CellPLM.load(tmp_path / "saved", adata=unknown_adata)


def test_continued_pretraining_of_an_official_checkpoint(corpus_files, tmp_path):
    """``load_official`` then ``train(datamodule=corpus, **pretraining_recipe())``: the optimiser
    runs at the official lr 2e-4 / weight decay 1e-8, and the result exports and reloads."""
    recipe = pretraining_recipe()
    assert recipe == {"lr": 2e-4, "plan_kwargs": {"weight_decay": 1e-8}}
    prefix = tmp_path / "random_85M"
    random_official_checkpoint(prefix, latent="gmvae", n_hidden=32, n_layers=1, n_latent=8)
    kwargs = {**CORPUS_KWARGS, **PRETRAINING_CORPUS_KWARGS, "cache_dir": tmp_path / "cache"}
    dm = TissueCorpus(corpus_files, vocabulary="20230926_85M", **kwargs)
    adata = ad.read_h5ad(corpus_files[0])
    cp.CellPLM.setup_anndata(adata)
    model = cp.CellPLM.load_official(prefix, adata)
    z_before = model.get_latent_representation()
    model.train(datamodule=dm, max_epochs=1, max_steps=3, **recipe, **FIT)
    groups = model.trainer.optimizers[0].param_groups
    assert {g["initial_lr"] for g in groups} == {2e-4}  # before the linear warm-up factor
    assert {g["weight_decay"] for g in groups} == {1e-8}
    assert type(model.trainer.optimizers[0]).__name__ == "AdamW"
    assert model.trainer.global_step == 3
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    z = model.get_latent_representation()  # the AnnData's own gene index is back
    assert z.shape == z_before.shape and not np.allclose(z, z_before, atol=1e-4)
    model.save_official(tmp_path / "continued")
    new = ad.read_h5ad(corpus_files[0])
    cp.CellPLM.setup_anndata(new)
    again = cp.CellPLM.load_official(tmp_path / "continued", new)
    np.testing.assert_allclose(again.get_latent_representation(), z, atol=ATOL)


def test_corpus_vocabulary_must_be_the_models(corpus_files, tmp_path):
    prefix = tmp_path / "random_85M"
    random_official_checkpoint(prefix, n_hidden=16, n_layers=1, n_latent=4)
    adata = ad.read_h5ad(corpus_files[0])
    cp.CellPLM.setup_anndata(adata)
    model = cp.CellPLM.load_official(prefix, adata)
    dm = corpus(corpus_files, cache_dir=tmp_path / "cache")  # 40-gene vocabulary
    with pytest.raises(ValueError, match="vocabulary='20230926_85M'"):
        model.train(datamodule=dm, max_steps=1, **FIT)


# ------------------------------------------------------------------ every reading method

UNKNOWN = ["NOT_A_GENE1", "NOT_A_GENE2", "NOT_A_GENE3"]


def _vocabulary_adata(vocabulary: list[str], n_cells: int = 200) -> ad.AnnData:
    """Cells over the whole vocabulary, in its order: genes with far-apart means (a misread
    column shows), two batches (the second measured three genes in four), coordinates."""
    rng = np.random.default_rng(7)
    rates = np.geomspace(0.2, 8.0, len(vocabulary))[rng.permutation(len(vocabulary))]
    x = rng.poisson(rates * rng.uniform(0.5, 1.5, (n_cells, 1))).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.var_names = vocabulary
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.obs["sample"] = np.where(np.arange(n_cells) < 120, "s1", "s2")
    adata.obs["tissue"] = (np.arange(n_cells) // 50).astype(str)
    adata.obsm["spatial"] = rng.uniform(0, 100, (n_cells, 2))
    panel = np.arange(len(vocabulary)) % 4 != 0
    adata.varm["measured"] = pd.DataFrame({"s2": panel}, index=adata.var_names)
    return adata


def _reordered(adata: ad.AnnData) -> ad.AnnData:
    """``adata``'s genes in another order, with three genes outside the vocabulary among them."""
    rng = np.random.default_rng(8)
    unknown = rng.poisson(3.0, (adata.n_obs, len(UNKNOWN))).astype(np.float32)
    order = rng.permutation(adata.n_vars + len(UNKNOWN))
    other = ad.AnnData(sp.hstack([adata.X, sp.csr_matrix(unknown)], format="csr")[:, order])
    other.var_names = np.asarray([*adata.var_names, *UNKNOWN], dtype=object)[order]
    other.obs = adata.obs.copy()
    other.obsm["spatial"] = adata.obsm["spatial"].copy()
    table = adata.varm["measured"].reindex(other.var_names, fill_value=True)
    other.varm["measured"] = table
    return other


def _setup(adata: ad.AnnData) -> ad.AnnData:
    cp.CellPLM.setup_anndata(
        adata,
        batch_key="sample",
        tissue_key="tissue",
        spatial_key="spatial",
        measured_genes_key="measured",
    )
    return adata


def _seeded(method, *args, **kwargs):
    scvi.settings.seed = 0  # numpy and torch: the same draws for both AnnDatas
    return method(*args, **kwargs)


def test_every_reading_method_reads_a_reordered_adata(trained):
    """Each public reading method of a corpus-trained model gives, on an AnnData whose genes are
    shuffled and mixed with genes outside the vocabulary, what it gives on the same cells in
    vocabulary order (genes outside the vocabulary: 0, not decoded). The loaders carry the
    AnnData's gene layout, so no method can read the columns as the vocabulary's."""
    dm, model = trained
    assert model.module.hide_cell_rate > 0  # the spatial preset: the niche read-out exists
    ordered = _setup(_vocabulary_adata(dm.vocabulary))
    shuffled = _setup(_reordered(ordered))
    genes = list(ordered.var_names)
    assert list(shuffled.var_names) != genes
    position = pd.Index(shuffled.var_names).get_indexer(genes)  # ordered gene -> shuffled column
    unknown = pd.Index(shuffled.var_names).get_indexer(UNKNOWN)
    close = {"rtol": 1e-5, "atol": 1e-5}

    def same(method, columns=False, **kwargs):
        a = _seeded(getattr(model, method), adata=ordered, **kwargs)
        b = _seeded(getattr(model, method), adata=shuffled, **kwargs)
        if isinstance(a, dict):  # get_reconstruction_error
            a, b = a["reconstruction_loss"], b["reconstruction_loss"]
        a, b = (np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v) for v in (a, b))
        if columns:  # one column per gene of the AnnData
            assert (b[:, unknown] == 0).all(), method
            b = b[:, position]
        np.testing.assert_allclose(b, a, err_msg=method, **close)
        return a

    for representation in ("cell", "niche"):
        same("get_latent_representation", representation=representation)
    same("get_latent_representation", give_mean=False)
    same("get_latent_library_size")
    for library_size in (1, "observed"):
        same("get_normalized_expression", columns=True, library_size=library_size)
    subset = genes[3:9]
    for library in ("measured", "all"):
        same("impute_genes", gene_list=subset, library=library)
    same("get_normalized_expression", gene_list=subset, library_size="observed")
    same("get_elbo", return_mean=False)
    same("get_reconstruction_error", return_mean=False)
    same("get_marginal_ll", n_mc_samples=5, return_mean=False)
    for key in ("mean", "dispersions"):
        a = _seeded(model.get_likelihood_parameters, ordered)[key]
        b = _seeded(model.get_likelihood_parameters, shuffled)[key]
        np.testing.assert_allclose(b[:, position], a, err_msg=key, **close)
    assert (_seeded(model.get_likelihood_parameters, shuffled)["mean"][:, unknown] == 0).all()

    # random draws over the genes: another column order draws other numbers, so the means
    # over many draws are compared (the genes' means are far apart: a misread column shows)
    a = _seeded(model.posterior_predictive_sample, ordered, n_samples=40).todense()
    b = _seeded(model.posterior_predictive_sample, shuffled, n_samples=40).todense()
    assert (b[:, unknown] == 0).all()
    a_mean, b_mean = a.mean((0, 2)), b[:, position].mean((0, 2))
    np.testing.assert_allclose(b_mean, a_mean, rtol=0.1)
    # (these genes are independent: their correlations are sampling noise, so only the labels)
    correlation = _seeded(model.get_feature_correlation_matrix, shuffled, n_samples=10)
    assert list(correlation.columns) == list(correlation.index) == list(shuffled.var_names)

    de = {}
    for name, adata in (("ordered", ordered), ("shuffled", shuffled)):
        de[name] = _seeded(
            model.differential_expression, adata, groupby="sample", group1="s1", group2="s2"
        )
    assert set(de["shuffled"].index) == set(shuffled.var_names)
    # raw_normalized_mean* divide the counts by their total over all the AnnData's genes (the
    # shuffled one has three more): the data differ there, not the model
    numeric = [
        c for c in de["ordered"].select_dtypes("number") if not c.startswith("raw_normalized")
    ]
    assert len(numeric) >= 9
    np.testing.assert_allclose(
        de["shuffled"].loc[de["ordered"].index, numeric].to_numpy(dtype=float),
        de["ordered"][numeric].to_numpy(dtype=float),
        **close,
    )


def test_gene_layout_is_built_once_per_adata(trained, monkeypatch):
    """A corpus-trained model aligns a new AnnData's genes once: validation and every loader of
    every later call on it reuse that layout; another AnnData gets its own."""
    from cellplm_scvi._vocabulary import GeneLayout

    dm, model = trained
    built = []
    from_index = GeneLayout.from_index.__func__

    def counting(cls, *args, **kwargs):
        built.append(1)
        return from_index(cls, *args, **kwargs)

    monkeypatch.setattr(GeneLayout, "from_index", classmethod(counting))
    ordered = _setup(_vocabulary_adata(dm.vocabulary))
    shuffled = _setup(_reordered(ordered))
    model.get_latent_representation(shuffled)
    assert len(built) == 1
    model.get_normalized_expression(shuffled, library_size="observed")
    model.get_elbo(shuffled)
    assert len(built) == 1
    model.get_latent_representation(ordered)
    assert len(built) == 2
