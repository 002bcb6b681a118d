"""``CellPLM`` perturbation prediction: ``setup_anndata(perturbation_key=...)``, the
perturbation objective of ``train`` and ``predict_perturbation`` (see
``cellplm_scvi/model/_perturbation.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellplm_scvi as cp
from cellplm_scvi.official._mixin import model_vocabulary
from tests._helpers import ARCH, FIT

SCREEN = {
    "n_perturbed_genes": 8,
    "n_doubles": 6,
    "cells_per_condition": 30,
    "n_control_cells": 150,
}
EPOCHS = 30


def _screen():
    return cp.datasets.simulate_perturbation(**SCREEN)


def _conditions(adata, condition_type: str) -> list[str]:
    rows = adata.obs["condition_type"] == condition_type
    return sorted(adata.obs.loc[rows, "condition"].astype(str).unique())


@pytest.fixture(scope="module")
def screen():
    adata = _screen()
    cp.CellPLM.setup_anndata(adata, layer="counts", perturbation_key="condition")
    return adata


@pytest.fixture(scope="module")
def untrained(screen):
    return cp.CellPLM(screen, **ARCH)


@pytest.fixture(scope="module")
def trained(screen):
    model = cp.CellPLM(screen, **ARCH)
    split = {"split_key": "split"}
    model.train(max_epochs=EPOCHS, lr=3e-3, batch_size=64, datasplitter_kwargs=split, **FIT)
    return model


@pytest.mark.slow  # the module's trained model: about 20 s once
def test_rows_follow_the_request_and_unseen_conditions_are_predicted(screen, trained):
    unseen_single = _conditions(screen, "single_unseen")[0]
    unseen_double = _conditions(screen, "double_unseen")[0]
    unseen_gene_double = _conditions(screen, "double_unseen_gene")[0]
    seen = _conditions(screen, "single_seen")[0]
    requested = [unseen_double, "ctrl", seen, unseen_single, unseen_gene_double]
    prediction = trained.predict_perturbation(requested, n_samples=40, batch_size=25)
    assert prediction.obs_names.tolist() == requested
    assert prediction.var_names.tolist() == screen.var_names.tolist()
    assert prediction.shape == (5, screen.n_vars)
    assert prediction.X.dtype == np.float32 and np.isfinite(prediction.X).all()
    # each row is its condition's, whatever else is asked for, and wherever it is asked
    for condition in ("ctrl", unseen_double):
        alone = trained.predict_perturbation([condition], n_samples=40, batch_size=25)
        np.testing.assert_allclose(alone.X[0], prediction[condition].X[0], rtol=1e-5)
    # the single "A" and GEARS' "A+ctrl" are the same perturbation
    gene = seen.split("+")[0]
    both = trained.predict_perturbation([gene, f"ctrl+{gene}"], n_samples=40, counts="mean")
    np.testing.assert_allclose(both.X[0], both.X[1], rtol=1e-5)


def _knock_down(model, singles: list[str]) -> float:
    """Mean predicted change of each single's own gene from the control prediction."""
    columns = [model.adata.var_names.get_loc(c.split("+")[0]) for c in singles]
    pred = model.predict_perturbation(["ctrl", *singles], n_samples=100, counts="mean")
    return float(np.mean(pred.X[np.arange(1, len(singles) + 1), columns] - pred.X[0, columns]))


@pytest.mark.slow  # the module's trained model: about 20 s once
def test_training_learns_the_knock_down(screen, trained, untrained):
    """The knocked-down gene's predicted change from the control prediction is negative after
    training, and clearly more so than before: on seen singles, and on unseen ones."""
    for kind in ("single_seen", "single_unseen"):
        singles = _conditions(screen, kind)
        after, before = _knock_down(trained, singles), _knock_down(untrained, singles)
        assert after < -0.3, (kind, after)
        assert after < before - 0.3, (kind, after, before)


@pytest.mark.slow  # the module's trained model: about 20 s once
def test_save_load_keeps_predictions(screen, trained, tmp_path):
    conditions = [_conditions(screen, "double_unseen")[0], "ctrl"]
    expected = trained.predict_perturbation(conditions, n_samples=30)
    trained.save(tmp_path / "model")
    loaded = cp.CellPLM.load(tmp_path / "model", adata=screen)
    np.testing.assert_allclose(
        loaded.predict_perturbation(conditions, n_samples=30).X, expected.X, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("condition", "match"),
    [
        ("NOTAGENE+ctrl", "not in the model's vocabulary"),
        ("A+", "empty"),
        ("+ctrl", "empty"),
        ("A+B+C", "triples"),
        ("ctrl+ctrl", "names no gene"),
        ("FGR+FGR", "twice"),
        (3, "must be a string"),
    ],
)
def test_bad_condition_names(untrained, condition, match):
    with pytest.raises(ValueError, match=match):
        untrained.predict_perturbation(["ctrl", condition], n_samples=5)


def test_bad_requests(untrained):
    with pytest.raises(ValueError, match="duplicates"):
        untrained.predict_perturbation(["ctrl", "ctrl"], n_samples=5)
    with pytest.raises(ValueError, match="n_samples"):
        untrained.predict_perturbation(["ctrl"], n_samples=0)


@pytest.mark.parametrize(
    "argument", [{"train_size": 0.8}, {"early_stopping": True}, {"redraw_tissues": True}]
)
def test_splitter_arguments_are_refused_not_ignored(untrained, argument):
    """Perturbation training builds no tissue splitter: its arguments raise."""
    with pytest.raises(ValueError, match="do not apply to perturbation training"):
        untrained.train(max_epochs=1, **argument, **FIT)


def test_a_model_without_perturbation_key_says_what_to_pass():
    adata = _screen()
    cp.CellPLM.setup_anndata(adata, layer="counts")
    model = cp.CellPLM(adata, **ARCH)
    with pytest.raises(ValueError, match=r"setup_anndata\(adata, perturbation_key="):
        model.predict_perturbation(["ctrl"])


def test_setup_refuses_bad_conditions():
    adata = _screen()
    adata.obs["condition"] = adata.obs["condition"].astype(str)
    with pytest.raises(KeyError, match="perturbation_key='perturbation'"):
        cp.CellPLM.setup_anndata(adata, layer="counts", perturbation_key="perturbation")
    with pytest.raises(ValueError, match="control_category='control'"):
        cp.CellPLM.setup_anndata(
            adata, layer="counts", perturbation_key="condition", control_category="control"
        )
    bad = adata.copy()
    bad.obs.loc[bad.obs_names[-1], "condition"] = "NOTAGENE+ctrl"
    with pytest.raises(ValueError, match="not in adata.var_names"):
        cp.CellPLM.setup_anndata(bad, layer="counts", perturbation_key="condition")
    bad.obs.loc[bad.obs_names[-1], "condition"] = "FGR+SNX3+PRDX1"
    with pytest.raises(ValueError, match="triples"):
        cp.CellPLM.setup_anndata(bad, layer="counts", perturbation_key="condition")


def test_official_checkpoint_predicts_genes_of_its_vocabulary(tmp_path):
    """A random official-format checkpoint: the perturbation map is fresh, the rest loaded; an
    unseen gene of the data and a vocabulary gene the data lacks (an Ensembl ID) are predicted."""
    prefix = tmp_path / "random"
    cp.datasets.random_official_checkpoint(prefix, n_hidden=32, n_layers=1, n_latent=8)
    adata = _screen()
    cp.CellPLM.setup_anndata(adata, layer="counts", perturbation_key="condition")
    model = cp.CellPLM.load_official(prefix, adata)
    assert model.module.perturbation_encoder is not None
    model.train(max_epochs=1, batch_size=32, datasplitter_kwargs={"split_key": "split"}, **FIT)
    outside = model_vocabulary(model)[0]  # an Ensembl ID: not a gene name of the data
    unseen = _conditions(adata, "single_unseen")[0]
    prediction = model.predict_perturbation([unseen, f"{outside}+ctrl", "ctrl"], n_samples=20)
    assert prediction.shape == (3, len(model.matched_genes))
    assert np.isfinite(prediction.X).all()


def test_extend_vocabulary_keeps_the_perturbation_head(screen):
    """A perturbation model's per-gene shifts get zero rows for the added genes: the extended
    model predicts the old genes as before (up to the new genes' tiny share of the total)."""
    perturbed = {g for c in screen.obs["condition"].unique() for g in str(c).split("+")}
    left_out = [g for g in screen.var_names if g not in perturbed][:3]
    vocabulary = [g for g in screen.var_names if g not in left_out]
    model = cp.CellPLM(screen, vocabulary=vocabulary, **ARCH)
    extended = model.extend_vocabulary()
    assert extended.module.perturbation_encoder.to_genes.out_features == len(screen.var_names)
    conditions = ["ctrl", _conditions(screen, "double_unseen")[0]]
    before = model.predict_perturbation(conditions, n_samples=20, counts="mean")
    after = extended.predict_perturbation(conditions, n_samples=20, counts="mean")
    np.testing.assert_allclose(after[:, vocabulary].X, before[:, vocabulary].X, atol=1e-4)


def test_save_official_refuses_the_perturbation_encoder(untrained, tmp_path):
    with pytest.raises(ValueError, match="perturbation encoder"):
        untrained.save_official(tmp_path / "ckpt" / "model")
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_prediction_decodes_the_control_cells_batch(monkeypatch):
    """With ``batch_key`` the decoder gets the drawn control cells' batch (it was silently left
    out of prediction while training used it)."""
    adata = _screen()
    adata.obs["lane"] = np.where(np.arange(adata.n_obs) % 2, "l1", "l2")
    cp.CellPLM.setup_anndata(adata, layer="counts", perturbation_key="condition", batch_key="lane")
    model = cp.CellPLM(adata, **ARCH)
    seen = []
    generative_input = model.module._get_generative_input

    def record(tensors, inference_outputs, **kwargs):
        inputs = generative_input(tensors, inference_outputs, **kwargs)
        seen.append(inputs["batch_index"])
        return inputs

    monkeypatch.setattr(model.module, "_get_generative_input", record)
    model.predict_perturbation(["ctrl"], n_samples=20, counts="mean")
    assert seen and all(b is not None for b in seen)
    assert set(torch.cat(seen).tolist()) == {0, 1}  # both lanes among the drawn controls
