"""Tissue context that carries niche information (issue 14).

The cell-hiding objective (``hide_cell_rate``), the niche read-out
(``get_latent_representation(representation=...)``), tissues re-drawn every epoch
(``train(redraw_tissues=...)``) and the defaults of spatial, non-spatial and official models.
Tiny networks on small simulated slides (real PBMC counts).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch

import cellplm_scvi as cp
from cellplm_scvi import CellPLM
from cellplm_scvi.data import TissueBatchSampler, TissueDataSplitter
from cellplm_scvi.model._presets import resolve_redraw_tissues, saved_init_params
from cellplm_scvi.module import CellPLMModule
from cellplm_scvi.module._masking import apply_mask, sample_mask
from tests._helpers import ARCH
from tests._helpers import FIT as QUIET_CPU

FIT = {**QUIET_CPU, "train_size": 1.0}  # every tissue trains


def _spatial(n_cells: int = 600, seed: int = 0, max_cells: int = 100):
    adata = cp.datasets.simulate_tissue(n_cells=n_cells, n_slides=2, seed=seed)
    CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", library_key="slide", max_cells=max_cells
    )
    return adata


@pytest.fixture(scope="module")
def trained():
    scvi.settings.seed = 0
    adata = _spatial()
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=2, **FIT)
    return model, adata


# ------------------------------------------------------------------------------ objective


def test_sample_mask_hides_whole_cells_among_the_masked():
    torch.manual_seed(0)
    mask = sample_mask(200, 300, 0.75, 0.25, torch.device("cpu"), hide_rate=0.3)
    assert len(mask.cells) == 150 and len(mask.cells.unique()) == 150
    assert mask.n_hidden == 60
    assert mask.entries[:60].all()  # hidden cells: every gene
    partial = mask.entries[60:].float().mean().item()
    assert 0.22 < partial < 0.28  # the others: the official 25% of their genes
    torch.manual_seed(0)
    official = sample_mask(200, 300, 0.75, 0.25, torch.device("cpu"))
    torch.manual_seed(0)
    again = sample_mask(200, 300, 0.75, 0.25, torch.device("cpu"), hide_rate=0.0)
    assert official.n_hidden == 0 and torch.equal(official.cells, again.cells)
    assert torch.equal(official.entries, again.entries)  # hide_rate=0: the same random draw


def test_hidden_cells_reach_the_encoder_empty():
    """In a training step the embedder receives no count of the hidden cells, some of the
    partially masked ones, and all of the unmasked ones."""
    torch.manual_seed(0)
    x = sp.random(120, 40, density=0.5, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    x = torch.sparse_csr_tensor(
        torch.from_numpy(x.indptr), torch.from_numpy(x.indices), torch.from_numpy(x.data),
        size=x.shape,
    )  # fmt: skip
    module = CellPLMModule(40, n_hidden=16, n_layers=1, n_heads=2, n_latent=4, hide_cell_rate=0.3)
    seen = {}
    module.embedder.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    module.train()
    out = module.inference(x)
    mask = out["mask"]
    assert mask.n_hidden == 36 and len(mask.cells) == 90
    fed = seen["x"].to_dense()
    dense = x.to_dense()
    hidden, partial = mask.cells[:36], mask.cells[36:]
    assert fed[hidden].sum() == 0 and dense[hidden].sum() > 0
    assert 0 < fed[partial].count_nonzero() < dense[partial].count_nonzero()
    visible = torch.ones(120, dtype=torch.bool)
    visible[mask.cells] = False
    assert torch.equal(fed[visible], dense[visible])
    # the NB loss covers every masked cell, the DAE term every entry of the hidden ones
    assert mask.entries[:36].all()


def test_apply_mask_zeroes_hidden_rows_sparse_and_dense():
    x = torch.arange(1.0, 13.0).view(4, 3)
    torch.manual_seed(1)
    mask = sample_mask(4, 3, 0.5, 0.0, torch.device("cpu"), hide_rate=0.5)
    assert mask.n_hidden == 2
    for xi in (x, x.to_sparse_csr()):
        out = apply_mask(xi, mask).to_dense()
        assert (out[mask.cells] == 0).all()
        rest = np.setdiff1d(np.arange(4), mask.cells.numpy())
        assert torch.equal(out[rest], x[rest])


def test_hide_cell_rate_is_checked():
    with pytest.raises(ValueError, match="hide_cell_rate must be in"):
        CellPLMModule(10, n_hidden=8, n_heads=2, mask_cell_rate=0.5, hide_cell_rate=0.6)
    with pytest.raises(ValueError, match="hide_cell_rate must be in"):
        CellPLMModule(10, n_hidden=8, n_heads=2, hide_cell_rate=-0.1)


# ------------------------------------------------------------------------------ defaults


def _redraw(model, redraw_tissues):
    """``train(redraw_tissues=...)`` as the model resolves it."""
    setup_args = model.adata_manager.registry["setup_args"]
    return resolve_redraw_tissues(model._preset, setup_args, redraw_tissues)


def test_defaults_spatial_nonspatial_official(tmp_path):
    adata = _spatial(300)
    model = CellPLM(adata, **ARCH)
    assert model.module.hide_cell_rate == 0.3 and not model.module.use_spatial_pe
    assert model.module.mask_cell_rate == 1.0
    assert model.module.latent_type == "vae"
    assert model.module.n_local_heads == ARCH["n_heads"] // 2 and model.module.local_grid == 7
    assert CellPLM(adata, latent="gmvae", n_local_heads=0, **ARCH).module.n_local_heads == 0
    assert model.preset == "spatial" and model.init_params_["non_kwargs"]["preset"] == "spatial"
    assert "preset='spatial'" in model._model_summary_string
    assert "mask_cell_rate=1.0, hide_cell_rate=0.3" in model._model_summary_string
    assert _redraw(model, None) is True
    assert _redraw(model, False) is False
    official_objective = CellPLM(adata, hide_cell_rate=0.0, **ARCH)
    assert _redraw(official_objective, None) is False
    assert official_objective.preset == "official"
    assert official_objective.module.use_spatial_pe  # as before issue 14
    assert official_objective.module.latent_type == "gmvae"
    assert official_objective.module.n_local_heads == 0
    # given tissues (e.g. fields of view) without library_key: slides unknown, no re-drawing
    fov = cp.datasets.simulate_tissue(n_cells=300, n_slides=2, seed=0)
    fov.obs["fov"] = fov.obs["slide"].astype(str) + (fov.obsm["spatial"][:, 0] > 500).astype(str)
    CellPLM.setup_anndata(fov, layer="counts", spatial_key="spatial", tissue_key="fov")
    assert _redraw(CellPLM(fov, **ARCH), None) is False

    plain = cp.datasets.simulate_tissue(n_cells=300, n_slides=1, seed=0)
    del plain.obsm["spatial"]
    CellPLM.setup_anndata(plain, layer="counts")
    flat = CellPLM(plain, **ARCH)
    assert flat.module.hide_cell_rate == 0.0 and flat.preset == "dissociated"
    assert flat.module.mask_cell_rate == 1.0  # every cell in the loss
    assert CellPLM(plain, mask_cell_rate=0.5, **ARCH).module.mask_cell_rate == 0.5
    assert flat.module.latent_type == "vae" and flat.module.n_local_heads == 0
    assert not flat.module.use_spatial_pe and "preset='dissociated'" in flat._model_summary_string
    assert _redraw(flat, None) is False
    with pytest.raises(ValueError, match="redraw_tissues=True needs coordinates"):
        flat.train(max_epochs=1, redraw_tissues=True, **FIT)
    # the preset's learning rate, unless one is given
    flat.train(max_epochs=1, **FIT)
    assert flat.trainer.lightning_module.lr == 2e-3
    flat.train(max_epochs=1, lr=1e-4, **FIT)
    assert flat.trainer.lightning_module.lr == 1e-4
    official_flat = CellPLM(plain, preset="official", **ARCH)
    assert official_flat.module.latent_type == "gmvae"
    assert official_flat.module.mask_cell_rate == 0.75
    official_flat.train(max_epochs=1, **FIT)
    assert official_flat.trainer.lightning_module.lr == 5e-4
    with pytest.raises(ValueError, match="hide_cell_rate > 0"):
        flat.get_latent_representation(representation="niche")

    # an official checkpoint keeps the official objective, even on spatial data
    flat.save_official(tmp_path / "official")
    spatial = _spatial(300)
    official = CellPLM.load_official(tmp_path / "official", spatial)
    assert official.module.hide_cell_rate == 0.0 and official.module.n_local_heads == 0
    assert official.preset == "official"
    assert _redraw(official, None) is False


def _architecture(model) -> tuple:
    module = model.module
    return (
        module.hide_cell_rate,
        module.latent_type,
        module.use_spatial_pe,
        module.n_local_heads,
        module.n_local_heads and module.local_grid,
    )


def test_presets_by_name():
    adata = _spatial(300)
    # a named preset gives the defaults its automatic choice gives
    assert _architecture(CellPLM(adata, preset="official", **ARCH)) == _architecture(
        CellPLM(adata, hide_cell_rate=0.0, **ARCH)
    )
    assert _architecture(CellPLM(adata, preset="spatial", **ARCH)) == (0.3, "vae", False, 2, 7)
    # explicit arguments win over the preset
    mixed = CellPLM(adata, preset="spatial", latent="gmvae", n_local_heads=1, **ARCH)
    assert _architecture(mixed) == (0.3, "gmvae", False, 1, 7)
    with pytest.raises(ValueError, match="preset must be one of"):
        CellPLM(adata, preset="niche", **ARCH)
    plain = cp.datasets.simulate_tissue(n_cells=300, n_slides=1, seed=0)
    del plain.obsm["spatial"]
    CellPLM.setup_anndata(plain, layer="counts")
    with pytest.raises(ValueError, match='preset="spatial" needs coordinates'):
        CellPLM(plain, preset="spatial", **ARCH)


def test_files_saved_before_presets_load_the_same(tmp_path):
    """A file saved before presets records no preset, and no local heads if it predates them:
    it is rebuilt as it was built (here: a cell-hiding spatial model without local heads)."""
    adata = _spatial(300)
    model = CellPLM(adata, n_local_heads=0, **ARCH)
    params = model.init_params_
    del params["non_kwargs"]["preset"]
    params["kwargs"]["module_kwargs"] = {}  # written before the local heads existed
    model.save(tmp_path / "old")
    loaded = CellPLM.load(tmp_path / "old", adata=adata)
    assert _architecture(loaded) == _architecture(model) == (0.3, "vae", False, 0, 0)
    assert loaded.preset == "spatial"
    attributes = {"init_params_": {"non_kwargs": {}, "kwargs": {"module_kwargs": {}}}}
    assert saved_init_params(attributes)["init_params_"]["kwargs"]["module_kwargs"] == {
        "n_local_heads": 0
    }
    new = {"init_params_": {"non_kwargs": {"preset": "spatial"}, "kwargs": {"module_kwargs": {}}}}
    assert saved_init_params(new)["init_params_"]["kwargs"]["module_kwargs"] == {}

    # without coordinates, a file that records no preset was built with the official objective
    # (the default then): it loads as "official", strictly, not as today's "dissociated"
    plain = cp.datasets.simulate_tissue(n_cells=300, n_slides=1, seed=0)
    del plain.obsm["spatial"]
    CellPLM.setup_anndata(plain, layer="counts")
    flat = CellPLM(plain, preset="official", **ARCH)
    flat.is_trained_ = True  # weights as built: enough to compare the two
    del flat.init_params_["non_kwargs"]["preset"]
    flat.save(tmp_path / "flat")
    loaded = CellPLM.load(tmp_path / "flat", adata=plain)
    assert loaded.preset == "official" and loaded.module.latent_type == "gmvae"
    np.testing.assert_allclose(
        loaded.get_latent_representation(), flat.get_latent_representation(), atol=1e-6
    )


# ------------------------------------------------------------------------------ read-out


def test_representation_values_and_errors(trained):
    model, adata = trained
    cell = model.get_latent_representation()
    niche = model.get_latent_representation(representation="niche")
    both = model.get_latent_representation(representation="both")
    assert cell.shape == niche.shape == (adata.n_obs, 8)
    np.testing.assert_array_equal(both, np.hstack([cell, niche]))
    assert not np.allclose(cell, niche, atol=1e-3)
    np.testing.assert_array_equal(niche, model.get_latent_representation(representation="niche"))
    rows = np.array([5, 400, 3, 17])
    np.testing.assert_allclose(
        model.get_latent_representation(indices=rows, representation="niche"),
        niche[rows],
        atol=1e-6,
    )
    other = model.get_latent_representation(representation="niche", seed=1)
    assert not np.allclose(other, niche)
    with pytest.raises(ValueError, match="representation must be"):
        model.get_latent_representation(representation="tissue")
    with pytest.raises(ValueError, match="return_dist=True"):
        model.get_latent_representation(representation="niche", return_dist=True)
    with pytest.raises(ValueError, match="give_mean=False"):
        model.get_latent_representation(representation="niche", give_mean=False)
    sampled = model.get_latent_representation(representation="both", give_mean=False)
    np.testing.assert_array_equal(sampled[:, 8:], niche)  # the niche half stays the mean
    assert not np.allclose(sampled[:, :8], cell)  # the cell half is a posterior sample
    assert model.module.training is False


def test_niche_readout_ignores_own_counts_and_reads_tissue_mates(trained):
    model, adata = trained
    counts = adata.layers["counts"].copy()
    tissue = adata.obs["_cellplm_tissue_code"].to_numpy()
    try:
        before = model.get_latent_representation(representation="both")
        cell0 = 0
        mates = np.flatnonzero((tissue == tissue[cell0]) & (np.arange(adata.n_obs) != cell0))
        changed = counts.tolil()
        changed[cell0] = counts[mates[0]] * 3  # another cell's profile, three times deeper
        adata.layers["counts"] = changed.tocsr()
        own = model.get_latent_representation(representation="both")
        assert not np.allclose(own[cell0, :8], before[cell0, :8], atol=1e-3)  # cell read-out
        np.testing.assert_allclose(own[cell0, 8:], before[cell0, 8:], atol=1e-5)  # niche
        # cell 0 is context of the mates that are not hidden with it (~3/4 of them)
        unchanged = (np.abs(own[mates, 8:] - before[mates, 8:]).max(1) < 1e-5).mean()
        assert unchanged < 0.4, unchanged

        changed = counts.tolil()
        for m in mates:
            changed[m] = counts[m] * 3
        adata.layers["counts"] = changed.tocsr()
        after = model.get_latent_representation(representation="niche")
        assert np.abs(after[cell0] - before[cell0, 8:]).max() > 1e-3
        others = tissue != tissue[cell0]  # other tissues never see this one
        np.testing.assert_allclose(after[others], before[others, 8:], atol=1e-5)
    finally:
        adata.layers["counts"] = counts


# ------------------------------------------------------------------------------ re-drawn tissues


def _spread(xy: np.ndarray, tissues: list[np.ndarray]) -> float:
    """Mean distance of a cell to the centroid of its tissue."""
    return float(np.mean([np.linalg.norm(xy[c] - xy[c].mean(0), axis=1).mean() for c in tissues]))


def test_redrawn_tissues_differ_per_epoch_and_stay_whole_and_local():
    adata = _spatial(800)
    manager = CellPLM(adata, **ARCH).adata_manager
    splitter = TissueDataSplitter(
        manager, train_size=1.0, redraw_tissues=True, max_cells_per_step=None
    )
    sampler = splitter.train_dataloader().sampler
    assert isinstance(sampler, TissueBatchSampler)
    xy = adata.obsm["spatial"]
    slide = adata.obs["slide"].cat.codes.to_numpy()
    registered = adata.obs["_cellplm_tissue_code"].to_numpy()
    registered_tissues = [np.flatnonzero(registered == t) for t in np.unique(registered)]
    partitions = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        steps = list(iter(sampler))
        rows = np.concatenate(steps)
        np.testing.assert_array_equal(np.sort(rows), np.arange(adata.n_obs))  # each cell once
        for cells in steps:
            assert len(np.unique(slide[cells])) == 1  # never across slides
        # local: as compact as the registered (squidpy bisection) tissues
        assert _spread(xy, steps) < 1.25 * _spread(xy, registered_tissues)
        sizes = [len(c) for c in steps]
        assert 0.5 * 100 < np.mean(sizes) < 2 * 100  # about the registered tissues' size
        label = np.empty(adata.n_obs, dtype=np.int64)
        for i, cells in enumerate(steps):
            label[cells] = i
        partitions.append(label)
    same = partitions[0][:, None] == partitions[0][None, :]
    assert (same != (partitions[1][:, None] == partitions[1][None, :])).mean() > 0.02
    # validation / inference loaders keep the registered tissues
    for cells in splitter._loader(np.arange(adata.n_obs), train=False).sampler:
        assert len(np.unique(registered[cells])) == 1


# ------------------------------------------------------------------------------ niche signal


@pytest.mark.slow
def test_niche_readout_carries_niche_signal():
    """The niche read-out predicts the niche better than PCA of the counts (no context) and the
    cell's own latent do (a linear probe on a small simulated tissue; a short training)."""
    from cellplm_scvi.metrics import linear_probe

    scvi.settings.seed = 0
    adata = _spatial(1600, seed=3, max_cells=200)
    model = CellPLM(adata, n_hidden=64, n_layers=2, n_latent=16, spatial_pe=False)
    model.train(max_epochs=25, lr=1e-3, **FIT)
    niche = model.get_latent_representation(representation="niche")
    cell = model.get_latent_representation()
    x = adata.layers["counts"].toarray()
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    from sklearn.decomposition import PCA

    pcs = PCA(16, random_state=0).fit_transform(x)
    f1 = {
        name: linear_probe(rep, adata.obs["niche"], seed=0)
        for name, rep in {"niche": niche, "cell": cell, "pca": pcs}.items()
    }
    assert f1["niche"] > f1["pca"] + 0.04 and f1["niche"] > f1["cell"] + 0.03, f1
