"""``CellPLM.train`` on tissue minibatches: validation tissues and history, loss decrease, both
latents with and without the spatial encoding, tissues from batches or given explicitly, the
training objective on every call, seeded reproducibility, mixed precision.

(Training arguments and their checks: ``test_training_inputs.py``; step checkpoints and resume:
``test_resume.py``; the official training step: ``test_official_training_parity.py``.)
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from cellplm_scvi import CellPLM
from tests._anndata_checks import unregistered
from tests._helpers import (
    ARCH,
    FIT,
    FOV_SETUP,
    FOV_VAL,
    N_SLIDES_CELLS,
    VALIDATE_EVERY_EPOCH,
    history_values,
)

# -------------------------------------------------------------------------------------- training


def test_train_from_h5ad_with_validation_tissues(fitted):
    model, adata = fitted
    assert model.is_trained
    # a from-scratch spatial model hides cells (issue 14) and then leaves the encoding off
    assert model.module.hide_cell_rate > 0 and not model.module.use_spatial_pe
    history = model.history
    for key in ("train_loss", "validation_loss"):
        assert key in history, f"{key} missing from history ({list(history)})"
        values = history[key].to_numpy(dtype=float).ravel()
        assert len(values) == 2
        assert np.isfinite(values).all()
    # validation tissues are whole tissues disjoint from the training tissues
    tissues = adata.obs["_cellplm_tissue_code"].to_numpy()
    assert len(np.unique(tissues)) > 2
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, ARCH["n_latent"])
    assert np.isfinite(z).all()


def test_loss_decreases(fitted):
    _, adata = fitted
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    assert not model.is_trained
    model.train(max_epochs=5, lr=1e-3, train_size=0.8, **FIT, **VALIDATE_EVERY_EPOCH)
    train = model.history["train_loss"].to_numpy(dtype=float).ravel()
    val = model.history["validation_loss"].to_numpy(dtype=float).ravel()
    assert len(train) == len(val) == 5
    assert np.isfinite(train).all() and np.isfinite(val).all()
    assert val[-1] < val[0], val
    assert train[-2:].mean() < train[0], train


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
@pytest.mark.parametrize("spatial_pe", [True, False])
def test_latents_and_spatial_encoding(slides, latent, spatial_pe):
    adata = slides.copy()
    CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial", tissue_key="fov")
    scvi.settings.seed = 0
    # no local heads: they too read the coordinates (tests/test_spatial_kernel.py)
    model = CellPLM(adata, latent=latent, spatial_pe=spatial_pe, n_local_heads=0, **ARCH)
    assert model.module.latent_type == latent
    assert model.module.use_spatial_pe is spatial_pe
    model.train(max_epochs=1, **FIT)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, ARCH["n_latent"])
    assert np.isfinite(z).all()

    # Same cells and tissues, coordinates swapped between cells: only the encoding changes.
    moved = unregistered(adata)
    moved.obsm["spatial"] = adata.obsm["spatial"][
        np.random.default_rng(0).permutation(N_SLIDES_CELLS)
    ]
    z_moved = model.get_latent_representation(moved)
    if spatial_pe:
        assert np.abs(z_moved - z).max() > 1e-3
    else:
        np.testing.assert_allclose(z_moved, z, atol=1e-5)


def test_non_spatial_grouped_by_batch(slides):
    adata = slides.copy()
    del adata.obsm["spatial"]
    CellPLM.setup_anndata(adata, layer="counts", batch_key="slide", max_cells=150)
    tissues = adata.obs["cellplm_tissue"]
    assert tissues.value_counts().max() <= 150
    assert (adata.obs.groupby(tissues, observed=True)["slide"].nunique() == 1).all()
    with pytest.raises(ValueError, match="spatial_pe=True needs coordinates"):
        CellPLM(adata, spatial_pe=True, **ARCH)
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    assert not model.module.use_spatial_pe
    assert model.summary_stats.n_batch == 2
    model.train(max_epochs=1, **FIT)
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, ARCH["n_latent"])
    assert np.isfinite(z).all()


def test_tissue_key_given_explicitly(fov_model):
    model, adata = fov_model
    assert model.is_trained
    assert "cellplm_tissue" not in adata.obs  # no tissues computed
    codes = adata.obs["_cellplm_tissue_code"]
    # one code per field of view, and one field of view per code
    assert (adata.obs.groupby("fov", observed=True)["_cellplm_tissue_code"].nunique() == 1).all()
    assert (adata.obs.groupby(codes)["fov"].nunique() == 1).all()
    assert codes.nunique() == adata.obs["fov"].nunique()


def test_second_train_call_uses_the_training_objective(slides, monkeypatch):
    adata = slides.copy()
    CellPLM.setup_anndata(adata, layer="counts", tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=1, train_size=1.0, **FIT)
    inference, masked = model.module.inference, []

    def spy(*args, **kwargs):
        out = inference(*args, **kwargs)
        masked.append(out["mask"] is not None)
        return out

    monkeypatch.setattr(model.module, "inference", spy)
    model.train(max_epochs=1, train_size=1.0, **FIT)  # no validation: every call is a step
    assert masked, "no training step ran"
    assert all(masked), "training steps ran in eval mode (no masking)"


# ----------------------------------------------------------------------------------- determinism


def _fit_from_scratch(adata: ad.AnnData, seed: int) -> CellPLM:
    adata = unregistered(adata)
    CellPLM.setup_anndata(adata, **FOV_SETUP)
    scvi.settings.seed = seed
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=2, **FOV_VAL, **FIT)
    return model


def test_seeded_training_is_reproducible(fov_slides):
    first, second = _fit_from_scratch(fov_slides, 0), _fit_from_scratch(fov_slides, 0)
    assert set(first.history) == set(second.history)
    for key in first.history:
        pd.testing.assert_frame_equal(first.history[key], second.history[key], check_exact=True)
    z = first.get_latent_representation()
    np.testing.assert_array_equal(z, second.get_latent_representation())
    other = _fit_from_scratch(fov_slides, 1)  # the seed matters
    assert not np.array_equal(
        history_values(other, "train_loss"), history_values(first, "train_loss")
    )
    assert np.abs(other.get_latent_representation() - z).max() > 1e-4


# ------------------------------------------------------------------------------- mixed precision


def test_mixed_precision_loss_stays_float32(gmvae_model):
    """Under bf16 autocast (Lightning's ``precision="bf16-mixed"``) the NB loss is computed in
    float32 from exact counts (bf16 holds integers exactly only up to 256) and stays close to
    the float32 loss."""
    from cellplm_scvi._constants import X_KEY
    from cellplm_scvi.module._loss import masked_nb_loss

    model, adata = gmvae_model
    module = model.module.eval()
    tensors = next(iter(model._make_data_loader(model._validate_anndata(adata))))
    tensors[X_KEY] = tensors[X_KEY] * 300.0  # counts well above 256
    with torch.inference_mode():
        _, _, ref = module(tensors)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, gen, low = module(tensors)
    assert gen["px_mean"].dtype == torch.bfloat16  # the network itself did run in bf16
    low, ref = (
        low.reconstruction_loss["reconstruction_loss"],
        ref.reconstruction_loss["reconstruction_loss"],
    )
    assert low.dtype == torch.float32
    assert ((low - ref).abs() / ref).max() < 2e-2
    # exactly the float32 formula on the bf16 network outputs and the exact counts
    exact = masked_nb_loss(
        module.observed_counts(tensors[X_KEY]).float(),
        gen["px_mean"].float(),
        gen["px_theta"].float(),
    )
    torch.testing.assert_close(low, exact, rtol=1e-6, atol=0.0)


def test_mixed_precision_training(fov_slides, monkeypatch):
    adata = fov_slides.copy()
    CellPLM.setup_anndata(adata, **FOV_SETUP)
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    generative, dtypes = model.module.generative, []

    def spy(*args, **kwargs):  # the decoder's output dtype in each step
        out = generative(*args, **kwargs)
        dtypes.append(out["px_mean"].dtype)
        return out

    monkeypatch.setattr(model.module, "generative", spy)
    model.train(max_epochs=2, precision="bf16-mixed", **FIT)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the precision reached the trainer
    loss = model.history["train_loss"].to_numpy(dtype=float).ravel()
    assert len(loss) == 2 and np.isfinite(loss).all()
    assert all(p.dtype == torch.float32 for p in model.module.parameters())  # master weights
    assert np.isfinite(model.get_latent_representation()).all()
