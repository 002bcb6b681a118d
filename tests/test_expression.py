"""Expression read-outs: ``get_normalized_expression`` (shape, library size, gene lists),
imputation with ``impute_genes`` and measured-gene masks (a spatial panel next to an scRNA-seq
reference: the loss ignores the genes a batch did not measure).

Tiny networks on the 700 real PBMCs (``pbmc``, ``labelled`` from ``tests/conftest.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy.spatial.distance import cdist

import cellplm_scvi as cp
from cellplm_scvi._constants import BATCH_KEY, X_KEY
from cellplm_scvi.module._loss import masked_nb_loss
from tests._anndata_checks import dense
from tests._helpers import (
    ARCH,
    FIT,
)

N_PANEL = 300


@pytest.fixture(scope="module")
def panel(pbmc):
    """350 reference cells (all genes) + 350 "spatial" cells measuring 300 genes; the other
    genes are zero in the spatial cells (as in an imputation set-up)."""
    scvi.settings.seed = 0
    adata = pbmc.copy()
    rng = np.random.default_rng(1)
    measured = np.zeros(adata.n_vars, dtype=bool)
    measured[rng.choice(adata.n_vars, N_PANEL, replace=False)] = True
    is_spatial = np.arange(adata.n_obs) % 2 == 1
    adata.obs["tech"] = pd.Categorical(np.where(is_spatial, "spatial", "ref"))
    x = adata.layers["counts"].tolil()
    for j in np.flatnonzero(~measured):
        x[np.flatnonzero(is_spatial), j] = 0
    x = x.tocsr()
    x.eliminate_zeros()
    adata.layers["counts"] = x
    adata.X = x.copy()
    adata.varm["measured"] = pd.DataFrame({"spatial": measured}, index=adata.var_names)
    cp.CellPLM.setup_anndata(
        adata, layer="counts", batch_key="tech", measured_genes_key="measured"
    )
    model = cp.CellPLM(adata, **ARCH)
    model.train(max_epochs=2, train_size=1.0, **FIT)
    return adata, model, measured, is_spatial


def _tissue_with_batch(model, adata, batch_name):
    """The first tissue minibatch whose cells belong to ``batch_name`` (a whole batch here)."""
    code = list(model.adata_manager.get_state_registry(BATCH_KEY).categorical_mapping).index(
        batch_name
    )
    loader = model._make_data_loader(model._validate_anndata(adata))
    for tensors in loader:
        if (tensors[BATCH_KEY].view(-1) == code).all():
            return tensors
    raise AssertionError(f"no tissue of batch {batch_name!r}")


# ------------------------------------------------------------------------- normalised expression


def test_normalized_expression_shape_and_library(labelled):
    adata, model, _, _ = labelled
    expr = model.get_normalized_expression()
    assert isinstance(expr, pd.DataFrame)
    assert expr.shape == (adata.n_obs, adata.n_vars)
    assert list(expr.index) == list(adata.obs_names)
    assert list(expr.columns) == list(adata.var_names)
    np.testing.assert_allclose(expr.sum(1).to_numpy(), 1.0, rtol=1e-4)
    assert (expr.to_numpy() >= 0).all()
    big = model.get_normalized_expression(library_size=1e4, return_numpy=True)
    assert isinstance(big, np.ndarray)
    np.testing.assert_allclose(big.sum(1), 1e4, rtol=1e-4)
    np.testing.assert_allclose(big, expr.to_numpy() * 1e4, rtol=1e-4, atol=1e-6)


def test_normalized_expression_gene_list_and_indices(labelled):
    adata, model, _, _ = labelled
    full = model.get_normalized_expression()
    rng = np.random.default_rng(6)
    genes = list(adata.var_names[rng.choice(adata.n_vars, 25, replace=False)])
    sub = model.get_normalized_expression(gene_list=genes)
    assert list(sub.columns) == genes
    np.testing.assert_allclose(sub.to_numpy(), full[genes].to_numpy(), rtol=1e-5, atol=1e-9)
    perm = rng.permutation(adata.n_obs)
    by_idx = model.get_normalized_expression(indices=perm, gene_list=genes)
    assert list(by_idx.index) == list(adata.obs_names[perm])
    np.testing.assert_allclose(
        by_idx.to_numpy(), full[genes].to_numpy()[perm], rtol=1e-5, atol=1e-9
    )


def test_draws_overall_are_posterior_samples(labelled):
    """``n_samples_overall`` (what ``differential_expression`` asks for) draws posterior
    samples even where the cells outnumber the draws (scvi-tools then asks one sample a cell,
    which alone decodes CellPLM's posterior mean): both groups of a comparison are sampled."""
    adata, model, _, _ = labelled
    means = model.get_normalized_expression(return_numpy=True)
    draws = model.get_normalized_expression(n_samples_overall=adata.n_obs - 1, return_numpy=True)
    assert draws.shape == (adata.n_obs - 1, adata.n_vars)
    nearest = cdist(draws, means, "chebyshev").min(1)  # largest gap to the closest mean row
    assert (nearest > 1e-6).all()


def test_normalized_expression_unknown_gene(labelled):
    _, model, _, _ = labelled
    with pytest.raises(KeyError):
        model.get_normalized_expression(gene_list=["NOT_A_GENE"])


# ------------------------------------------------------------------------------------ imputation


def test_observed_library_matches_measured_counts(panel):
    adata, model, measured, is_spatial = panel
    expr = model.get_normalized_expression(library_size="observed").to_numpy()
    x = dense(adata.layers["counts"])
    # spatial cells: their 300 measured genes add up to their observed counts
    np.testing.assert_allclose(
        expr[is_spatial][:, measured].sum(1), x[is_spatial][:, measured].sum(1), rtol=1e-4
    )
    # ... and the prediction of unmeasured genes is not forced to the (zero) input
    assert expr[is_spatial][:, ~measured].sum() > 0
    # reference cells measured every gene
    np.testing.assert_allclose(expr[~is_spatial].sum(1), x[~is_spatial].sum(1), rtol=1e-4)


def test_impute_genes(panel):
    adata, model, measured, is_spatial = panel
    genes = list(adata.var_names[~measured][:20])
    imputed = model.impute_genes(genes)
    assert isinstance(imputed, pd.DataFrame)
    assert list(imputed.columns) == genes
    assert list(imputed.index) == list(adata.obs_names)
    # the decoded frequencies (each cell's summing to one over all genes), scaled so that the
    # genes the cell's batch measured add up to its counts there: the count scale
    freq = model.get_normalized_expression().to_numpy()
    in_panel = np.where(is_spatial[:, None], measured[None, :], True)
    counts = dense(adata.layers["counts"])
    np.testing.assert_allclose(freq.sum(1), 1.0, rtol=1e-4)
    scale = (counts * in_panel).sum(1) / (freq * in_panel).sum(1)
    columns = adata.var_names.get_indexer(genes)
    np.testing.assert_allclose(imputed.to_numpy(), freq[:, columns] * scale[:, None], rtol=1e-4)
    # library="all": the cell's counts spread over all decoded genes, unmeasured ones included
    spread = model.impute_genes(genes, library="all").to_numpy()
    np.testing.assert_allclose(spread, freq[:, columns] * counts.sum(1)[:, None], rtol=1e-4)
    assert (spread[is_spatial] < imputed.to_numpy()[is_spatial]).all()
    # subset of cells in the requested order
    idx = np.flatnonzero(is_spatial)[::-1][:30]
    part = model.impute_genes(genes, indices=idx)
    assert list(part.index) == list(adata.obs_names[idx])
    with pytest.raises(KeyError):
        model.impute_genes(["NOT_A_GENE"])
    with pytest.raises(KeyError):
        model.impute_genes([genes[0], "NOT_A_GENE"])


# -------------------------------------------------------------------------------- measured genes


def test_measured_weights_rows(panel):
    adata, model, measured, _ = panel
    t_sp = _tissue_with_batch(model, adata, "spatial")
    w = model.module.measured_weights(t_sp)
    assert w.shape == (t_sp[BATCH_KEY].shape[0], adata.n_vars)
    assert (w.cpu().numpy() == measured[None, :]).all()
    t_ref = _tissue_with_batch(model, adata, "ref")
    assert model.module.measured_weights(t_ref).all()


def _recon(losses):
    return sum(losses.reconstruction_loss.values())


def _recon_with_target(module, tensors, inf, gen, x):
    return _recon(module.loss({**tensors, X_KEY: x}, inf, gen))


def test_unmeasured_gene_does_not_change_loss(panel):
    """The target counts of an unmeasured gene do not enter the spatial batch's loss (not in
    the NB terms, not in the library size); a measured gene does."""
    adata, model, measured, _ = panel
    module = model.module
    module.eval()
    tensors = _tissue_with_batch(model, adata, "spatial")
    with torch.no_grad():
        inf, gen, losses = module(tensors)
        x = tensors[X_KEY].to_dense()
        base = _recon_with_target(module, tensors, inf, gen, x)
        torch.testing.assert_close(base, _recon(losses))
        off = int(np.flatnonzero(~measured)[0])
        on = int(np.flatnonzero(measured)[0])
        x_off = x.clone()
        x_off[:, off] += 50
        torch.testing.assert_close(_recon_with_target(module, tensors, inf, gen, x_off), base)
        x_on = x.clone()
        x_on[:, on] += 50
        changed = _recon_with_target(module, tensors, inf, gen, x_on)
        assert (changed - base).abs().min() > 1e-3

        # reference cells measured everything: the same change matters there
        t_ref = _tissue_with_batch(model, adata, "ref")
        inf_r, gen_r, _ = module(t_ref)
        xr = t_ref[X_KEY].to_dense()
        base_r = _recon_with_target(module, t_ref, inf_r, gen_r, xr)
        xr_off = xr.clone()
        xr_off[:, off] += 50
        changed_r = _recon_with_target(module, t_ref, inf_r, gen_r, xr_off)
        assert (changed_r - base_r).abs().min() > 1e-3


def test_masked_nb_loss_measured():
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((6, 10), 3.0), generator=gen)
    mean = torch.rand(6, 10, generator=gen) + 0.1
    theta = torch.rand(10, generator=gen) + 0.5
    measured = torch.zeros(6, 10, dtype=torch.bool)
    measured[:, :6] = True
    measured[3:, 6:8] = True  # second half measured two more genes
    base = masked_nb_loss(x, mean, theta, measured=measured)
    assert base.shape == (6,)
    x2, mean2 = x.clone(), mean.clone()
    x2[:, 9] += 40
    mean2[:, 9] *= 100  # unmeasured everywhere: neither the target nor the mean matters
    x2[:, 7] += 40  # unmeasured in the first half only
    torch.testing.assert_close(masked_nb_loss(x2, mean2, theta, measured=measured)[:3], base[:3])
    assert not torch.allclose(masked_nb_loss(x2, mean2, theta, measured=measured)[3:], base[3:])
    # equals the unmasked loss of the measured columns alone (cells 0..2: columns 0..5)
    torch.testing.assert_close(base[:3], masked_nb_loss(x[:3, :6], mean[:3, :6], theta[:6]))
    # a measured gene changes the loss
    x3 = x.clone()
    x3[:, 0] += 40
    assert (masked_nb_loss(x3, mean, theta, measured=measured) - base).abs().min() > 1e-3
    # the DAE term with entries restricted to measured genes
    entries = torch.zeros_like(measured)
    entries[:, [0, 9]] = True
    with_dae = masked_nb_loss(x, mean, theta, entries & measured, measured)
    with_dae2 = masked_nb_loss(x2, mean2, theta, entries & measured, measured)
    torch.testing.assert_close(with_dae[:3], with_dae2[:3])


# ---------------------------------------------------------------------------------------- errors


def _panel_adata(pbmc, batches, table):
    adata = pbmc.copy()
    adata.obs["tech"] = pd.Categorical(np.resize(batches, adata.n_obs))
    adata.varm["measured"] = table
    return adata


def test_measured_genes_key_missing(pbmc):
    adata = pbmc.copy()
    adata.obs["tech"] = "a"
    with pytest.raises(KeyError, match="measured"):
        cp.CellPLM.setup_anndata(
            adata, layer="counts", batch_key="tech", measured_genes_key="measured"
        )


@pytest.mark.parametrize(
    ("columns", "match"),
    [({"spatial": True, "typo": True}, "typo"), ({"spatial": False}, "spatial")],
    ids=["unknown_batch_column", "empty_batch"],
)
def test_measured_genes_bad_table(pbmc, columns, match):
    """A column naming no batch, or a batch that measured no gene, is refused by name."""
    table = pd.DataFrame(
        {name: np.full(pbmc.n_vars, value) for name, value in columns.items()},
        index=pbmc.var_names,
    )
    adata = _panel_adata(pbmc, ["ref", "spatial"], table)
    with pytest.raises(ValueError, match=match):
        cp.CellPLM.setup_anndata(
            adata, layer="counts", batch_key="tech", measured_genes_key="measured"
        )
        cp.CellPLM(adata, **ARCH)


def test_measured_genes_integer_batch_categories(pbmc):
    """Batch categories 0/1 (integers) and table columns "0"/"1" pass the name check, so the
    panel must also be applied (not silently ignored)."""
    panel = np.arange(pbmc.n_vars) < N_PANEL
    table = pd.DataFrame({"1": panel}, index=pbmc.var_names)
    adata = pbmc.copy()
    adata.obs["tech"] = np.arange(adata.n_obs) % 2
    adata.varm["measured"] = table
    cp.CellPLM.setup_anndata(
        adata, layer="counts", batch_key="tech", measured_genes_key="measured"
    )
    model = cp.CellPLM(adata, **ARCH)
    np.testing.assert_array_equal(model._gene_layout.measured.sum(1), [765, N_PANEL])
