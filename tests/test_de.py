"""Differential expression with CellPLM (scvi-tools' ``RNASeqMixin`` in tissue context) finds
the markers of the 700 real PBMCs (issue 11).

One small model (n_hidden 128, 2 layers) is trained once for the module on the whole sample as
one tissue. The ranking rule is the one of ``benchmarks/bench_de.py``: genes with
``lfc_mean > 0`` in the ``"<type> vs Rest"`` table, by ``proba_de`` then ``lfc_mean``, first
20; the reference is scanpy's Wilcoxon top-20 on ``normalize_total`` + ``log1p`` counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scvi

import cellplm_scvi as cp
from tests._helpers import FIT

CONFIG = {"n_hidden": 128, "n_layers": 2, "n_latent": 32}
EPOCHS = 100
N_TOP = 20
FDR_COLUMN = "is_de_fdr_0.05"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained():
    """(AnnData, CellPLM trained on it): the PBMCs as one tissue, seed 0."""
    scvi.settings.seed = 0
    adata = cp.datasets.pbmc68k_counts()
    cp.CellPLM.setup_anndata(adata, layer="counts")
    model = cp.CellPLM(adata, **CONFIG)
    model.train(max_epochs=EPOCHS, lr=1e-3, train_size=1.0, **FIT)
    return adata, model


@pytest.fixture(scope="module")
def wilcoxon_top(trained) -> dict[str, list[str]]:
    """Cell type -> scanpy's Wilcoxon top-20 genes (one type vs the rest)."""
    adata, _ = trained
    lognorm = sc.AnnData(adata.layers["counts"].copy(), obs=adata.obs[["cell_type"]].copy())
    lognorm.var_names = adata.var_names
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.tl.rank_genes_groups(lognorm, "cell_type", method="wilcoxon", n_genes=N_TOP)
    names = pd.DataFrame(lognorm.uns["rank_genes_groups"]["names"])
    return {group: list(names[group]) for group in names.columns}


def top_up(de: pd.DataFrame, group: str, n_top: int = N_TOP) -> list[str]:
    """``n_top`` up-regulated genes of ``group`` in a ``mode="change"`` table."""
    table = de[de["group1"] == group]
    up = table[table["lfc_mean"] > 0]
    ranked = up.sort_values(["proba_de", "lfc_mean"], ascending=False, kind="mergesort")
    return list(ranked.index[:n_top])


def cells_of(adata, cell_type: str) -> np.ndarray:
    return np.flatnonzero(adata.obs["cell_type"].to_numpy() == cell_type)


def test_change_mode_markers_overlap_wilcoxon(trained, wilcoxon_top):
    adata, model = trained
    scvi.settings.seed = 0
    de = model.differential_expression(groupby="cell_type", mode="change", silent=True)

    types = list(adata.obs["cell_type"].cat.categories)
    assert sorted(de["group1"].unique()) == sorted(types)
    assert (de.groupby("group1").size() == adata.n_vars).all()  # every gene, every type
    overlap = {t: len(set(top_up(de, t)) & set(wilcoxon_top[t])) for t in types}
    # scVI (100 epochs, same rule, all 10 types): mean 8.9, range 1-14 (bench_de.py)
    assert np.mean(list(overlap.values())) >= 6, overlap


@pytest.mark.parametrize("cell_type", ["Dendritic", "CD14+ Monocyte"])
def test_random_halves_of_one_type_give_almost_no_genes(trained, cell_type):
    adata, model = trained
    scvi.settings.seed = 0
    cells = np.random.default_rng(0).permutation(cells_of(adata, cell_type))
    half = len(cells) // 2
    de = model.differential_expression(
        idx1=cells[:half], idx2=cells[half:], mode="change", silent=True
    )
    assert len(de) == adata.n_vars
    assert de[FDR_COLUMN].sum() <= 0.02 * adata.n_vars


def test_idx1_idx2_is_the_groupby_comparison(trained):
    """Two groups passed as row indices (shuffled) give the table of the same two groups passed
    by name, and B cells against monocytes up-regulate B-cell genes, down-regulate myeloid."""
    adata, model = trained
    rng = np.random.default_rng(1)
    b_cells = rng.permutation(cells_of(adata, "CD19+ B"))
    monocytes = rng.permutation(cells_of(adata, "CD14+ Monocyte"))
    scvi.settings.seed = 0
    by_index = model.differential_expression(
        idx1=b_cells, idx2=monocytes, mode="change", silent=True
    )
    scvi.settings.seed = 0
    by_name = model.differential_expression(
        groupby="cell_type",
        group1=["CD19+ B"],
        group2="CD14+ Monocyte",
        mode="change",
        silent=True,
    )
    columns = ["lfc_mean", "proba_de", "scale1", "scale2", "raw_mean1", "raw_mean2"]
    pd.testing.assert_frame_equal(
        by_index.loc[by_name.index, columns], by_name[columns], check_exact=False, rtol=1e-5
    )
    lfc = by_index["lfc_mean"]
    assert (lfc[["CD79A", "CD79B", "MS4A1"]] > 1).all(), lfc[["CD79A", "CD79B", "MS4A1"]]
    assert (lfc[["LYZ", "S100A8", "S100A9"]] < -1).all(), lfc[["LYZ", "S100A8", "S100A9"]]


def test_vanilla_mode_returns_scvi_columns(trained, wilcoxon_top):
    adata, model = trained
    b_cell = "CD19+ B"
    scvi.settings.seed = 0
    de = model.differential_expression(
        groupby="cell_type", group1=[b_cell], mode="vanilla", silent=True
    )

    reference_adata = adata.copy()
    scvi.model.SCVI.setup_anndata(reference_adata, layer="counts")
    untrained_scvi = scvi.model.SCVI(reference_adata)  # only its table layout is compared
    scvi_de = untrained_scvi.differential_expression(
        groupby="cell_type", group1=[b_cell], mode="vanilla", silent=True
    )
    assert list(de.columns) == list(scvi_de.columns)
    assert sorted(de.index) == sorted(adata.var_names)
    assert np.isfinite(de["bayes_factor"]).all()
    assert de["proba_m1"].between(0, 1).all()

    up = de[de["scale1"] > de["scale2"]].sort_values("bayes_factor", ascending=False)
    assert len(set(up.index[:N_TOP]) & set(wilcoxon_top[b_cell])) >= 8
