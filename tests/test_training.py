"""Reliability of ``CellPLM`` beyond the happy path (complements ``test_model.py``).

- bad input at inference on a trained model (transfer to a new AnnData): clear errors, and the
  user's counts / layers / coordinates are left untouched;
- backed (``backed="r"``) AnnData and COO counts;
- query mapping with :meth:`CellPLM.load_query_data` (what is trainable, what stays frozen);
- reproducibility (seeded training, row order, computed tissues);
- safety of our own model files (``weights_only=True``, tampered / truncated / foreign files);
- resuming training after ``save`` / ``load``;
- reduced-precision inference.

Data: one small simulated pair of slides; tiny networks; the file runs in well under two
minutes on one CPU thread.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import cellplm_scvi as cp
from cellplm_scvi import CellPLM
from cellplm_scvi._validation import check_counts
from cellplm_scvi.datasets import random_official_checkpoint
from tests._anndata_checks import (
    assert_data_unchanged,
    dense,
    snapshot,
    unregistered,
)
from tests._helpers import ARCH, FIT

N_CELLS = 400
N_VARS = 765  # genes of the simulated data
VAL = {"train_size": 0.75, "check_val_every_n_epoch": 1}  # 2 of 8 fields of view validate
# counts in X (so that a backed AnnData really reads them from disk), fields of view as tissues
SETUP = {
    "batch_key": "slide",
    "labels_key": "cell_type",
    "spatial_key": "spatial",
    "tissue_key": "fov",
}
QUERY_SAMPLE = "slide1_R"  # the query batch of the query-mapping tests
MODEL_FILE_FORMAT = "cellplm_scvi/2"


# ------------------------------------------------------------------------------ helpers


def _simulate(n_cells: int = N_CELLS, seed: int = 0) -> ad.AnnData:
    """Two slides, raw counts in a CSR ``X`` (no layers), ``obs["fov"]`` (2 x 2 fields of view
    per slide) and ``obs["sample"]`` (left / right half of each slide)."""
    adata = cp.datasets.simulate_tissue(n_cells=n_cells, n_slides=2, seed=seed)
    adata.X = sp.csr_matrix(adata.layers["counts"])
    del adata.layers["counts"]
    xy = adata.obsm["spatial"]
    cell = (xy // 500).astype(int)
    slide = adata.obs["slide"].astype(str)
    adata.obs["slide"] = pd.Categorical(slide)
    adata.obs["cell_type"] = pd.Categorical(adata.obs["cell_type"].astype(str))
    adata.obs["fov"] = pd.Categorical(
        slide + "_" + cell[:, 0].astype(str) + cell[:, 1].astype(str)
    )
    adata.obs["sample"] = pd.Categorical(slide + np.where(cell[:, 0] == 0, "_L", "_R"))
    return adata


def _by_name(values: np.ndarray, adata: ad.AnnData) -> pd.DataFrame:
    return pd.DataFrame(values, index=adata.obs_names)


def _history(model: CellPLM, key: str) -> np.ndarray:
    return model.history[key].to_numpy(dtype=float).ravel()


def _payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class _Marker:
    """Unpickling this calls ``open(path, "w")``: a harmless stand-in for ``os.system``.

    If a loader ever unpickles it, the marker file appears.
    """

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _ModeSpy(Callback):
    """Records whether the module (and its latent layer) is in train mode at each step."""

    def __init__(self):
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        module = pl_module.module
        self.modes.append(module.training and module.latent.training)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def simulated() -> ad.AnnData:
    """Read-only source; tests take copies."""
    return _simulate()


@pytest.fixture(scope="module")
def trained(simulated):
    """Batch, labels, coordinates and fields of view registered; 2 epochs with validation."""
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, **SETUP)
    scvi.settings.seed = 0
    # the GMVAE: its latent (free-bits) loss is > 0 in train mode, which the resume test reads
    model = CellPLM(adata, latent="gmvae", **ARCH)
    model.train(max_epochs=2, **VAL, **FIT)
    return model, adata


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


@pytest.fixture(scope="module")
def reference(simulated):
    """Reference of three samples (``batch_key="sample"``); the query is a fourth sample."""
    ref = simulated[simulated.obs["sample"] != QUERY_SAMPLE].copy()
    query = simulated[simulated.obs["sample"] == QUERY_SAMPLE].copy()
    for part in (ref, query):
        part.obs["sample"] = part.obs["sample"].astype(str)
    CellPLM.setup_anndata(ref, batch_key="sample", tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(ref, **ARCH)
    model.train(max_epochs=1, **FIT)
    assert model.summary_stats.n_batch == 3
    return model, ref, query


# ------------------------------------------------------------------------------ 1. inference


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
def test_inference_rejects_bad_input(trained, simulated, case):
    model, _ = trained
    mutate, match = INFERENCE_ERRORS[case]
    new = simulated.copy()
    mutate(new)
    before = snapshot(new)
    with pytest.raises(ValueError, match=match):
        model.get_latent_representation(adata=new)
    assert_data_unchanged(new, before)


def test_inference_rejects_missing_genes(trained, simulated):
    model, _ = trained
    new = simulated[:, : N_VARS - 65].copy()
    before = snapshot(new)
    with pytest.raises(ValueError, match="other genes than the model"):
        model.get_latent_representation(adata=new)
    assert_data_unchanged(new, before)


def test_unseen_batch_error_names_the_fix(trained, simulated):
    model, _ = trained
    new = simulated.copy()
    _unseen_batch(new)
    with pytest.raises(ValueError, match="load_query_data"):
        model.get_latent_representation(adata=new)


def test_dataframe_coordinates_at_inference(trained, simulated):
    model, _ = trained
    new = simulated.copy()
    new.obsm["spatial"] = pd.DataFrame(
        new.obsm["spatial"], index=new.obs_names, columns=["x", "y"]
    )
    with pytest.raises(ValueError, match=r"must be a numpy array.*got a DataFrame.*to_numpy"):
        model.get_latent_representation(adata=new)


def _renamed_genes(a):
    return ad.AnnData(
        X=a.X.copy(),
        obs=a.obs.copy(),
        obsm={k: np.array(v, copy=True) for k, v in a.obsm.items()},
        var=pd.DataFrame(index=[f"gene{i}" for i in range(a.n_vars)]),
    )


def _permuted_genes(a):
    return a[:, np.random.default_rng(0).permutation(a.n_vars)].copy()


@pytest.mark.parametrize("make", [_renamed_genes, _permuted_genes], ids=["renamed", "permuted"])
def test_inference_rejects_other_gene_set(trained, simulated, make):
    model, _ = trained
    new = make(simulated)
    before = snapshot(new)
    with pytest.raises(ValueError, match="var_names|genes"):
        model.get_latent_representation(adata=new)
    assert_data_unchanged(new, before)


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


# ------------------------------------------------------------------------------ 2. backed / COO


def test_backed_anndata_gives_in_memory_embedding(trained, simulated, tmp_path):
    model, _ = trained
    z = model.get_latent_representation()  # the in-memory copy it was trained on
    path = tmp_path / "cells.h5ad"
    simulated.write_h5ad(path)

    transferred = ad.read_h5ad(path, backed="r")  # never set up: setup is transferred
    assert transferred.isbacked and not isinstance(transferred.X, np.ndarray | sp.spmatrix)
    np.testing.assert_allclose(model.get_latent_representation(transferred), z, atol=1e-5)

    set_up = ad.read_h5ad(path, backed="r")
    CellPLM.setup_anndata(set_up, **SETUP)
    assert set_up.isbacked
    np.testing.assert_allclose(model.get_latent_representation(set_up), z, atol=1e-5)
    # the file still holds the original counts
    np.testing.assert_array_equal(dense(ad.read_h5ad(path).X), dense(simulated.X))


def test_backed_anndata_bad_counts_are_rejected(trained, simulated, tmp_path):
    model, _ = trained
    bad = simulated.copy()
    _fractional_counts(bad)
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    with pytest.raises(ValueError, match="non-integer"):
        model.get_latent_representation(ad.read_h5ad(path, backed="r"))
    with pytest.raises(ValueError, match="non-integer"):
        CellPLM.setup_anndata(ad.read_h5ad(path, backed="r"), **SETUP)


def test_coo_counts(trained, simulated):
    """anndata >= 0.12 refuses a COO ``X`` itself; CellPLM's count check accepts COO."""
    model, _ = trained
    coo = sp.coo_matrix(simulated.X)
    try:
        new = ad.AnnData(
            X=coo, obs=simulated.obs.copy(), obsm={"spatial": simulated.obsm["spatial"]}
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


# ------------------------------------------------------------------------------ 3. query


def _covariate_tables(module) -> set[str]:
    return {
        name
        for name, _ in module.named_parameters()
        if name.startswith("decoder.covariate_layers.") and name.endswith(".batch.0.weight")
    }


def _trainable(module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_query_trainable_parameters(reference):
    ref_model, _, query = reference
    model = CellPLM.load_query_data(query.copy(), ref_model)
    tables = _covariate_tables(model.module)
    assert tables, "the reference decoder has no batch-embedding table"
    assert _trainable(model.module) == tables
    for name in tables:  # one new row for the query sample
        assert model.module.get_parameter(name).shape[0] == 4

    model = CellPLM.load_query_data(query.copy(), ref_model, train_decoder=True)
    decoder = {n for n, _ in model.module.named_parameters() if n.startswith("decoder.")}
    assert _trainable(model.module) == decoder
    # the reference model itself is left trainable and unchanged
    assert all(
        p.requires_grad for n, p in ref_model.module.named_parameters() if "pe_enc" not in n
    )


@pytest.mark.parametrize("train_decoder", [False, True])
def test_query_training_keeps_the_reference(reference, train_decoder):
    ref_model, ref, query = reference
    z_ref = ref_model.get_latent_representation()
    ref_state = {k: v.clone() for k, v in ref_model.module.state_dict().items()}

    # zero-shot: the reference cannot embed the new sample; relabelled to a reference sample,
    # it can, and the embedding does not depend on the batch
    zero_shot = query.copy()
    zero_shot.obs["sample"] = ref.obs["sample"].iloc[0]
    z_zero_shot = ref_model.get_latent_representation(zero_shot)

    model = CellPLM.load_query_data(query.copy(), ref_model, train_decoder=train_decoder)
    np.testing.assert_allclose(model.get_latent_representation(), z_zero_shot, atol=1e-6)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    scvi.settings.seed = 0
    model.train(max_epochs=2, **FIT)
    after = model.module.state_dict()

    changed = {k for k in after if not torch.equal(after[k], before[k])}
    tables = _covariate_tables(model.module)
    assert tables <= changed, "the new batch rows were not trained"
    if not train_decoder:
        assert changed == tables
    else:
        assert all(k.startswith("decoder.") for k in changed), changed
    for name in tables:
        np.testing.assert_array_equal(after[name][:3].numpy(), before[name][:3].numpy())
        assert not torch.equal(after[name][3], before[name][3])

    # embeddings: reference cells exactly as before, query cells as zero-shot
    np.testing.assert_array_equal(model.get_latent_representation(unregistered(ref)), z_ref)
    np.testing.assert_allclose(model.get_latent_representation(), z_zero_shot, atol=1e-6)
    # the reference model is untouched
    for key, value in ref_model.module.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    np.testing.assert_array_equal(ref_model.get_latent_representation(), z_ref)


def test_query_training_records_history(reference):
    ref_model, _, query = reference
    model = CellPLM.load_query_data(query.copy(), ref_model)
    n_reference = len(_history(ref_model, "train_loss"))
    model.train(max_epochs=2, **FIT)
    loss = _history(model, "train_loss")
    assert len(loss) == n_reference + 2  # the query's own epochs are appended
    assert np.isfinite(loss).all()


def test_query_reference_rows_frozen_under_weight_decay(reference):
    ref_model, _, query = reference
    model = CellPLM.load_query_data(query.copy(), ref_model)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(max_epochs=1, lr=1e-2, plan_kwargs={"weight_decay": 0.5}, **FIT)
    for name in _covariate_tables(model.module):
        after = model.module.get_parameter(name).detach()
        np.testing.assert_array_equal(after[:3].numpy(), before[name][:3].numpy())


def test_query_on_single_batch_reference(reference):
    _, ref, query = reference
    single = unregistered(ref[ref.obs["sample"] == ref.obs["sample"].iloc[0]])
    CellPLM.setup_anndata(single, batch_key="sample", tissue_key="fov")
    scvi.settings.seed = 0
    ref_model = CellPLM(single, **ARCH)
    with pytest.raises(ValueError, match="no decoder batch table.*get_latent_representation"):
        CellPLM.load_query_data(query.copy(), ref_model)


def test_query_reference_model_type(reference, simulated):
    _, _, query = reference
    adata = simulated.copy()
    scvi.model.SCVI.setup_anndata(adata)
    other = scvi.model.SCVI(adata, n_hidden=8, n_latent=2, n_layers=1)
    for wrong in (other, CellPLM, "model.pt"):
        with pytest.raises(ValueError, match="reference_model must be a CellPLM"):
            CellPLM.load_query_data(query.copy(), wrong)


# ------------------------------------------------------------------------------ 4. determinism


def _fit_from_scratch(adata: ad.AnnData, seed: int) -> CellPLM:
    adata = unregistered(adata)
    CellPLM.setup_anndata(adata, **SETUP)
    scvi.settings.seed = seed
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=2, **VAL, **FIT)
    return model


def test_seeded_training_is_reproducible(simulated):
    first, second = _fit_from_scratch(simulated, 0), _fit_from_scratch(simulated, 0)
    assert set(first.history) == set(second.history)
    for key in first.history:
        pd.testing.assert_frame_equal(first.history[key], second.history[key], check_exact=True)
    z = first.get_latent_representation()
    np.testing.assert_array_equal(z, second.get_latent_representation())
    other = _fit_from_scratch(simulated, 1)  # the seed matters
    assert not np.array_equal(_history(other, "train_loss"), _history(first, "train_loss"))
    assert np.abs(other.get_latent_representation() - z).max() > 1e-4


def test_row_order_does_not_change_any_output(trained):
    model, adata = trained
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


def _tissue_sets(adata: ad.AnnData) -> set[frozenset]:
    groups = adata.obs.groupby("cellplm_tissue", observed=True).groups
    return {frozenset(index) for index in groups.values()}


def test_computed_tissues_do_not_depend_on_row_order(simulated):
    setup = {"spatial_key": "spatial", "library_key": "slide", "max_cells": 60}
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, **setup)
    shuffled = simulated[np.random.default_rng(4).permutation(simulated.n_obs)].copy()
    CellPLM.setup_anndata(shuffled, **setup)
    tissues = _tissue_sets(adata)
    assert len(tissues) > 4
    assert tissues == _tissue_sets(shuffled)
    # so the embeddings of an (untrained, eval-mode) model agree cell by cell
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.is_trained_ = True  # random weights suffice; scvi-tools refuses untrained models
    z = _by_name(model.get_latent_representation(), adata)
    transferred = unregistered(simulated[np.random.default_rng(5).permutation(simulated.n_obs)])
    got = _by_name(model.get_latent_representation(transferred), transferred)
    assert _tissue_sets(transferred) == tissues
    np.testing.assert_allclose(got.to_numpy(), z.loc[got.index].to_numpy(), atol=1e-5)


# ------------------------------------------------------------------------------ 5. model files


@pytest.fixture
def saved(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "model"
    model.save(path)
    return path


def test_saved_model_loads_with_weights_only(trained, saved):
    model, adata = trained
    payload = _payload(saved / "model.pt")
    assert payload["attr_dict"]["cellplm_format_"] == MODEL_FILE_FORMAT
    assert list(payload["var_names"]) == list(adata.var_names)
    assert payload["attr_dict"]["registry_"]["model_name"] == "CellPLM"
    loaded = CellPLM.load(saved, adata=unregistered(adata))
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


@pytest.mark.parametrize("kind", ["torch_save", "plain_pickle"])
def test_tampered_model_file_is_refused_without_running_code(trained, saved, tmp_path, kind):
    _, adata = trained
    marker = tmp_path / "MARKER"
    payload = {"attr_dict": {"cellplm_format_": MODEL_FILE_FORMAT}, "x": _Marker(marker)}
    if kind == "torch_save":
        torch.save(payload, saved / "model.pt")
    else:
        (saved / "model.pt").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="Refusing to load .*pickled Python objects|raw pickle"):
        CellPLM.load(saved, adata=unregistered(adata))
    assert not marker.exists(), "loading ran code from the file"
    pickle.loads(pickle.dumps(_Marker(marker)))  # the payload does work when unpickled
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_model_file(trained, saved, damage):
    _, adata = trained
    data = (saved / "model.pt").read_bytes()
    data = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": np.random.default_rng(0).bytes(4096),
    }[damage]
    (saved / "model.pt").write_bytes(data)
    # random bytes are not a zip archive, so torch reads them as a legacy pickle, which the
    # weights-only unpickler refuses: a (misleading but safe) "pickled objects" error
    match = "corrupt or truncated"
    with pytest.raises(ValueError, match=match):
        CellPLM.load(saved, adata=unregistered(adata))


def test_file_without_format_marker_is_refused(trained, saved):
    model, adata = trained
    torch.save({"model_state_dict": model.module.state_dict()}, saved / "model.pt")
    with pytest.raises(ValueError, match="not a CellPLM model file"):
        CellPLM.load(saved, adata=unregistered(adata))


def test_scvi_model_directory_is_refused(simulated, tmp_path):
    adata = simulated.copy()
    scvi.model.SCVI.setup_anndata(adata)
    scvi.model.SCVI(adata, n_hidden=8, n_latent=2, n_layers=1).save(tmp_path / "scvi")
    with pytest.raises(ValueError, match="Refusing to load"):
        CellPLM.load(tmp_path / "scvi", adata=unregistered(adata))


def test_other_model_class_is_refused(trained, saved):
    _, adata = trained
    payload = _payload(saved / "model.pt")
    payload["attr_dict"]["registry_"]["model_name"] = "SCANVI"
    torch.save(payload, saved / "model.pt")
    with pytest.raises(ValueError, match="holds a 'SCANVI' model, not a CellPLM"):
        CellPLM.load(saved, adata=unregistered(adata))


def test_load_into_anndata_with_fewer_genes(trained, saved):
    _, adata = trained
    with pytest.raises(ValueError, match="genes differ from the saved model"):
        CellPLM.load(saved, adata=unregistered(adata[:, :700]))


def test_load_into_anndata_with_other_genes(trained, simulated, saved):
    with pytest.raises(ValueError, match="var_names|genes"):
        CellPLM.load(saved, adata=_renamed_genes(simulated))


def test_save_does_not_overwrite(trained, saved):
    model, _ = trained
    before = (saved / "model.pt").read_bytes()
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        model.save(saved)
    assert (saved / "model.pt").read_bytes() == before
    model.save(saved, overwrite=True)
    assert _payload(saved / "model.pt")["attr_dict"]["cellplm_format_"] == MODEL_FILE_FORMAT


def test_history_round_trips_exactly(trained, saved):
    model, adata = trained
    loaded = CellPLM.load(saved, adata=unregistered(adata))
    assert set(loaded.history) == set(model.history)
    for key, frame in model.history.items():
        pd.testing.assert_frame_equal(loaded.history[key], frame, check_exact=True)


# ------------------------------------------------------------------------------ 6. resume


def test_resumed_training_runs_in_train_mode(trained, saved):
    model, adata = trained
    old_train = _history(model, "train_loss")
    loaded = CellPLM.load(saved, adata=unregistered(adata))
    assert not loaded.module.training  # load leaves eval mode for inference
    np.testing.assert_allclose(_history(loaded, "train_loss"), old_train, rtol=1e-9)

    spy = _ModeSpy()
    scvi.settings.seed = 0
    loaded.train(max_epochs=1, callbacks=[spy], **VAL, **FIT)
    assert spy.modes and all(spy.modes), f"steps in eval mode: {spy.modes}"
    # history grows, and the new epoch has the training objective: the latent (free-bits) loss
    # is computed in train mode only, so it is zero for an eval-mode step
    train = _history(loaded, "train_loss")
    assert len(train) == len(old_train) + 1
    np.testing.assert_allclose(train[: len(old_train)], old_train, rtol=1e-9)
    latent = _history(loaded, "latent_loss_train")
    assert latent[-1] > 0
    assert len(_history(loaded, "validation_loss")) == len(old_train) + 1
    assert np.isfinite(loaded.get_latent_representation()).all()


# ------------------------------------------------------------------------------ 7. precision


def test_reduced_precision_inference(trained):
    model, _ = trained
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


# ------------------------------------------------------------------------------ user-facing output
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


def test_mixed_precision_loss_stays_float32(trained):
    """Under bf16 autocast (Lightning's ``precision="bf16-mixed"``) the NB loss is computed in
    float32 from exact counts (bf16 holds integers exactly only up to 256) and stays close to
    the float32 loss."""
    from cellplm_scvi._constants import X_KEY
    from cellplm_scvi.module._loss import masked_nb_loss

    model, adata = trained
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


def test_mixed_precision_training(simulated, monkeypatch):
    adata = simulated.copy()
    CellPLM.setup_anndata(adata, **SETUP)
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
