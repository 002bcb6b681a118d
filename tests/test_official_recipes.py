"""The official fine-tuning recipes: within-tissue split, objectives, optimisation, read-outs.

References are the official package's own pieces (``NBImputationLoss``, the imputation
pipeline's read-out formula) on random official checkpoints built with the helpers of
``tests/test_official_load.py``, and hand computations.
"""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from scvi import settings

import cellplm_scvi as cp
from cellplm_scvi.data import TissueDataSplitter
from cellplm_scvi.official import (
    ANNOTATION_OVERRIDES,
    IMPUTATION_OVERRIDES,
    annotation_recipe,
    imputation_recipe,
    select_official_hvgs,
)
from tests._helpers import (
    official_files,
    official_forward,
    random_counts,
    to_coo,
)

N_CELLS = 90


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("CellPLM")
    config, off, prefix = official_files("vae", 3, tmp_path_factory.mktemp("ckpt"), "vae")
    return prefix, off, config


def labelled_adata(config, seed=0, n_cells=N_CELLS):
    genes = config["gene_list"]
    X = random_counts(n_cells, len(genes), 0.2, seed)
    adata = ad.AnnData(X=X)
    adata.var_names = list(genes)
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    rng = np.random.default_rng(seed)
    adata.obs["cell_type"] = pd.Categorical(rng.choice(["T", "B", "NK"], n_cells))
    adata.obs["split"] = rng.choice(["train", "valid", "test"], n_cells, p=[0.6, 0.2, 0.2])
    adata.obs["sample"] = "s1"
    cp.CellPLM.setup_anndata(adata, labels_key="cell_type", tissue_key="sample")
    return adata


def annotation_model(checkpoint, adata):
    prefix, _, _ = checkpoint
    return cp.CellPLM.load_official(prefix, adata, **ANNOTATION_OVERRIDES)


def first_batch(loader):
    return next(iter(loader))


# ------------------------------------------------------------------ within-tissue split


def test_cell_split_keeps_tissues_whole_and_masks_the_loss(checkpoint):
    adata = labelled_adata(checkpoint[2])
    model = annotation_model(checkpoint, adata)
    splitter = TissueDataSplitter(model.adata_manager, split_key="split")
    split = adata.obs["split"].to_numpy()
    assert np.array_equal(splitter.train_idx, np.flatnonzero(split == "train"))
    assert np.array_equal(splitter.val_idx, np.flatnonzero(split == "valid"))
    for loader, name in (
        (splitter.train_dataloader(), "train"),
        (splitter.val_dataloader(), "valid"),
    ):
        batch = first_batch(loader)
        assert batch["X"].shape[0] == N_CELLS  # the whole tissue is in the forward pass
        assert np.array_equal(batch["loss_mask"].numpy(), split == name)

    # random cell split: deterministic for a seed, disjoint, sizes as asked
    settings.seed = 5
    a = TissueDataSplitter(
        model.adata_manager, train_size=0.7, validation_size=0.2, split_by="cells"
    )
    b = TissueDataSplitter(
        model.adata_manager, train_size=0.7, validation_size=0.2, split_by="cells"
    )
    assert all(
        np.array_equal(x, y) for x, y in zip((a.train_idx, a.val_idx), (b.train_idx, b.val_idx))
    )
    assert (len(a.train_idx), len(a.val_idx), len(a.test_idx)) == (63, 18, 9)
    assert not set(a.train_idx) & set(a.val_idx)
    with pytest.raises(ValueError, match="split_by"):
        TissueDataSplitter(model.adata_manager, split_by="cell")
    adata.obs["bad"] = "training"
    with pytest.raises(ValueError, match="'train'"):
        TissueDataSplitter(model.adata_manager, split_key="bad")


def test_annotation_loss_is_cross_entropy_of_train_cells(checkpoint):
    adata = labelled_adata(checkpoint[2])
    model = annotation_model(checkpoint, adata)
    splitter = TissueDataSplitter(model.adata_manager, split_key="split")
    batch = first_batch(splitter.train_dataloader())
    module = model.module.eval()  # deterministic: no dropout, no mask
    inf, gen = module.forward(batch, compute_loss=False)
    inf["logits"].retain_grad()
    loss = module.loss(batch, inf, gen).loss
    train = batch["loss_mask"].bool()
    labels = batch["labels"].view(-1).long()
    expected = torch.nn.functional.cross_entropy(inf["logits"][train], labels[train])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    loss.backward()
    grad = inf["logits"].grad
    assert grad[~train].abs().max() == 0  # validation / test cells: out of the loss
    assert grad[train].abs().max() > 0


# ------------------------------------------------------------------ optimisation


class _RecordStates(Callback):
    """Module state and learning rates after each validation epoch."""

    def __init__(self):
        self.states, self.lrs = [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.states.append(copy.deepcopy(pl_module.module.state_dict()))

    def on_train_epoch_end(self, trainer, pl_module):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_annotation_recipe_groups_schedules_and_best_state(checkpoint):
    adata = labelled_adata(checkpoint[2])
    model = annotation_model(checkpoint, adata)
    recorder = _RecordStates()
    settings.seed = 0
    kwargs = annotation_recipe(max_epochs=6, lr=1e-3)
    model.train(**kwargs, callbacks=[recorder], enable_progress_bar=False)
    plan = model.trainer.lightning_module
    groups = model.trainer.optimizers[0].param_groups
    rest, embedder = groups
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    module = model.module
    assert ids(embedder["params"]) == ids(module.embedder.parameters()) - ids(
        p for p in module.embedder.parameters() if not p.requires_grad
    )
    assert embedder["weight_decay"] == 1e-10 and rest["weight_decay"] == 1e-7
    held = ids(rest["params"]) | ids(embedder["params"])
    assert not held & ids(module.pre_latent_norm.parameters())  # official: not optimised
    assert not held & ids(module.decoder.parameters())
    assert ids(module.classifier.parameters()) <= held
    # warm-up of the second group only, per epoch; plateau stepped once per step (one tissue)
    n_steps = model.trainer.global_step
    assert plan.official_plateau.last_epoch == n_steps == 6
    assert plan.official_plateau.factor == 0.95 and plan.official_plateau.patience == 25
    for epoch, (lr_rest, lr_emb) in enumerate(recorder.lrs):
        assert lr_rest == pytest.approx(1e-3 * (epoch + 1) / 30)
        assert lr_emb == pytest.approx(1e-4)
    # the restored state is the best validation-F1 epoch's (a later tie wins)
    f1 = model.history_["validation_f1"]["validation_f1"].to_numpy()
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    assert plan.best_epoch == best
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, recorder.states[best][key], rtol=0, atol=0)
    assert model.predict().shape == (N_CELLS,)


def test_imputation_recipe_steps_plateau_per_epoch(checkpoint):
    adata = labelled_adata(checkpoint[2])
    adata.obs["sample"] = np.where(np.arange(N_CELLS) < 45, "s1", "s2")
    cp.CellPLM.setup_anndata(adata, tissue_key="sample")
    model = cp.CellPLM.load_official(checkpoint[0], adata, **IMPUTATION_OVERRIDES)
    recorder = _RecordStates()
    settings.seed = 0
    model.train(
        **imputation_recipe(max_epochs=3, train_size=0.5),
        callbacks=[recorder],
        enable_progress_bar=False,
    )
    plan = model.trainer.lightning_module
    assert plan.official_plateau.last_epoch == 3  # once per epoch
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([5e-4 * k / 5 for k in (1, 2, 3)])
    loss = model.history_["validation_loss"]["validation_loss"].to_numpy()
    best = len(loss) - 1 - int(np.argmin(loss[::-1]))
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, recorder.states[best][key], rtol=0, atol=0)


# ------------------------------------------------------------------ imputation


def panel_adata(config, n_cells=80, seed=1):
    """Reference cells (all genes) and spatial cells measuring the first 60% of the genes."""
    genes = config["gene_list"]
    X = random_counts(n_cells, len(genes), 0.3, seed).tolil()
    panel = np.arange(len(genes)) < int(0.6 * len(genes))
    spatial = np.arange(n_cells) >= n_cells // 2
    X[np.ix_(np.flatnonzero(spatial), np.flatnonzero(~panel))] = 0
    adata = ad.AnnData(X=X.tocsr())
    adata.var_names = list(genes)
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.obs["batch"] = np.where(spatial, "spatial", "reference")
    adata.varm["measured"] = pd.DataFrame(
        {"reference": np.ones(len(genes), bool), "spatial": panel}, index=adata.var_names
    )
    adata.obs["tissue"] = "all"
    cp.CellPLM.setup_anndata(
        adata, batch_key="batch", tissue_key="tissue", measured_genes_key="measured"
    )
    return adata, panel, spatial


def test_imputation_objective_equals_official_nb_imputation_loss(checkpoint):
    from CellPLM.objective.zinb import NBImputationLoss

    prefix, off, config = checkpoint
    adata, panel, spatial = panel_adata(config)
    spatial_only = adata[spatial].copy()
    spatial_only.varm["measured"] = spatial_only.varm["measured"][["spatial"]]
    cp.CellPLM.setup_anndata(
        spatial_only, batch_key="batch", tissue_key="tissue", measured_genes_key="measured"
    )
    model = cp.CellPLM.load_official(prefix, spatial_only, **IMPUTATION_OVERRIDES)
    module = model.module.eval()
    loader = model._make_data_loader(spatial_only, None, None)
    batch = next(iter(loader))
    inf, gen = module.forward(batch, compute_loss=False)
    ours = module.loss(batch, inf, gen).loss

    X = spatial_only.X
    ref = official_forward(off, X, config["gene_list"])
    x_dict = {
        "x_seq": to_coo(X),
        "gene_mask": torch.from_numpy(panel),
        "input_gene_mask": torch.arange(len(config["gene_list"])),
    }
    out = {"mean": ref["mean"].clone(), "disp": ref["disp"].clone()}
    official = NBImputationLoss(dae=False)(out, x_dict)
    torch.testing.assert_close(ours.double(), official.double(), rtol=1e-5, atol=0)

    # a training step uses all cells: no DAE term, no masked-cell selection
    module.train()
    inf, gen = module.forward(batch, compute_loss=False)
    assert inf["mask"] is not None and module.dae is False
    recon = module.loss(batch, inf, gen).reconstruction_loss["reconstruction_loss"]
    assert recon.shape == (spatial_only.n_obs,)


def test_imputation_read_outs(checkpoint):
    prefix, off, config = checkpoint
    adata, panel, spatial = panel_adata(config)
    model = cp.CellPLM.load_official(prefix, adata, **IMPUTATION_OVERRIDES)
    targets = list(adata.var_names[~panel])
    official_pred = model.impute_genes(targets, library="all").to_numpy()
    measured_pred = model.impute_genes(targets).to_numpy()

    ref = official_forward(off, adata.X, config["gene_list"])
    mean = ref["mean"].numpy().astype(np.float64)
    x = adata.X.toarray().astype(np.float64)
    # official ImputationPipeline.predict: no gene_mask, size factor over all input genes
    expected_all = mean * x.sum(1, keepdims=True) / mean.sum(1, keepdims=True)
    np.testing.assert_allclose(official_pred, expected_all[:, ~panel], rtol=1e-5, atol=1e-7)
    # ours: the measured genes' share of the mean carries the observed total
    measured = np.where(spatial[:, None], panel[None, :], True)
    lib = (x * measured).sum(1, keepdims=True) / (mean * measured).sum(1, keepdims=True)
    np.testing.assert_allclose(measured_pred, (mean * lib)[:, ~panel], rtol=1e-5, atol=1e-7)
    ratio = measured_pred[spatial] / official_pred[spatial]
    assert ratio.min() > 1 and ratio.std(0).max() > 0  # larger, by a per-cell factor
    np.testing.assert_allclose(measured_pred[~spatial], official_pred[~spatial], rtol=1e-5)
    with pytest.raises(ValueError, match="library"):
        model.impute_genes(targets, library="observed")


def test_select_official_hvgs_leaves_the_input_alone(checkpoint):
    adata = labelled_adata(checkpoint[2])
    before = adata.X.copy()
    subset = select_official_hvgs(adata, n_top_genes=50)
    assert subset.n_vars == 50 and adata.n_vars == len(checkpoint[2]["gene_list"])
    assert (adata.X != before).nnz == 0
    assert "highly_variable" not in adata.var
