"""Genes outside the vocabulary as new rows: ``extend_vocabulary`` and
``load_official(..., extend_vocabulary=True)``.

A random official 19,374-gene checkpoint reads an AnnData of 30 vocabulary genes and 4 genes
outside the vocabulary (two made-up symbols, a made-up Ensembl ID with a version suffix, and the
symbol of a vocabulary gene whose Ensembl ID is also a column, which is not new). Right after
extension the outputs on the old genes are unchanged; the new rows train (alone, with
``train_new_genes_only``); ``save``/``load`` rebuild the wider model; the official package loads
``save_official``'s files strictly and embeds as we do.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellplm_scvi as cp
from cellplm_scvi._genes import symbol_table
from cellplm_scvi.datasets import random_official_checkpoint
from cellplm_scvi.model._extend import NEW_GENE_LOGIT, VOCABULARY_ROWS
from tests._helpers import ARCH, ATOL, FIT, RTOL, max_abs, max_rel, official_forward

N_OLD = 19_374  # rows of the official vocabulary
NEW = ["NEW_GENE_1", "ENSG99999999991.3", "NEW_GENE_2"]  # outside the vocabulary
NEW_ENTRIES = ["NEW_GENE_1", "ENSG99999999991", "NEW_GENE_2"]  # as the vocabulary holds them


def make_adata(vocabulary: list[str], seed: int = 0) -> ad.AnnData:
    """60 cells in two tissues: 30 vocabulary genes, the ``NEW`` genes interleaved, and the
    symbol of the first vocabulary gene (a second name of a matched gene)."""
    symbol = dict(zip(symbol_table()["ensembl_id"], symbol_table()["symbol"]))[vocabulary[0]]
    genes = [NEW[0], *vocabulary[:10], NEW[1], *vocabulary[10:30], symbol, NEW[2]]
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.5, (60, len(genes))).astype(np.float32)))
    adata.var_names = genes
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.obs["tissue"] = pd.Categorical(np.repeat(["a", "b"], 30))
    return adata


def setup(adata: ad.AnnData) -> ad.AnnData:
    with warnings.catch_warnings():  # the symbol's clash with its own Ensembl ID
        warnings.simplefilter("ignore", UserWarning)
        cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
    return adata


def load(prefix, adata, **kwargs) -> cp.CellPLM:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cp.CellPLM.load_official(prefix, adata, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("official") / "random"
    config, _ = random_official_checkpoint(prefix, n_hidden=16, n_layers=1, n_latent=4)
    return prefix, json.loads(config.read_text())["gene_list"]


@pytest.fixture(scope="module")
def models(checkpoint):
    """(official model, the same extended at load, adata)."""
    prefix, vocabulary = checkpoint
    adata = setup(make_adata(vocabulary))
    return load(prefix, adata), load(prefix, adata, extend_vocabulary=True), adata


def renormalised(expression: pd.DataFrame) -> np.ndarray:
    values = expression.to_numpy(dtype=np.float64)
    return values / values.sum(1, keepdims=True)


def test_extension_leaves_the_outputs_on_the_old_genes_unchanged(models, checkpoint):
    model, extended, adata = models
    vocabulary = checkpoint[1]
    assert extended.module.n_vocab == N_OLD + 3
    assert extended.init_params_["non_kwargs"]["vocabulary"] == vocabulary + NEW_ENTRIES
    assert len(model.matched_genes) == 30
    kept = {*NEW, *model.matched_genes}  # all but the symbol of a matched gene
    assert list(extended.matched_genes) == [g for g in adata.var_names if g in kept]
    assert extended.is_trained_ and extended.official_config_ == model.official_config_

    # the latent: exactly the old one (zero embedding rows add nothing)
    np.testing.assert_array_equal(
        extended.get_latent_representation(), model.get_latent_representation()
    )
    # the old genes' normalized expression, renormalised over them: unchanged
    old = list(model.matched_genes)
    before = model.get_normalized_expression(gene_list=old)
    after = extended.get_normalized_expression(gene_list=old)
    assert max_rel(renormalised(after), renormalised(before)) <= 1e-6
    # unrenormalised, one common factor per cell: the new genes' share, each at the floor
    new = extended.get_normalized_expression(gene_list=NEW).to_numpy(dtype=np.float64)
    assert np.allclose(new, new[:, :1], rtol=1e-6)  # one constant mean for every new gene
    share = new.sum(1)
    assert 0 < share.max() < 1e-3
    ratio = after.to_numpy(dtype=np.float64) / before.to_numpy(dtype=np.float64)
    np.testing.assert_allclose(ratio, np.repeat((1 - share)[:, None], len(old), 1), rtol=1e-6)
    # the weights: the old rows as loaded, the new ones zero / at the floor / median dispersion
    ours, theirs = extended.module.state_dict(), model.module.state_dict()
    for key, value in theirs.items():
        if key in VOCABULARY_ROWS:
            assert torch.equal(ours[key][:N_OLD], value), key
        else:
            assert torch.equal(ours[key], value), key
    assert not ours["embedder.feat_enc.emb"][N_OLD:].any()
    assert not ours["decoder.out_layer.dec_mean.0.weight"][N_OLD:].any()
    bias = ours["decoder.out_layer.dec_mean.0.bias"][N_OLD:]
    assert torch.allclose(bias, torch.tensor(NEW_GENE_LOGIT))
    # the not-extended model cannot decode them at all
    with pytest.raises(KeyError, match="cannot decode"):
        model.impute_genes(NEW[:1])
    assert extended.impute_genes(NEW).shape == (adata.n_obs, 3)


def test_extended_gene_embeddings_list_the_new_genes(models):
    _, extended, _ = models
    genes = extended.get_gene_embeddings()
    assert list(genes.index[-3:]) == NEW_ENTRIES
    assert list(genes["symbol"].iloc[-3:]) == NEW_ENTRIES  # no GENCODE symbol: the name
    assert genes["matched"].iloc[-3:].all() and genes["matched"].sum() == 33


@pytest.fixture(scope="module")
def trained(models):
    """The official model extended with its new rows alone trainable, trained 2 epochs."""
    model, _, _ = models
    extended = model.extend_vocabulary(train_new_genes_only=True)
    before = {k: v.clone() for k, v in extended.module.state_dict().items()}
    torch.manual_seed(0)
    extended.train(max_epochs=2, train_size=1.0, lr=1e-2, **FIT)  # new rows well off zero
    extended.module.eval()
    return extended, before


def test_train_new_genes_only_trains_the_new_rows_alone(trained, models):
    extended, before = trained
    after = extended.module.state_dict()
    for key, value in before.items():
        if key in VOCABULARY_ROWS:
            assert torch.equal(after[key][:N_OLD], value[:N_OLD]), key
            assert not torch.equal(after[key][N_OLD:], value[N_OLD:]), key
        elif not key.endswith("kl_step_count"):  # a training counter
            assert torch.equal(after[key], value), key
    assert len(extended.history_["train_loss"]) == 2
    # the official model itself is untouched: every parameter trainable, its vocabulary kept
    model = models[0]
    assert model.module.n_vocab == N_OLD
    frozen = {name for name, p in model.module.named_parameters() if not p.requires_grad}
    assert frozen == {"embedder.pe_enc.pe_enc.weight"}  # the fixed sinusoidal table only


def test_save_and_load_rebuild_the_extended_model(trained, models, tmp_path):
    extended, _ = trained
    adata = models[2]
    extended.save(tmp_path / "extended")
    loaded = cp.CellPLM.load(tmp_path / "extended", adata=adata)
    assert loaded.module.n_vocab == N_OLD + 3
    for key, value in extended.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), extended.get_latent_representation()
    )


def test_official_package_loads_the_extended_export_strictly(trained, models, tmp_path):
    pytest.importorskip("CellPLM")
    from tests._helpers import read_official

    extended, _ = trained
    adata = models[2]
    prefix = str(tmp_path / "extended")
    extended.save_official(prefix)
    config = json.loads(Path(f"{prefix}.config.json").read_text())
    vocabulary = extended.init_params_["non_kwargs"]["vocabulary"]
    assert config["gene_list"] == vocabulary and config["out_dim"] == N_OLD + 3
    off = read_official(prefix)  # OmicsFormer(**config), strict load: every key, every shape

    # the official forward on the vocabulary names of the matched columns
    index = extended._gene_layout.gene_index
    columns = np.flatnonzero(index >= 0)
    genes = [vocabulary[i] for i in index[columns]]
    z = extended.get_latent_representation()
    for tissue in ("a", "b"):
        rows = np.flatnonzero(adata.obs["tissue"].to_numpy() == tissue)
        ref = official_forward(off, adata.X[rows][:, columns], genes)
        assert max_abs(z[rows], ref["mu"].numpy()) <= ATOL
        with torch.no_grad():
            gen = extended.module.generative(ref["mu"])
        assert max_rel(gen["px_mean"], ref["mean"]) <= RTOL
        # negative control: without the new genes the official model embeds otherwise
        old = [k for k, i in enumerate(index[columns]) if i < N_OLD]
        without = official_forward(off, adata.X[rows][:, columns[old]], [genes[k] for k in old])
        assert max_abs(z[rows], without["mu"].numpy()) > 100 * ATOL


def test_extending_a_model_trained_here(checkpoint):
    """A model built here with a ``vocabulary`` extends the same way; ``genes`` picks and
    orders the new rows."""
    vocabulary = checkpoint[1][:40]
    adata = setup(make_adata(checkpoint[1]))
    torch.manual_seed(0)
    model = cp.CellPLM(adata, vocabulary=vocabulary, **ARCH)
    model.train(max_epochs=1, train_size=1.0, **FIT)
    extended = model.extend_vocabulary(genes=[NEW[2], NEW[0]])
    assert model_vocabulary(extended) == vocabulary + [NEW[2], NEW[0]]
    assert extended.module.n_vocab == 42 and extended.is_trained_
    assert extended.history_["train_loss"].equals(model.history_["train_loss"])
    np.testing.assert_array_equal(
        extended.get_latent_representation(), model.get_latent_representation()
    )
    # its own genes as the vocabulary: nothing is outside it
    plain = cp.CellPLM(setup(make_adata(checkpoint[1])[:, 1:11].copy()), **ARCH)
    with pytest.raises(ValueError, match="there is no gene to add"):
        plain.extend_vocabulary()


def model_vocabulary(model):
    return model.init_params_["non_kwargs"]["vocabulary"]


@pytest.mark.parametrize(
    ("genes", "error", "match"),
    [
        ([], ValueError, "genes is empty"),
        ([NEW[0], NEW[0]], ValueError, "more than once"),
        ("NEW_GENE_1", TypeError, "list of gene names"),
        (["NOT_A_COLUMN"], KeyError, "not genes of the registered AnnData"),
        ([NEW[0], "FIRST_VOCABULARY_GENE"], ValueError, "in the model's vocabulary already"),
        ([NEW[0], "CLASHING_SYMBOL"], ValueError, "in the model's vocabulary already"),
    ],
)
def test_bad_genes_are_refused(models, genes, error, match):
    model, _, adata = models
    if genes and not isinstance(genes, str):
        names = {
            "FIRST_VOCABULARY_GENE": adata.var_names[1],
            "CLASHING_SYMBOL": adata.var_names[-2],
        }
        genes = [names.get(g, g) for g in genes]
    with pytest.raises(error, match=match):
        model.extend_vocabulary(genes)


def test_other_misuse_is_refused(models, checkpoint):
    model, extended, adata = models
    with pytest.raises(ValueError, match="train_new_genes_only must be True or False"):
        model.extend_vocabulary(train_new_genes_only="yes")
    with pytest.raises(ValueError, match="extend_vocabulary must be True or False"):
        cp.CellPLM.load_official(checkpoint[0], adata, extend_vocabulary="all")
    with pytest.raises(ValueError, match="there is no gene to add"):
        extended.extend_vocabulary()  # extended already: every gene is in the vocabulary
    # two versions of one new Ensembl ID would be one vocabulary entry
    versions = make_adata(checkpoint[1])
    versions.var_names = [*versions.var_names[:-2], "ENSG99999999991.4", NEW[2]]
    versioned = load(checkpoint[0], setup(versions))
    with pytest.raises(ValueError, match="versions of the same Ensembl ID"):
        versioned.extend_vocabulary()
    # a minified AnnData has no counts of the new genes
    minified = load(checkpoint[0], setup(make_adata(checkpoint[1])))
    minified.minify_adata()
    with pytest.raises(ValueError, match="minified"):
        minified.extend_vocabulary()


def test_genes_come_from_the_gene_key_column(checkpoint):
    """With ``setup_anndata(gene_key=...)`` the new entries are that column's names; a missing
    value (e.g. a mouse gene without a one-to-one ortholog) is no gene and is not added."""
    adata = make_adata(checkpoint[1])
    adata.var["name"] = list(adata.var_names)
    adata.var.loc[NEW[0], "name"] = None
    adata.var_names = [f"column{i}" for i in range(adata.n_vars)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cp.CellPLM.setup_anndata(adata, tissue_key="tissue", gene_key="name")
    extended = load(checkpoint[0], adata, extend_vocabulary=True)
    assert model_vocabulary(extended)[N_OLD:] == NEW_ENTRIES[1:]
    matched = set(extended.matched_genes)  # var_names: column0 holds the missing name
    assert "column0" not in matched and len(matched) == 32  # 30 + 2 new; not the clash
    with pytest.raises(KeyError, match="not genes of the registered AnnData"):
        extended.extend_vocabulary(["column0"])  # a var_name, not a gene_key name
