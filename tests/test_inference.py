"""Reading cells with a trained ``CellPLM``: embeddings in the caller's order (subsets, copies,
shuffled rows, transfer to a new AnnData), clear errors on bad input at inference (the user's data
left untouched), backed and COO counts, every matrix type, reduced precision.

Shared models: ``fitted``, ``fov_model`` (simulated slides) and ``gmvae_model`` (fields of view,
labels, batches) from ``tests/conftest.py``, built once per test run.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch

from cellplm_scvi import CellPLM
from cellplm_scvi._validation import check_counts
from cellplm_scvi.datasets import random_official_checkpoint
from tests._anndata_checks import CELLPLM_OBS, assert_data_unchanged, dense, snapshot, unregistered
from tests._helpers import (
    ARCH,
    FIT,
    FOV_SETUP,
    renamed_genes,
    simulated_slides,
)

# ------------------------------------------------------------------------------------ embeddings


def _embedding_by_name(model: CellPLM, adata: ad.AnnData) -> pd.DataFrame:
    return pd.DataFrame(model.get_latent_representation(adata), index=adata.obs_names)


def test_latent_shape_finite_deterministic(fitted):
    model, adata = fitted
    z1 = model.get_latent_representation()
    z2 = model.get_latent_representation()
    assert z1.shape == (adata.n_obs, ARCH["n_latent"])
    assert np.isfinite(z1).all()
    np.testing.assert_array_equal(z1, z2)
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(mean, z1)
    assert (var > 0).all()
    # different cells get different embeddings
    assert np.unique(np.round(z1, 5), axis=0).shape[0] > adata.n_obs // 2


def test_indices_follow_the_given_order(fitted):
    model, adata = fitted
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(adata.n_obs, 300, replace=False))
    z_sorted = model.get_latent_representation(indices=subset)
    assert z_sorted.shape == (300, ARCH["n_latent"])
    shuffled = rng.permutation(subset)
    z_shuffled = model.get_latent_representation(indices=shuffled)
    expected = z_sorted[np.searchsorted(subset, shuffled)]
    np.testing.assert_allclose(z_shuffled, expected, atol=1e-5)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[subset] = True
    np.testing.assert_allclose(model.get_latent_representation(indices=mask), z_sorted, atol=1e-5)


def test_duplicated_indices_repeat_rows(fitted):
    """scvi-tools' DE may ask for a cell twice: each request gets that cell's row."""
    model, _ = fitted
    z = model.get_latent_representation(indices=[5, 6])
    np.testing.assert_array_equal(model.get_latent_representation(indices=[5, 5, 6]), z[[0, 0, 1]])


def test_row_order_invariance(fov_model):
    model, adata = fov_model
    reference = _embedding_by_name(model, adata)
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    shuffled = unregistered(adata[perm])
    assert not (shuffled.obs_names == adata.obs_names).all()
    result = _embedding_by_name(model, shuffled)
    np.testing.assert_allclose(
        result.to_numpy(), reference.loc[result.index].to_numpy(), atol=1e-5
    )
    # the bookkeeping columns were rewritten for the new row order
    np.testing.assert_array_equal(shuffled.obs["_cellplm_indices"], np.arange(adata.n_obs))


@pytest.mark.parametrize("kind", ["shuffled_copy", "shuffled_view"])
def test_row_order_invariance_registered_copy(fov_model, kind):
    model, adata = fov_model
    reference = _embedding_by_name(model, adata)
    perm = np.random.default_rng(2).permutation(adata.n_obs)
    other = adata[perm].copy() if kind == "shuffled_copy" else adata[perm]
    result = pd.DataFrame(model.get_latent_representation(other), index=adata.obs_names[perm])
    np.testing.assert_allclose(
        result.to_numpy(), reference.loc[result.index].to_numpy(), atol=1e-5
    )


def test_subset_copy_of_registered_anndata(fov_model):
    """A subset *copy* is a new AnnData: its tissues hold its own cells only (unlike
    ``indices=``, which keeps the registered tissues as context)."""
    model, adata = fov_model
    rows = np.arange(100, 300)
    expected = model.get_latent_representation(unregistered(adata[rows].copy()))
    np.testing.assert_allclose(
        model.get_latent_representation(adata[rows].copy()), expected, atol=1e-5
    )
    in_context = model.get_latent_representation(indices=rows)
    assert np.abs(in_context - expected).max() > 1e-3  # the context differs


def test_copy_with_edited_tissues_uses_them(fov_model):
    """A copy of registered data carries the original's tissue codes; an edited tissue column
    is read again, not silently replaced by them."""
    model, adata = fov_model
    edited = adata.copy()
    edited.obs["fov"] = "one tissue"  # every cell now attends to every other
    expected = model.get_latent_representation(unregistered(edited.copy()))
    result = model.get_latent_representation(edited)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert np.abs(result - model.get_latent_representation()).max() > 1e-3
    unchanged = adata.copy()
    np.testing.assert_allclose(
        model.get_latent_representation(unchanged), model.get_latent_representation(), atol=1e-5
    )
    kept = adata.obs["fov"] != adata.obs["fov"].iloc[0]  # a subset copy keeps its tissues' codes
    subset = adata[kept.to_numpy()].copy()
    model.get_latent_representation(subset)
    np.testing.assert_array_equal(
        subset.obs["_cellplm_tissue_code"], adata.obs["_cellplm_tissue_code"][kept]
    )
    gaps = adata.copy()
    gaps.obs["fov"] = gaps.obs["fov"].astype(object)
    gaps.obs.iloc[:5, gaps.obs.columns.get_loc("fov")] = None
    with pytest.raises(ValueError, match=r"adata.obs\['fov'\] \(tissue_key\) has missing"):
        model.get_latent_representation(gaps)


def test_transfer_to_new_anndata(fitted, slides):
    model, adata = fitted
    z = model.get_latent_representation()

    # never set up: tissues are computed with the training setup, same cells -> same result
    fresh = slides.copy()
    before = snapshot(fresh)
    np.testing.assert_allclose(model.get_latent_representation(fresh), z, atol=1e-5)
    assert_data_unchanged(fresh, before)
    assert CELLPLM_OBS <= set(fresh.obs)
    np.testing.assert_array_equal(fresh.obs["cellplm_tissue"], adata.obs["cellplm_tissue"])

    # set up separately with the same arguments
    same_setup = slides.copy()
    CellPLM.setup_anndata(
        same_setup, layer="counts", spatial_key="spatial", library_key="slide", max_cells=200
    )
    np.testing.assert_allclose(model.get_latent_representation(same_setup), z, atol=1e-5)

    # other cells
    other = simulated_slides(600, seed=1)
    z_other = model.get_latent_representation(other)
    assert z_other.shape == (600, ARCH["n_latent"])
    assert np.isfinite(z_other).all()
    assert other.obs["cellplm_tissue"].value_counts().max() <= 200


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda a: a.layers.__delitem__("counts"), KeyError, "layer='counts'"),
        (lambda a: a.layers["counts"].data.__setitem__(0, np.nan), ValueError, "NaN or infinite"),
        (lambda a: a.layers["counts"].data.__setitem__(0, -1.0), ValueError, "negative"),
        (lambda a: a.obsm.__delitem__("spatial"), KeyError, "spatial_key='spatial'"),
        (lambda a: a.obsm["spatial"].__setitem__((0, 0), np.nan), ValueError, "coordinates"),
        (lambda a: None, ValueError, "no cells"),  # replaced by an empty AnnData below
    ],
    ids=["missing_layer", "nan_counts", "negative_counts", "no_coords", "nan_coords", "empty"],
)
def test_transfer_validates_new_anndata(fitted, slides, mutate, error, match):
    model, _ = fitted
    new = slides[:0].copy() if match == "no cells" else slides.copy()
    mutate(new)
    before = snapshot(new)
    with pytest.raises(error, match=match):
        model.get_latent_representation(new)
    assert_data_unchanged(new, before)


# ------------------------------------------------------------------------------------- row order


def _by_name(values: np.ndarray, adata: ad.AnnData) -> pd.DataFrame:
    return pd.DataFrame(values, index=adata.obs_names)


def test_row_order_does_not_change_any_output(gmvae_model):
    model, adata = gmvae_model
    names = list(adata.obs_names)
    z = _by_name(model.get_latent_representation(), adata)
    probs = model.predict(soft=True)
    expr = model.get_normalized_expression(gene_list=adata.var_names[:20])
    perm = np.random.default_rng(3).permutation(adata.n_obs)
    shuffled = unregistered(adata[perm])
    order = list(shuffled.obs_names)
    assert order != names
    np.testing.assert_allclose(
        model.get_latent_representation(shuffled), z.loc[order].to_numpy(), atol=1e-5
    )
    got = model.predict(shuffled, soft=True)
    assert list(got.index) == order
    np.testing.assert_allclose(got.to_numpy(), probs.loc[order].to_numpy(), atol=1e-5)
    got = model.get_normalized_expression(shuffled, gene_list=adata.var_names[:20])
    np.testing.assert_allclose(got.to_numpy(), expr.loc[order].to_numpy(), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------ bad input at inference


N_VARS = 765  # genes of the fov_slides data


def _inf_counts(a):
    a.X.data[3] = np.inf


def _fractional_counts(a):
    a.X.data[3] += 0.5


def _unseen_batch(a):
    a.obs["slide"] = pd.Categorical(a.obs["slide"].astype(str).replace("slide1", "slideX"))


def _unseen_label(a):
    labels = a.obs["cell_type"].astype(str).to_numpy()
    labels[:5] = "Alien cell"
    a.obs["cell_type"] = pd.Categorical(labels)


def _coords_one_column(a):
    a.obsm["spatial"] = a.obsm["spatial"][:, :1]


def _coords_three_columns(a):
    a.obsm["spatial"] = np.hstack([a.obsm["spatial"], np.zeros((a.n_obs, 1))])


def _coords_inf(a):
    a.obsm["spatial"][7, 1] = np.inf


def _coords_nan(a):
    a.obsm["spatial"][7] = np.nan


INFERENCE_ERRORS = {
    "inf_counts": (_inf_counts, r"adata\.X contains NaN or infinite values.*raw counts"),
    "fractional_counts": (_fractional_counts, r"adata\.X contains non-integer values"),
    # scvi-tools refuses a category it has not seen; load_query_data is the supported route
    "unseen_batch": (_unseen_batch, "Category slideX not found"),
    "unseen_label": (_unseen_label, "Category Alien cell not found"),
    "coords_n_by_1": (_coords_one_column, r"must have shape \(n_cells, 2\), got \(400, 1\)"),
    "coords_n_by_3": (_coords_three_columns, r"obsm\['spatial'\] has 3 .* column count of 2"),
    "coords_inf": (_coords_inf, "NaN or infinite coordinates for 1 cells"),
    "coords_nan": (_coords_nan, "NaN or infinite coordinates for 1 cells"),
}


@pytest.mark.parametrize("case", list(INFERENCE_ERRORS))
def test_inference_rejects_bad_input(gmvae_model, fov_slides, case):
    model, _ = gmvae_model
    mutate, match = INFERENCE_ERRORS[case]
    new = fov_slides.copy()
    mutate(new)
    before = snapshot(new)
    with pytest.raises(ValueError, match=match):
        model.get_latent_representation(adata=new)
    assert_data_unchanged(new, before)


def test_inference_rejects_missing_genes(gmvae_model, fov_slides):
    model, _ = gmvae_model
    new = fov_slides[:, : N_VARS - 65].copy()
    before = snapshot(new)
    with pytest.raises(ValueError, match="other genes than the model"):
        model.get_latent_representation(adata=new)
    assert_data_unchanged(new, before)


def test_unseen_batch_error_names_the_fix(gmvae_model, fov_slides):
    model, _ = gmvae_model
    new = fov_slides.copy()
    _unseen_batch(new)
    with pytest.raises(ValueError, match="load_query_data"):
        model.get_latent_representation(adata=new)


def test_dataframe_coordinates_at_inference(gmvae_model, fov_slides):
    model, _ = gmvae_model
    new = fov_slides.copy()
    new.obsm["spatial"] = pd.DataFrame(
        new.obsm["spatial"], index=new.obs_names, columns=["x", "y"]
    )
    with pytest.raises(ValueError, match=r"must be a numpy array.*got a DataFrame.*to_numpy"):
        model.get_latent_representation(adata=new)


def _permuted_genes(a):
    return a[:, np.random.default_rng(0).permutation(a.n_vars)].copy()


@pytest.mark.parametrize("make", [renamed_genes, _permuted_genes], ids=["renamed", "permuted"])
def test_inference_rejects_other_gene_set(gmvae_model, fov_slides, make):
    model, _ = gmvae_model
    new = make(fov_slides)
    before = snapshot(new)
    with pytest.raises(ValueError, match="var_names|genes"):
        model.get_latent_representation(adata=new)
    assert_data_unchanged(new, before)


# ------------------------------------------------------------------- official checkpoints: genes


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A random-weight official checkpoint loaded on 100 vocabulary genes, and its vocabulary."""
    prefix = tmp_path_factory.mktemp("official") / "random"
    config_path, _ = random_official_checkpoint(prefix, n_hidden=32, n_layers=1, n_latent=8)
    vocab = json.loads(config_path.read_text())["gene_list"]
    adata = _official_adata(vocab[:100])
    CellPLM.setup_anndata(adata, tissue_key="tissue")
    return CellPLM.load_official(prefix, adata), adata, vocab, prefix


def _official_adata(genes) -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(1.0, (120, len(genes))).astype(np.float32))
    adata = ad.AnnData(X=X)
    adata.var_names = list(genes)
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.obs["tissue"] = pd.Categorical(np.repeat(["a", "b"], adata.n_obs // 2))
    return adata


def test_official_model_rejects_other_gene_set(official):
    model, adata, vocab, _ = official
    other = _official_adata(vocab[100:200])  # same counts, different genes
    with pytest.raises(ValueError, match="var_names|genes"):
        model.get_latent_representation(adata=other)


def test_load_official_rejects_duplicated_genes(official):
    _, _, vocab, prefix = official
    adata = _official_adata([*vocab[:99], vocab[5]])
    CellPLM.setup_anndata(adata, tissue_key="tissue")  # setup itself does not look at genes
    before = snapshot(adata)
    with pytest.raises(ValueError, match=f"occur more than once: '{vocab[5]}'.*var_names_make"):
        CellPLM.load_official(prefix, adata)
    assert_data_unchanged(adata, before)


# ---------------------------------------------------------------------------------- backed / COO


def test_backed_anndata_gives_in_memory_embedding(gmvae_model, fov_slides, tmp_path):
    model, _ = gmvae_model
    z = model.get_latent_representation()  # the in-memory copy it was gmvae_model on
    path = tmp_path / "cells.h5ad"
    fov_slides.write_h5ad(path)

    transferred = ad.read_h5ad(path, backed="r")  # never set up: setup is transferred
    assert transferred.isbacked and not isinstance(transferred.X, np.ndarray | sp.spmatrix)
    np.testing.assert_allclose(model.get_latent_representation(transferred), z, atol=1e-5)

    set_up = ad.read_h5ad(path, backed="r")
    CellPLM.setup_anndata(set_up, **FOV_SETUP)
    assert set_up.isbacked
    np.testing.assert_allclose(model.get_latent_representation(set_up), z, atol=1e-5)
    # the file still holds the original counts
    np.testing.assert_array_equal(dense(ad.read_h5ad(path).X), dense(fov_slides.X))


def test_backed_anndata_bad_counts_are_rejected(gmvae_model, fov_slides, tmp_path):
    model, _ = gmvae_model
    bad = fov_slides.copy()
    _fractional_counts(bad)
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    with pytest.raises(ValueError, match="non-integer"):
        model.get_latent_representation(ad.read_h5ad(path, backed="r"))
    with pytest.raises(ValueError, match="non-integer"):
        CellPLM.setup_anndata(ad.read_h5ad(path, backed="r"), **FOV_SETUP)


def test_coo_counts(gmvae_model, fov_slides):
    """anndata >= 0.12 refuses a COO ``X`` itself; CellPLM's count check accepts COO."""
    model, _ = gmvae_model
    coo = sp.coo_matrix(fov_slides.X)
    try:
        new = ad.AnnData(
            X=coo, obs=fov_slides.obs.copy(), obsm={"spatial": fov_slides.obsm["spatial"]}
        )
    except ValueError as err:  # rejected before CellPLM sees it, with a clear message
        assert "CSR and CSC" in str(err)
    else:  # older anndata keeps COO: it must give the CSR embedding and stay COO
        z = model.get_latent_representation(new)
        np.testing.assert_allclose(z, model.get_latent_representation(), atol=1e-5)
        assert sp.issparse(new.X) and new.X.format == "coo"
    # the count check handles COO (row slicing needs a CSR copy) without modifying it
    holder = SimpleNamespace(X=coo, layers={}, n_obs=coo.shape[0])
    check_counts(holder, None)
    bad = coo.copy()
    bad.data = bad.data.copy()
    bad.data[0] = 0.5
    with pytest.raises(ValueError, match="non-integer"):
        check_counts(SimpleNamespace(X=bad, layers={}, n_obs=bad.shape[0]), None)
    assert coo.format == "coo" and bad.format == "coo"


# ---------------------------------------------------------------------------------- matrix types


FORMATS = [
    pytest.param(sp.csr_matrix, id="csr"),
    pytest.param(sp.csc_matrix, id="csc"),
    pytest.param(lambda x: np.asarray(x.toarray()), id="dense"),
    pytest.param(sp.csr_array, id="csr_array"),
]


def _with_counts_in_x(adata: ad.AnnData, convert) -> ad.AnnData:
    """Unregistered copy with the counts, converted, in ``X`` and no layers."""
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    out = unregistered(adata)
    out.X = convert(sp.csr_matrix(counts))
    for key in [k for k in out.layers if k is not None]:  # anndata >= 0.13 lists X as None
        del out.layers[key]
    return out


@pytest.fixture(scope="module")
def csr_model(slides):
    """Untrained model on counts in a CSR ``X``; eval mode is deterministic."""
    adata = _with_counts_in_x(slides[:600], sp.csr_matrix)
    CellPLM.setup_anndata(adata, tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.is_trained_ = True  # random weights are enough here; scvi-tools refuses untrained
    return model, adata


@pytest.mark.parametrize("convert", FORMATS)
def test_matrix_type_trains(slides, convert):
    adata = _with_counts_in_x(slides[:600], convert)
    CellPLM.setup_anndata(adata, tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=1, **FIT)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert np.isfinite(model.get_latent_representation()).all()


def _check_tissue_loader_rows(model: CellPLM, adata: ad.AnnData, counts: sp.csr_matrix) -> None:
    """Every minibatch holds the exact counts of its rows, as a float32 CSR tensor whose
    indices keep scipy's int32 (no int64 copy); every row comes exactly once."""
    from cellplm_scvi._constants import INDICES_KEY, X_KEY

    seen = []
    for tensors in model._make_data_loader(model._validate_anndata(adata)):
        x, rows = tensors[X_KEY], tensors[INDICES_KEY].view(-1).numpy()
        assert x.layout == torch.sparse_csr and x.dtype == torch.float32
        assert x.crow_indices().dtype == x.col_indices().dtype == torch.int32
        np.testing.assert_array_equal(x.to_dense().numpy(), counts[rows].toarray())
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(adata.n_obs))


@pytest.mark.parametrize("convert", FORMATS)
@pytest.mark.parametrize("layout", ["as_simulated", "tissues_contiguous"])
def test_tissue_loader_reads_exact_rows(csr_model, convert, layout):
    """Scattered tissues are read by a row index, contiguous ones by one slice."""
    model, adata = csr_model
    other = _with_counts_in_x(adata, convert)
    if layout == "tissues_contiguous":
        other = other[np.argsort(other.obs["fov"].to_numpy(), kind="stable")].copy()
    _check_tissue_loader_rows(model, other, sp.csr_matrix(other.X))


class _FullSliceIsSelf(sp.csr_matrix):
    """CSR matrix whose full row slice is the matrix itself (as in some scipy versions)."""

    def __getitem__(self, key):
        if isinstance(key, slice) and key.indices(self.shape[0]) == (0, self.shape[0], 1):
            return self
        return super().__getitem__(key)


def test_tissue_loader_never_shares_the_users_buffers():
    """One tissue spanning every row is read as a full slice; even where that slice is the
    user's matrix itself, the minibatch owns its arrays."""
    from cellplm_scvi._constants import X_KEY

    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (50, 30)).astype(np.float32)))
    adata.var_names = [f"g{i}" for i in range(30)]
    adata.obs["tissue"] = "one"
    CellPLM.setup_anndata(adata, tissue_key="tissue")
    model = CellPLM(adata, **ARCH)
    loader = model._make_data_loader(model._validate_anndata(adata))
    users = loader.dataset.x = _FullSliceIsSelf(loader.dataset.x)
    assert users[0 : adata.n_obs] is users  # the case guarded against
    (tensors,) = list(loader)
    x = tensors[X_KEY]
    np.testing.assert_array_equal(x.to_dense().numpy(), users.toarray())
    for mine, theirs in [
        (x.values(), users.data),
        (x.col_indices(), users.indices),
        (x.crow_indices(), users.indptr),
    ]:
        assert not np.shares_memory(mine.numpy(), theirs)


@pytest.mark.parametrize("layout", ["as_simulated", "tissues_contiguous"])
def test_tissue_loader_reads_exact_rows_from_backed_h5ad(csr_model, tmp_path, layout):
    model, adata = csr_model
    if layout == "tissues_contiguous":
        adata = adata[np.argsort(adata.obs["fov"].to_numpy(), kind="stable")]
    unregistered(adata).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    _check_tissue_loader_rows(model, backed, sp.csr_matrix(adata.X))
    assert backed.isbacked


@pytest.mark.parametrize("convert", FORMATS)
def test_matrix_type_gives_same_embedding(csr_model, convert):
    model, adata = csr_model
    reference = model.get_latent_representation()
    other = _with_counts_in_x(adata, convert)
    before = snapshot(other)
    np.testing.assert_allclose(model.get_latent_representation(other), reference, atol=1e-5)
    assert_data_unchanged(other, before)


# ------------------------------------------------------------------------------------- precision


def test_reduced_precision_inference(gmvae_model):
    model, _ = gmvae_model
    z = model.get_latent_representation()
    z_bf16 = model.get_latent_representation(precision="bf16")
    assert z_bf16.dtype == np.float32 and z_bf16.shape == z.shape
    assert np.linalg.norm(z_bf16 - z) / np.linalg.norm(z) < 5e-2
    assert not np.array_equal(z_bf16, z)  # autocast was really on
    np.testing.assert_array_equal(model.get_latent_representation(), z)  # weights untouched
    with pytest.raises(
        ValueError, match=r"precision must be one of \['32', 'bf16', '16', 'int8'\]"
    ):
        model.get_latent_representation(precision="bogus")


# ---------------------------------------------------------------------------- user-facing output


_EMBED_SCRIPT = """
import anndata as ad, numpy as np, scipy.sparse as sp
import cellplm_scvi as cp
rng = np.random.default_rng(0)
adata = ad.AnnData(sp.csr_matrix(rng.poisson(0.5, (120, 40)).astype(np.float32)))
adata.var_names = [f"g{i}" for i in range(40)]
cp.CellPLM.setup_anndata(adata)
model = cp.CellPLM(adata, n_hidden=16, n_layers=1, n_heads=2, n_latent=4)
model.is_trained_ = True  # random weights suffice here
print(model.get_latent_representation().shape)
"""


def test_embedding_warns_nothing_in_a_fresh_process():
    """torch's once-per-process 'sparse CSR support is in beta' note is not shown to users
    (a fresh process, because earlier tests may already have used it up)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", _EMBED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(120, 4)")
    assert "Warning" not in proc.stderr
