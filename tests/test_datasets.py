"""Tests for the offline datasets: recovered PBMC counts and the simulated tissue."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial import cKDTree

from cellplm_scvi.datasets import _pbmc, pbmc68k_counts, simulate_tissue
from tests._anndata_checks import dense

OBS_COLUMNS = ["slide", "niche", "cell_type", "responder", "source_cell"]
MONOCYTE = "CD14+ Monocyte"


@pytest.fixture(scope="module")
def cells() -> AnnData:
    return pbmc68k_counts()


@pytest.fixture(scope="module")
def tissue(cells: AnnData) -> AnnData:
    return simulate_tissue(cells, seed=0)


def _is_integer_counts(x) -> bool:
    data = x.data if sp.issparse(x) else np.asarray(x)
    return bool((data >= 0).all() and np.array_equal(data, np.rint(data)))


def test_pbmc_counts_are_integers_and_reproduce_raw(cells: AnnData) -> None:
    reference = sc.datasets.pbmc68k_reduced()
    assert cells.shape == (700, 765)
    assert sp.isspmatrix_csr(cells.X) or isinstance(cells.X, sp.csr_array)
    assert cells.X.dtype == np.float32
    assert _is_integer_counts(cells.X)
    assert (cells.layers["counts"] != cells.X).nnz == 0
    assert list(cells.var_names) == list(reference.raw.var_names)
    assert list(cells.obs_names) == list(reference.obs_names)

    n_counts = cells.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    renormalised = np.log1p(dense(cells.X) / n_counts * 1e4)
    np.testing.assert_allclose(renormalised, dense(reference.raw.X), atol=2e-3)


def test_pbmc_labels(cells: AnnData) -> None:
    labels = cells.obs["cell_type"]
    assert labels.dtype == "category"
    assert labels.notna().all()
    assert labels.nunique() == 10
    assert (labels == MONOCYTE).sum() == 129


def test_pbmc_counts_raises_when_recovery_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    original = sc.datasets.pbmc68k_reduced

    def corrupted() -> AnnData:
        adata = original()
        adata.obs["n_counts"] = adata.obs["n_counts"] * 1.37
        return adata

    monkeypatch.setattr(_pbmc.sc.datasets, "pbmc68k_reduced", corrupted)
    with pytest.raises(ValueError, match="recovery"):
        pbmc68k_counts()


def test_simulate_shapes_and_metadata(cells: AnnData, tissue: AnnData) -> None:
    assert tissue.shape == (6000, cells.n_vars)
    assert list(tissue.var_names) == list(cells.var_names)
    assert set(OBS_COLUMNS) <= set(tissue.obs.columns)
    assert tissue.obsm["spatial"].shape == (6000, 2)
    assert np.issubdtype(tissue.obsm["spatial"].dtype, np.floating)
    assert (tissue.obsm["spatial"] >= 0).all() and (tissue.obsm["spatial"] <= 1000).all()
    for key in ["slide", "niche", "cell_type"]:
        assert tissue.obs[key].dtype == "category"
    assert list(tissue.obs["slide"].cat.categories) == ["slide0", "slide1"]
    assert tissue.obs["slide"].value_counts().tolist() == [3000, 3000]
    assert list(tissue.obs["niche"].cat.categories) == [f"niche{i}" for i in range(5)]
    assert tissue.obs["responder"].dtype == bool
    assert set(tissue.obs["source_cell"]) <= set(cells.obs_names)
    # every simulated cell has the type of the real cell it copies
    source_type = cells.obs["cell_type"].astype(str).loc[tissue.obs["source_cell"]]
    assert (source_type.to_numpy() == tissue.obs["cell_type"].astype(str).to_numpy()).all()

    assert tissue.X.dtype == np.float32 and sp.issparse(tissue.X)
    assert _is_integer_counts(tissue.X)
    assert (tissue.layers["counts"] != tissue.X).nnz == 0
    params = tissue.uns["simulation"]
    assert params["seed"] == 0 and params["effect"] == 1.5
    assert len(params["module_genes"]) == 20
    assert set(params["module_genes"]) <= set(cells.var_names)


def test_simulate_is_deterministic_per_seed(cells: AnnData, tissue: AnnData) -> None:
    again = simulate_tissue(cells, seed=0)
    other = simulate_tissue(cells, seed=1)
    assert (again.X != tissue.X).nnz == 0
    np.testing.assert_array_equal(again.obsm["spatial"], tissue.obsm["spatial"])
    assert again.obs.equals(tissue.obs)
    assert list(again.uns["simulation"]["module_genes"]) == list(
        tissue.uns["simulation"]["module_genes"]
    )

    assert not np.allclose(other.obsm["spatial"], tissue.obsm["spatial"])
    assert (other.X != tissue.X).nnz > 0
    assert (other.obs["source_cell"] != tissue.obs["source_cell"]).mean() > 0.5


def test_simulate_thinning_only_never_exceeds_source(cells: AnnData) -> None:
    thinned = simulate_tissue(cells, n_cells=2000, effect=1.0, thinning=0.6, seed=3)
    assert _is_integer_counts(thinned.X)
    source = cells[thinned.obs["source_cell"].to_numpy()].X
    assert (thinned.X > source).nnz == 0
    # binomial thinning keeps about 60% of the counts
    ratio = thinned.X.sum() / source.sum()
    assert 0.58 < ratio < 0.62
    # copies of the same real cell differ
    source_cells = thinned.obs["source_cell"]
    copies = np.flatnonzero(source_cells == source_cells.value_counts().idxmax())
    assert copies.size > 1
    assert (thinned.X[copies[0]] != thinned.X[copies[1]]).nnz > 0


def test_niches_are_spatially_contiguous(tissue: AnnData) -> None:
    for slide in tissue.obs["slide"].cat.categories:
        mask = (tissue.obs["slide"] == slide).to_numpy()
        coords = tissue.obsm["spatial"][mask]
        niche = tissue.obs["niche"].cat.codes.to_numpy()[mask]
        nearest = cKDTree(coords).query(coords, k=2)[1][:, 1]
        assert (niche[nearest] == niche).mean() > 0.8
        # all niches occur on each slide
        assert np.unique(niche).size == 5


def test_responders_are_non_monocytes_next_to_monocytes(tissue: AnnData) -> None:
    responder = tissue.obs["responder"].to_numpy()
    cell_type = tissue.obs["cell_type"].astype(str).to_numpy()
    assert 50 < responder.sum() < 0.5 * tissue.n_obs
    assert (cell_type[responder] != MONOCYTE).all()

    # recompute the rule independently for one slide
    mask = (tissue.obs["slide"] == "slide0").to_numpy()
    coords = tissue.obsm["spatial"][mask]
    neighbours = cKDTree(coords).query(coords, k=11)[1][:, 1:]
    fraction = (cell_type[mask][neighbours] == MONOCYTE).mean(axis=1)
    expected = (cell_type[mask] != MONOCYTE) & (fraction >= 0.3)
    np.testing.assert_array_equal(responder[mask], expected)


def test_module_genes_are_up_in_responders(cells: AnnData, tissue: AnnData) -> None:
    module = tissue[:, list(tissue.uns["simulation"]["module_genes"])].X
    module_sum = np.asarray(module.sum(axis=1)).ravel()
    responder = tissue.obs["responder"].to_numpy()
    cell_type = tissue.obs["cell_type"].astype(str).to_numpy()

    # same cell type, non-responders as baseline (same pool of real source cells)
    observed, expected = 0.0, 0.0
    for label in np.unique(cell_type[responder]):
        resp = responder & (cell_type == label)
        ctrl = ~responder & (cell_type == label)
        if ctrl.sum() < 20:
            continue
        observed += module_sum[resp].sum()
        expected += resp.sum() * module_sum[ctrl].mean()
    assert observed / expected > 1.25

    # against the thinned source cells: x1.5 in responders, unchanged otherwise
    source = cells[tissue.obs["source_cell"].to_numpy()]
    source_sum = np.asarray(source[:, list(tissue.uns["simulation"]["module_genes"])].X.sum(1))
    source_sum = 0.6 * source_sum.ravel()
    assert module_sum[responder].sum() / source_sum[responder].sum() == pytest.approx(1.5, 0.05)
    assert module_sum[~responder].sum() / source_sum[~responder].sum() == pytest.approx(1.0, 0.03)


def test_simulate_default_cells_and_h5ad_roundtrip(tmp_path) -> None:
    adata = simulate_tissue(n_cells=300, n_slides=3, seed=5)
    assert adata.shape == (300, 765)
    assert list(adata.obs["slide"].cat.categories) == ["slide0", "slide1", "slide2"]
    path = tmp_path / "tissue.h5ad"
    adata.write_h5ad(path)
    back = sc.read_h5ad(path)
    assert (back.X != adata.X).nnz == 0
    assert list(back.uns["simulation"]["module_genes"]) == list(
        adata.uns["simulation"]["module_genes"]
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"thinning": 0.0}, ValueError, r"`thinning` must be in \(0, 1\], got 0.0"),
        ({"effect": -1.0}, ValueError, r"`effect` must be positive, got -1.0"),
        ({"label_key": "missing"}, KeyError, r"`cells.obs` has no column 'missing'"),
        ({"n_module_genes": 10_000}, ValueError, r"cannot draw a module of 10000 genes"),
    ],
)
def test_simulate_rejects_bad_arguments(
    cells: AnnData, kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        simulate_tissue(cells, n_cells=100, **kwargs)


@pytest.mark.parametrize("latent", ["vae", "gmvae"])
def test_random_official_checkpoint_loads_strictly_in_the_official_package(tmp_path, latent):
    """The random release has exactly the official keys (no training counters of ours)."""
    import json

    import torch
    from CellPLM.model import OmicsFormer

    from cellplm_scvi.datasets import random_official_checkpoint

    config_path, ckpt_path = random_official_checkpoint(
        tmp_path / latent, latent=latent, n_hidden=32, n_layers=1, n_latent=8
    )
    official = OmicsFormer(**json.loads(config_path.read_text()))
    state = torch.load(ckpt_path, weights_only=True)["model_state_dict"]
    official.load_state_dict(state, strict=True)
