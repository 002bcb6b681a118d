"""Export to the official CellPLM format: ``CellPLM.save_official``.

A model trained here is written as ``<prefix>.config.json`` + ``<prefix>.best.ckpt`` and read by
the real official package (``CellPLM.model.OmicsFormer(**config)`` + a strict
``load_state_dict``, and the official ``CellEmbeddingPipeline``). The official evaluation
forward, run on each tissue (the cells that attend to each other), must embed the cells as our
model does (``1e-5`` absolute). For the GMVAE the official hard Gumbel-softmax cluster draw
gets zero noise, so that ``y = one_hot(argmax logits)`` as in our evaluation.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellplm_scvi as cp
from cellplm_scvi._genes import official_config as released_config
from cellplm_scvi.datasets import random_official_checkpoint
from cellplm_scvi.official._files import DEAD_KEYS, read_config, read_state_dict
from tests._helpers import (
    ATOL,
    FIT,
    RTOL,
    max_abs,
    max_rel,
    official_model_forward,
    read_official,
    to_csr,
)

ROUND_TRIP_ATOL = 1e-6  # ours -> files -> ours
N_CELLS = 160
N_GENES = 100


# ------------------------------------------------------------------------------------ helpers


def make_adata(seed: int = 0) -> ad.AnnData:
    """Counts of two interleaved samples, genes named like symbols (not Ensembl IDs)."""
    rng = np.random.default_rng(seed)
    X = sp.random(
        N_CELLS,
        N_GENES,
        density=0.25,
        format="csr",
        dtype=np.float32,
        random_state=rng,
        data_rvs=lambda k: rng.poisson(4.0, k).astype(np.float32) + 1,
    )
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical(rng.permutation(np.repeat(["s1", "s2"], N_CELLS // 2))),
            "donor": pd.Categorical(rng.choice(["d1", "d2", "d3"], N_CELLS)),
            "cell_type": pd.Categorical(rng.choice(["T", "B"], N_CELLS)),
        },
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(X=X, obs=obs)
    adata.var_names = [f"GENE{i}" for i in range(N_GENES)]
    adata.obsm["spatial"] = rng.uniform(0, 100, (N_CELLS, 2))
    return adata


def build_model(adata: ad.AnnData, latent: str = "vae", **kwargs) -> cp.CellPLM:
    return cp.CellPLM(
        adata, n_hidden=32, n_layers=2, n_heads=4, n_latent=8, latent=latent, n_clusters=4,
        **kwargs,
    )  # fmt: skip


def tissues(adata: ad.AnnData) -> list[np.ndarray]:
    codes = adata.obs["cellplm_tissue"].to_numpy()
    return [np.flatnonzero(codes == t) for t in pd.unique(codes)]


def batch_codes(model: cp.CellPLM, adata: ad.AnnData) -> np.ndarray:
    return np.asarray(model.adata_manager.get_from_registry("batch")).ravel().astype(np.int64)


def clear_clusters(model: cp.CellPLM, X: sp.spmatrix) -> np.ndarray:
    """Cells whose two largest GMVAE cluster logits differ by more than 1e-4 (an argmax that
    cannot flip between two float32 implementations)."""
    with torch.no_grad():
        h = model.module.inference(x=to_csr(X), coords=None)["h"]
        logits = model.module.latent.layers[1].cluster_logits(h)
    top2 = torch.topk(logits, 2).values
    return (top2[:, 0] - top2[:, 1] > 1e-4).numpy()


@pytest.fixture(
    scope="module",
    params=[("vae", False), ("vae", True), ("gmvae", False), ("gmvae", True)],
    ids=["vae", "vae-batch", "gmvae", "gmvae-batch"],
)
def trained(request, tmp_path_factory):
    """(model, adata, prefix): a from-scratch model trained 2 epochs, exported."""
    latent, with_batch = request.param
    adata = make_adata()
    cp.CellPLM.setup_anndata(adata, batch_key="sample" if with_batch else None)
    assert adata.obs["cellplm_tissue"].nunique() == (2 if with_batch else 1)
    torch.manual_seed(0)
    model = build_model(adata, latent)
    model.train(max_epochs=2, train_size=1.0, **FIT)
    model.module.eval()
    prefix = str(tmp_path_factory.mktemp(f"export_{latent}_{with_batch}") / "mine")
    model.save_official(prefix)
    return model, adata, prefix


# ------------------------------------------------------------------------------------ (a) parity


def test_official_package_embeds_the_export_identically(trained, gumbel_argmax):
    model, adata, prefix = trained
    latent = model.module.latent_type
    with_batch = model.adata_manager.registry["setup_args"]["batch_key"] is not None
    config = json.loads(Path(f"{prefix}.config.json").read_text())
    assert config["gene_list"] == list(adata.var_names)
    assert config["latent_mod"] == latent
    assert config["batch_num"] == (2 if with_batch else 0)
    assert config["dataset_num"] == config["platform_num"] == 0
    assert sorted(Path(prefix).parent.iterdir()) == [
        Path(f"{prefix}.best.ckpt"),
        Path(f"{prefix}.config.json"),
    ]  # no temporary files left behind
    off = read_official(prefix)  # strict: every key, every shape

    z = model.get_latent_representation()
    codes = batch_codes(model, adata)
    diffs, rel_means, rel_disps, kept = [], [], [], []
    for rows in tissues(adata):
        X = adata.X[rows]
        ref = official_model_forward(off, X, adata.var_names, codes[rows] if with_batch else None)
        keep = clear_clusters(model, X) if latent == "gmvae" else np.ones(len(rows), bool)
        kept.append(keep.mean())
        diffs.append(max_abs(z[rows][keep], ref["latent"].numpy()[keep]))
        # the decoder of the same z, its batch table fed by the registered batch
        batch = torch.as_tensor(codes[rows]) if with_batch else None
        with torch.no_grad():
            gen = model.module.generative(ref["latent"], batch_index=batch)
        rel_means.append(max_rel(gen["px_mean"], ref["mean"]))
        rel_disps.append(max_rel(gen["px_theta"], ref["disp"][0]))
    print(
        f"[{latent}, batch={with_batch}] max|z|={np.abs(z).max():.3g} official vs ours: "
        f"max abs diff {max(diffs):.2e} (cells kept {min(kept):.3f}), NB mean rel "
        f"{max(rel_means):.2e}, dispersion rel {max(rel_disps):.2e}"
    )
    assert min(kept) > 0.9
    assert float(z.std(0).mean()) > 1e-3  # the cells are not all alike
    assert max(diffs) <= ATOL
    assert max(rel_means) <= RTOL
    assert max(rel_disps) <= RTOL

    # negative control: mislabelled genes move the official embedding far beyond the tolerance
    rows = tissues(adata)[0]
    shuffled = list(np.random.default_rng(0).permutation(adata.var_names))
    wrong = official_model_forward(
        off, adata.X[rows], shuffled, codes[rows] if with_batch else None
    )
    assert max_abs(z[rows], wrong["latent"].numpy()) > 100 * ATOL


def test_official_embedding_pipeline_reads_the_export(trained, gumbel_argmax):
    """The official ``CellEmbeddingPipeline`` (its own loader, grouping by ``obs['batch']``)."""
    from CellPLM.pipeline import cell_embedding as embedding_pipeline

    model, adata, prefix = trained
    with_batch = model.adata_manager.registry["setup_args"]["batch_key"] is not None
    query = ad.AnnData(X=adata.X.copy(), obs=pd.DataFrame(index=adata.obs_names))
    query.var_names = adata.var_names
    if with_batch:
        query.obs["batch"] = adata.obs["sample"].to_numpy()
    pipeline = embedding_pipeline.CellEmbeddingPipeline(
        pretrain_prefix=Path(prefix).name, pretrain_directory=str(Path(prefix).parent)
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Batch labels not found")
        with torch.no_grad():
            ref = pipeline.predict(query, ensembl_auto_conversion=False, device="cpu").numpy()
    z = model.get_latent_representation()
    keep = np.ones(N_CELLS, dtype=bool)
    if model.module.latent_type == "gmvae":
        for rows in tissues(adata):
            keep[rows] = clear_clusters(model, adata.X[rows])
    d = max_abs(z[keep], ref[keep])
    print(f"[{model.module.latent_type}, batch={with_batch}] official pipeline: {d:.2e}")
    assert keep.mean() > 0.9
    assert d <= ATOL


# ------------------------------------------------------------------------------------ (b) back


def test_load_official_reads_the_export_back(trained):
    model, adata, prefix = trained
    query = adata.copy()
    cp.CellPLM.setup_anndata(
        query, batch_key=model.adata_manager.registry["setup_args"]["batch_key"]
    )
    loaded = cp.CellPLM.load_official(prefix, query)
    d = max_abs(loaded.get_latent_representation(), model.get_latent_representation())
    print(f"[{model.module.latent_type}] ours -> official files -> ours: max abs diff {d:.2e}")
    assert d <= ROUND_TRIP_ATOL

    ours, back = model.module.state_dict(), loaded.module.state_dict()
    assert set(ours) == set(back)
    for key, value in ours.items():
        if key.endswith("kl_step_count"):  # a training counter: the official file has none
            assert int(value) > 0 and int(back[key]) == 0
        else:
            assert torch.equal(value, back[key]), key
    assert loaded.module.mask_cell_rate == model.module.mask_cell_rate
    assert loaded.module.latent.layers[1].lamda == model.module.latent.layers[1].lamda
    if model.module.latent_type == "gmvae":
        layer, layer_back = model.module.latent.layers[1], loaded.module.latent.layers[1]
        assert (layer_back.w_li, layer_back.w_en) == (layer.w_li, layer.w_en)
        assert layer_back.n_clusters == layer.n_clusters


# ------------------------------------------------------------------------------------ (c) release


@pytest.mark.parametrize("latent", ["vae", "gmvae"])
def test_official_checkpoint_round_trips(latent, tmp_path):
    """An official release -> ``load_official`` -> ``save_official``: the same weights."""
    OmicsFormer = pytest.importorskip("CellPLM.model").OmicsFormer
    source = str(tmp_path / "release")
    random_official_checkpoint(source, latent=latent, n_hidden=32, n_layers=1, n_latent=8)
    original = read_config(Path(f"{source}.config.json"))
    genes = original["gene_list"][:300][::-1]  # a subset of the vocabulary, reversed
    rng = np.random.default_rng(1)
    adata = ad.AnnData(X=sp.random(60, 300, density=0.2, format="csr", random_state=rng))
    adata.X.data = rng.poisson(3.0, adata.X.nnz).astype(np.float32) + 1
    adata.var_names = genes
    cp.CellPLM.setup_anndata(adata)
    model = cp.CellPLM.load_official(source, adata)

    exported = str(tmp_path / "exported")
    model.save_official(exported)
    state, state_back = (
        read_state_dict(Path(f"{source}.best.ckpt")),
        read_state_dict(Path(f"{exported}.best.ckpt")),
    )
    # the official model's keys (the random release also carries our VAE's step counter,
    # which the official network lacks and the export leaves out)
    official_keys = set(OmicsFormer(**original).state_dict())
    assert set(state_back) == official_keys <= set(state)
    for key in official_keys:
        assert torch.equal(state[key], state_back[key]), key
    config = json.loads(Path(f"{exported}.config.json").read_text())
    assert {k: config[k] for k in original} == original  # every release entry kept
    read_official(exported)  # and the official package loads it strictly


# ------------------------------------------------------------------------------------ (d) refusals


def test_spatial_encoding_is_refused(tmp_path):
    pytest.importorskip("CellPLM")
    adata = make_adata()
    cp.CellPLM.setup_anndata(adata, spatial_key="spatial")
    model = build_model(adata, spatial_pe=True)
    assert model.module.use_spatial_pe
    with pytest.raises(ValueError, match="spatial positional encoding.*spatial_pe=False"):
        model.save_official(tmp_path / "spatial")
    assert list(tmp_path.iterdir()) == []  # nothing written
    # without the encoding the same data exports
    build_model(adata, spatial_pe=False).save_official(tmp_path / "no_pe")
    read_official(str(tmp_path / "no_pe"))


def test_extra_covariate_table_is_refused(tmp_path):
    adata = make_adata()
    cp.CellPLM.setup_anndata(adata, batch_key="sample", categorical_covariate_keys=["donor"])
    model = build_model(adata)
    with pytest.raises(ValueError, match=r"cov_donor.*categorical_covariate_keys"):
        model.save_official(tmp_path / "donor")
    assert list(tmp_path.iterdir()) == []


def test_existing_files_need_overwrite(tmp_path):
    adata = make_adata()
    cp.CellPLM.setup_anndata(adata)
    model = build_model(adata)
    prefix = tmp_path / "mine"
    model.save_official(prefix)
    before = Path(f"{prefix}.best.ckpt").read_bytes()
    with torch.no_grad():
        model.module.embedder.feat_enc.emb.add_(1.0)
    with pytest.raises(ValueError, match="overwrite=True"):
        model.save_official(prefix)
    assert Path(f"{prefix}.best.ckpt").read_bytes() == before
    # one of the two files is enough to refuse
    Path(f"{prefix}.best.ckpt").unlink()
    with pytest.raises(ValueError, match="overwrite=True"):
        model.save_official(prefix)
    model.save_official(prefix, overwrite=True)
    state = read_state_dict(Path(f"{prefix}.best.ckpt"))
    assert torch.equal(state["embedder.feat_enc.emb"], model.module.embedder.feat_enc.emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.best.ckpt", "mine.config.json"]


def test_classifier_head_is_left_out_with_a_warning(tmp_path):
    pytest.importorskip("CellPLM")
    adata = make_adata()
    cp.CellPLM.setup_anndata(adata, labels_key="cell_type")
    model = build_model(adata)
    assert model.module.classifier is not None
    with pytest.warns(UserWarning, match="classifier"):
        model.save_official(tmp_path / "head")
    state = read_state_dict(tmp_path / "head.best.ckpt")
    assert not any(k.startswith("classifier.") for k in state)
    read_official(str(tmp_path / "head"))


def test_vae_settings_the_official_layer_lacks_warn(tmp_path):
    pytest.importorskip("CellPLM")
    adata = make_adata()
    cp.CellPLM.setup_anndata(adata)
    model = build_model(adata, latent_kwargs={"lamda": 2.0, "kl_warmup_steps": 100})
    with pytest.warns(UserWarning, match="kl_warmup_steps"):
        model.save_official(tmp_path / "vae")
    read_official(str(tmp_path / "vae"))


def test_export_keeps_dead_keys_and_the_sinusoidal_table(trained):
    """The official never-called ``embedder.norm0`` is written with the official initial values,
    and our spatial table equals the official one (both sit in the file)."""
    OmicsFormer = pytest.importorskip("CellPLM.model").OmicsFormer
    model, _, prefix = trained
    state = read_state_dict(Path(f"{prefix}.best.ckpt"))
    n_hidden = model.module.embedder.feat_enc.emb.shape[1]
    config = {**released_config(), "enc_hid": n_hidden, "gene_list": ["A", "B"], "out_dim": 2}
    torch.manual_seed(0)
    fresh = OmicsFormer(**config).state_dict()
    for key in DEAD_KEYS:
        assert torch.equal(state[key], fresh[key]), key
    table = "embedder.pe_enc.pe_enc.weight"
    assert torch.allclose(state[table], fresh[table], atol=1e-6)
