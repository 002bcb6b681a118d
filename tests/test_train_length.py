"""Training length a user does not tune (``train(max_epochs=None)``) and the KL warm-up that
follows a from-scratch run's length (official models keep the official schedule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scvi
from anndata import AnnData

import cellplm_scvi as cp
from cellplm_scvi.model._training import (
    KL_WARMUP_SHARE,
    MAX_KL_WEIGHT,
    default_train_steps,
    kl_warmup_kwargs,
    tissue_steps,
)
from cellplm_scvi.model._training_plan import lr_factor

from ._helpers import FIT, build_official, random_counts, save_official, small_config

ARCH = {"n_hidden": 16, "n_layers": 1, "n_heads": 4, "n_latent": 4}


@pytest.mark.parametrize(
    ("n_cells", "cells_per_step", "steps"),
    [
        (700, 700, 500),  # one small sample: the floor
        (6_000, 1_000, 900),  # 150 passes over 6 tissues
        (20_000, 1_000, 3_000),  # 150 passes up to 20,000 cells
        (50_000, 1_000, 3_000),  # beyond: the steps of 20,000 cells (60 passes)
        (50_000, 800, 3_750),  # smaller steps: more of them
        (10_500, 4_000, 500),  # one sample capped at 4000 cells a step: 394 by the rule
        (1_000_000, 100, 10_000),  # 30,000 by the rule: the ceiling
    ],
)
def test_default_length_formula(n_cells, cells_per_step, steps):
    assert default_train_steps(n_cells, cells_per_step) == steps


def test_default_length_refuses_empty_input():
    with pytest.raises(ValueError, match="cells_per_step > 0"):
        default_train_steps(700, 0)


def test_steps_of_an_epoch():
    one_sample = np.zeros(10_500, dtype=int)
    assert tissue_steps(one_sample, batch_size=4000) == (4000.0, 1)  # capped
    assert tissue_steps(one_sample, batch_size=None) == (10_500.0, 1)  # whole tissues
    three = np.repeat([0, 1, 2], [300, 300, 500])
    assert tissue_steps(three, batch_size=4000) == (1100 / 3, 3)  # a step per tissue
    # packed: 1100 capped cells, at most 1000 a step -> 2 steps of 550 cells
    assert tissue_steps(three, batch_size=1000, pack_tissues=True) == (550.0, 2)


@pytest.fixture(scope="module")
def slides():
    """400 simulated cells on 2 slides in tissues of at most 100 cells (the README's calls)."""
    adata = cp.datasets.simulate_tissue(n_cells=400, n_slides=2, seed=0)
    cp.pp.assign_tissues(adata, spatial_key="spatial", library_key="slide", max_cells=100)
    cp.CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", tissue_key="cellplm_tissue"
    )
    return adata


def _train(model, **kwargs):
    scvi.settings.seed = 0
    model.train(**FIT, **kwargs)
    return model.trainer.lightning_module  # the training plan


def test_default_length_reaches_the_trainer(slides):
    n_tissues = slides.obs["cellplm_tissue"].nunique()
    model = cp.CellPLM(slides, **ARCH)
    plan = _train(model, max_steps=2)  # max_epochs=None: the default length
    steps = default_train_steps(slides.n_obs, slides.n_obs / n_tissues)
    assert model.trainer.max_epochs == math.ceil(steps / n_tissues)
    assert model.trainer.global_step == 2  # Lightning's max_steps stops it early
    assert plan.n_steps_kl_warmup == round(KL_WARMUP_SHARE * model.trainer.max_epochs * n_tissues)


def test_from_scratch_warmup_follows_max_epochs(slides):
    n_tissues = slides.obs["cellplm_tissue"].nunique()
    model = cp.CellPLM(slides, **ARCH)  # the "spatial" preset: a VAE latent
    layer = model.module.latent.layers[1]
    assert layer.kl_warmup_steps == 0  # not the official 10,000-step schedule
    for max_epochs in (2, 4):
        plan = _train(model, max_epochs=max_epochs, max_steps=1)
        assert plan.n_steps_kl_warmup == round(KL_WARMUP_SHARE * max_epochs * n_tissues)
        assert plan.n_epochs_kl_warmup is None and plan.max_kl_weight == MAX_KL_WEIGHT
    model = cp.CellPLM(slides, **ARCH)
    layer = model.module.latent.layers[1]
    _train(model, max_epochs=4)  # kl_weight is logged every few steps
    assert float(layer.kl_weight()) == 1.0  # the latent no longer scales the KL down
    weights = model.history["kl_weight"].iloc[:, 0].to_numpy()
    assert weights[0] < weights[-1] <= MAX_KL_WEIGHT  # scvi-tools' warm-up, to its maximum


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"n_epochs_kl_warmup": 3}, (None, 3)),
        ({"n_steps_kl_warmup": 7}, (7, None)),
        ({"n_steps_kl_warmup": None}, (None, None)),  # explicitly none
    ],
)
def test_given_warmup_is_honoured(slides, given, expected):
    model = cp.CellPLM(slides, **ARCH)
    plan = _train(model, max_epochs=3, max_steps=1, plan_kwargs=given)
    assert (plan.n_steps_kl_warmup, plan.n_epochs_kl_warmup) == expected
    assert plan.max_kl_weight == MAX_KL_WEIGHT
    plan = _train(model, max_epochs=3, max_steps=1, plan_kwargs={"max_kl_weight": 1.0})
    assert plan.max_kl_weight == 1.0 and plan.n_steps_kl_warmup is not None


def test_official_schedules_are_kept(slides):
    # the "official" preset's VAE keeps the latent's own 10,000 steps, and nothing is added
    official_vae = cp.CellPLM(slides, preset="official", latent="vae", **ARCH)
    assert official_vae.module.latent.layers[1].kl_warmup_steps == 10_000
    # a given latent schedule is kept outside it too; the mixture latent has none to replace
    own = cp.CellPLM(slides, latent_kwargs={"kl_warmup_steps": 50}, **ARCH)
    gmvae = cp.CellPLM(slides, latent="gmvae", **ARCH)
    for model in (official_vae, own, gmvae):
        assert kl_warmup_kwargs(model, {"lr": 1e-3}, max_epochs=10, steps_per_epoch=4) == {
            "lr": 1e-3
        }


def test_load_official_keeps_the_official_warmup(tmp_path):
    config = small_config("vae")
    prefix = save_official(build_official(config, seed=3), config, tmp_path, "small")
    adata = AnnData(X=random_counts(60, len(config["gene_list"]), 0.2, seed=1))
    adata.var_names = config["gene_list"]
    cp.CellPLM.setup_anndata(adata)
    for overrides in ({}, {"kl_warmup_steps": 0}):  # the official schedule, or the user's
        model = cp.CellPLM.load_official(prefix, adata, **overrides)
        plan = _train(model, max_epochs=3, max_steps=2)
        layer = model.module.latent.layers[1]
        assert layer.kl_warmup_steps == overrides.get("kl_warmup_steps", 10_000)
        assert (plan.n_steps_kl_warmup, plan.n_epochs_kl_warmup) == (None, None)
        assert int(layer.kl_step_count) == 2  # the official counter runs


def test_lr_schedule_shape():
    # warm-up over 4 steps, then flat, then the last 5 of 20 steps falling to 10%
    factors = [lr_factor(s, n_warmup=4, n_decay=5, n_steps=20) for s in range(21)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4:15] == [1.0] * 11
    assert factors[15:] == pytest.approx([1.0, 0.82, 0.64, 0.46, 0.28, 0.1])
    assert [lr_factor(s, 0, 0, 20) for s in (0, 19)] == [1.0, 1.0]  # neither


def test_from_scratch_lr_falls_over_the_last_steps(slides):
    n_tissues = slides.obs["cellplm_tissue"].nunique()
    model = cp.CellPLM(slides, **ARCH)  # "spatial": lr 2e-3, falling over the last 20%
    plan = _train(model, max_epochs=5, plan_kwargs={"n_steps_lr_warmup": 0})
    assert model.trainer.global_step == 5 * n_tissues
    assert plan.lr_decay_share == 0.2
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 2e-3)
    official = cp.CellPLM(slides, preset="official", **ARCH)  # keeps its rate to the end
    plan = _train(official, max_epochs=5, plan_kwargs={"n_steps_lr_warmup": 0})
    assert plan.lr_decay_share == 0.0
    assert official.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="lr_decay_share must be in"):
        _train(model, max_epochs=1, plan_kwargs={"lr_decay_share": 1.5})
