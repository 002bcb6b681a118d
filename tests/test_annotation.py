"""Cell-type annotation: ``CellPLM.predict`` in AnnData order (new, shuffled and copied AnnDatas,
soft predictions), semi-supervised training in which unlabelled cells leave the cross-entropy.

Tiny networks on the 700 real PBMCs (``pbmc``, ``labelled`` from ``tests/conftest.py``).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from sklearn.metrics import balanced_accuracy_score

import cellplm_scvi as cp
from cellplm_scvi._constants import LABELS_KEY
from tests._helpers import (
    ARCH,
    FIT,
    UNKNOWN,
)


def test_predict_names_in_anndata_order(labelled):
    adata, model, _, _ = labelled
    classes = sorted(set(adata.obs["cell_type"].astype(str)))
    pred = model.predict()
    assert isinstance(pred, np.ndarray)
    assert pred.shape == (adata.n_obs,)
    assert set(pred) <= set(classes)
    assert UNKNOWN not in set(pred)
    # indices: a full permutation keeps every tissue whole, so results are exactly permuted
    perm = np.random.default_rng(3).permutation(adata.n_obs)
    np.testing.assert_array_equal(model.predict(indices=perm), pred[perm])
    # boolean indices select in AnnData order
    mask = np.arange(adata.n_obs) % 3 == 0
    soft_mask = model.predict(indices=mask, soft=True)
    assert list(soft_mask.index) == list(adata.obs_names[mask])


def test_predict_shuffled_new_anndata(labelled):
    """A new AnnData with rows shuffled gives the same per-cell predictions (tissues are fixed
    by ``tissue_key``, so context is unchanged)."""
    adata, model, _, _ = labelled
    soft = model.predict(soft=True)
    perm = np.random.default_rng(4).permutation(adata.n_obs)
    fresh = ad.AnnData(
        X=adata.layers["counts"][perm].copy(),
        obs=adata.obs.iloc[perm][["label", "fov"]].copy(),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    fresh.layers["counts"] = fresh.X.copy()
    soft_fresh = model.predict(fresh, soft=True)
    assert list(soft_fresh.index) == list(adata.obs_names[perm])
    np.testing.assert_allclose(soft_fresh.to_numpy(), soft.to_numpy()[perm], atol=1e-4)


@pytest.mark.parametrize("how", ["copy", "view"])
def test_predict_shuffled_copy_of_registered_anndata(labelled, how):
    """``adata[perm].copy()`` (or a view) still carries the bookkeeping columns of the
    registered AnnData; results must nevertheless come back in the new row order."""
    adata, model, _, _ = labelled
    soft = model.predict(soft=True)
    perm = np.random.default_rng(5).permutation(adata.n_obs)
    shuffled = adata[perm].copy() if how == "copy" else adata[perm]
    soft_shuffled = model.predict(shuffled, soft=True)
    np.testing.assert_allclose(soft_shuffled.to_numpy(), soft.to_numpy()[perm], atol=1e-4)


def test_latent_of_subset_copy(labelled):
    """A row subset of the registered AnnData (last cells) can be embedded."""
    adata, model, _, _ = labelled
    sub = adata[adata.n_obs // 2 :].copy()
    z = model.get_latent_representation(sub)
    assert z.shape == (sub.n_obs, ARCH["n_latent"])
    assert np.isfinite(z).all()


def test_predict_soft(labelled):
    adata, model, _, _ = labelled
    classes = sorted(set(adata.obs["cell_type"].astype(str)))
    soft = model.predict(soft=True)
    assert isinstance(soft, pd.DataFrame)
    assert soft.shape == (adata.n_obs, len(classes))
    assert sorted(soft.columns) == classes
    assert UNKNOWN not in soft.columns
    assert list(soft.index) == list(adata.obs_names)
    np.testing.assert_allclose(soft.sum(1).to_numpy(), 1.0, atol=1e-5)
    assert (soft.to_numpy() >= 0).all()
    np.testing.assert_array_equal(soft.columns[soft.to_numpy().argmax(1)], model.predict())


def test_unlabeled_category_is_last_code(labelled):
    _, model, _, _ = labelled
    mapping = list(model.adata_manager.get_state_registry(LABELS_KEY).categorical_mapping)
    assert mapping[-1] == UNKNOWN
    assert model.module.n_labels == len(mapping) - 1


def test_predict_without_labels_raises(pbmc):
    adata = pbmc.copy()
    cp.CellPLM.setup_anndata(adata, layer="counts")
    model = cp.CellPLM(adata, **ARCH)
    assert model.module.classifier is None
    with pytest.raises(ValueError, match="labels"):
        model.predict()


def test_predict_single_class_raises(pbmc):
    adata = pbmc.copy()
    adata.obs["label"] = np.where(np.arange(adata.n_obs) % 2, "T", UNKNOWN)
    cp.CellPLM.setup_anndata(adata, layer="counts", labels_key="label")
    model = cp.CellPLM(adata, **ARCH)
    with pytest.raises(ValueError, match="no classification head.*at least two cell types"):
        model.predict()


def test_training_with_labels_learns(labelled):
    adata, model, hidden, untrained = labelled
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    pred = model.predict()
    majority = adata.obs["cell_type"][~hidden].value_counts(normalize=True).max()
    acc = (pred == truth)[~hidden].mean()
    bacc = balanced_accuracy_score(truth[~hidden], pred[~hidden])
    acc_before = (untrained == truth)[~hidden].mean()
    assert acc > max(majority + 0.1, acc_before + 0.2), (acc, majority, acc_before)
    assert bacc > 0.3, bacc  # chance: 0.1
    # the hidden cells (never in the cross-entropy) are predicted above chance too
    assert (pred == truth)[hidden].mean() > majority, (pred == truth)[hidden].mean()
    history = model.history["classification_loss_train"].to_numpy(dtype=float).ravel()
    assert history[-1] < history[0]


def _first_minibatch(labelled):
    """(module, first minibatch of the labelled model's AnnData, its inference outputs)."""
    adata, model, _, _ = labelled
    tensors = next(iter(model._make_data_loader(model._validate_anndata(adata))))
    model.module.eval()
    with torch.no_grad():
        outputs = model.module.inference(**model.module._get_inference_input(tensors))
    return model.module, tensors, outputs


def test_unknown_cells_not_in_cross_entropy(labelled):
    module, tensors, inf = _first_minibatch(labelled)
    labels = tensors[LABELS_KEY].view(-1).long()
    known = labels < module.n_labels
    assert known.any() and (~known).any()

    ce = module.classification_loss(tensors, inf)
    expected = torch.nn.functional.cross_entropy(inf["logits"][known], labels[known])
    torch.testing.assert_close(ce, expected)

    # all labels unknown -> no cross-entropy at all
    all_unknown = {**tensors, LABELS_KEY: torch.full_like(tensors[LABELS_KEY], module.n_labels)}
    assert module.classification_loss(all_unknown, inf) is None

    # the logits of unknown cells do not matter ...
    logits = inf["logits"].clone()
    logits[~known] = torch.randn_like(logits[~known]) * 10
    torch.testing.assert_close(module.classification_loss(tensors, {**inf, "logits": logits}), ce)
    # giving an unknown cell a class code brings it into the CE (so it was excluded before)
    i = int(torch.nonzero(~known)[0, 0])
    relabelled = labels.clone()
    relabelled[i] = 0
    t2 = {**tensors, LABELS_KEY: relabelled.view_as(tensors[LABELS_KEY])}
    assert not torch.allclose(module.classification_loss(t2, inf), ce)
    # changing the label of a known cell changes the CE
    j = int(torch.nonzero(known)[0, 0])
    flipped = labels.clone()
    flipped[j] = (flipped[j] + 1) % module.n_labels
    t3 = {**tensors, LABELS_KEY: flipped.view_as(tensors[LABELS_KEY])}
    assert not torch.allclose(module.classification_loss(t3, inf), ce)

    # the full loss reports the same CE
    module.eval()
    with torch.no_grad():
        _, _, losses = module(tensors)
    torch.testing.assert_close(losses.extra_metrics["classification_loss"], ce)


def test_unknown_cell_gets_no_gradient(labelled):
    module, tensors, inf = _first_minibatch(labelled)
    logits = inf["logits"].clone().requires_grad_(True)
    module.classification_loss(tensors, {**inf, "logits": logits}).backward()
    known = tensors[LABELS_KEY].view(-1) < module.n_labels
    assert (logits.grad[~known] == 0).all()
    assert (logits.grad[known].abs().sum(1) > 0).all()


def test_train_after_inference_uses_training_mode(pbmc):
    """``train`` after an inference call (which puts the module in eval mode, as
    ``load_official`` does) must still train with masking and dropout."""
    adata = pbmc.copy()
    cp.CellPLM.setup_anndata(adata, layer="counts", max_cells=350)
    model = cp.CellPLM(adata, **ARCH)
    model.is_trained_ = True  # random weights suffice; scvi-tools refuses untrained models
    model.get_latent_representation()
    seen = []
    loss = model.module.loss

    def spy(tensors, inference_outputs, generative_outputs, **kwargs):
        seen.append((model.module.training, inference_outputs["mask"] is not None))
        return loss(tensors, inference_outputs, generative_outputs, **kwargs)

    model.module.loss = spy
    model.train(max_epochs=1, train_size=1.0, **FIT)
    assert seen and all(training and masked for training, masked in seen), seen


def test_train_with_fully_unlabelled_tissue(pbmc):
    """A tissue whose cells are all Unknown trains without error (its step has no CE)."""
    scvi.settings.seed = 0
    adata = pbmc.copy()
    adata.obs["fov"] = np.where(np.arange(adata.n_obs) < 200, "a", "b")
    adata.obs["label"] = np.where(
        adata.obs["fov"] == "a", UNKNOWN, adata.obs["cell_type"].astype(str)
    )
    cp.CellPLM.setup_anndata(adata, layer="counts", labels_key="label", tissue_key="fov")
    model = cp.CellPLM(adata, **ARCH)
    model.train(max_epochs=2, train_size=1.0, **FIT)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
