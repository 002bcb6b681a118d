"""Parity with the official CellPLM package and robustness of ``CellPLM.load_official``.

Official models (``CellPLM.model.OmicsFormer``) are built with random weights, saved in the
official checkpoint format (``<prefix>.config.json`` + ``<prefix>.best.ckpt``) and loaded with
:meth:`cellplm_scvi.CellPLM.load_official`. The official forward pass is run stage by stage in
evaluation mode and compared with ours:

- VAE latent: the embedding (posterior mean) must agree to ``1e-5`` (absolute);
- GMVAE latent: the official code samples a Gumbel cluster, so both sides are evaluated with the
  same one-hot cluster ``y``; the pre-latent state and the posterior mean must agree to ``1e-5``;
- NB decoder: mean and dispersion of the genes of the AnnData must agree to ``1e-5`` (relative).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import cellplm_scvi as cp
from cellplm_scvi._genes import official_config, symbol_table
from tests._helpers import (
    ATOL,
    N_SMALL_VOCAB,
    RTOL,
    assert_same_weights,
    build_official,
    is_gmvae,
    max_abs,
    max_rel,
    official_files,
    official_forward,
    one_tissue_adata,
    random_counts,
    save_official,
    to_csr,
    write_config,
)

N_CELLS = 120


@dataclasses.dataclass
class _Meta:
    """A custom Python object that a checkpoint may pickle next to its state dict."""

    note: str = "trained on my laptop"


# ------------------------------------------------------------------------------------ helpers


@torch.no_grad()
def our_forward(model: cp.CellPLM, X: sp.spmatrix, y: torch.Tensor | None = None):
    """Our module on the same group of cells; ``y``: GMVAE cluster to condition on."""
    layout = model._layout_of(model.adata).tensors()  # as the loader puts it in a minibatch
    columns = {k: layout.get(k) for k in ("gene_index", "matched_columns")}
    inf = model.module.inference(x=to_csr(X), coords=None, gene_index=columns["gene_index"])
    out = {"h": inf["h"], "qz_m": inf["qz_m"]}
    layer = model.module.latent.layers[1]
    if y is not None:
        out["logits"] = layer.cluster_logits(inf["h"])
        out["mu"], out["var"] = layer.posterior(inf["h"], y)
    else:
        out["mu"] = inf["qz_m"]
    gen = model.module.generative(out["mu"], **columns)
    out["mean"], out["theta"] = gen["px_mean"], gen["px_theta"]
    return out


def check_parity(model, off, X_ours, X_off, genes_off, vocab_cols, label=""):
    """Compare ours (AnnData columns) with the official model (``genes_off`` columns).

    ``vocab_cols``: vocabulary rows of the genes that our decoder outputs (matched AnnData
    columns, in AnnData order).
    """
    ref = official_forward(off, X_off, genes_off)
    ours = our_forward(model, X_ours, ref.get("y"))
    d_h = max_abs(ours["h"], ref["h"])
    d_mu = max_abs(ours["mu"], ref["mu"])
    r_mean = max_rel(ours["mean"], ref["mean"][:, vocab_cols])
    r_disp = max_rel(ours["theta"], ref["disp"][0, vocab_cols])
    print(
        f"[{label}] |h|max={ref['h'].abs().max():.3g} dh={d_h:.2e} |mu|max="
        f"{ref['mu'].abs().max():.3g} dmu={d_mu:.2e} rel dmean={r_mean:.2e} rel ddisp={r_disp:.2e}"
    )
    assert d_h <= ATOL
    assert d_mu <= ATOL
    assert ours["mean"].shape == (X_ours.shape[0], len(vocab_cols))
    assert r_mean <= RTOL
    assert r_disp <= RTOL
    if "logits" in ref:
        assert max_abs(ours["logits"], ref["logits"]) <= ATOL
    return ref


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", params=["vae", "gmvae"])
def small(request, tmp_path_factory):
    """(config, official model, checkpoint prefix) of a small random official model."""
    pytest.importorskip("CellPLM")
    seed = 0 if request.param == "vae" else 1
    return official_files(request.param, seed, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    pytest.importorskip("CellPLM")
    return official_files("vae", 2, tmp_path_factory.mktemp("vae_robust"))


@pytest.fixture(scope="module")
def counts():
    return random_counts(N_CELLS, N_SMALL_VOCAB, 0.2, seed=0)


# ------------------------------------------------------------------------------------ parity


def test_small_parity_full_vocabulary(small, counts):
    config, off, prefix = small
    vocab = config["gene_list"]
    adata = one_tissue_adata(counts, vocab)
    model = cp.CellPLM.load_official(prefix, adata)  # strict load
    assert_same_weights(model, off)
    assert model.module.n_vocab == len(vocab)
    assert not model.module.training
    ref = check_parity(
        model, off, counts, counts, vocab, np.arange(len(vocab)), config["latent_mod"]
    )

    # the public API (tissue loader, AnnData order) gives the same embedding
    z = model.get_latent_representation()
    assert z.shape == (N_CELLS, config["post_latent_dim"])
    mu = ref["mu"].numpy()
    if is_gmvae(off):
        # our y = argmax of our logits; skip cells whose top-2 official logits nearly tie
        top2 = torch.topk(ref["logits"], 2).values
        clear = (top2[:, 0] - top2[:, 1] > 1e-4).numpy()
        assert clear.mean() > 0.9
        z, mu = z[clear], mu[clear]
    print(f"[{config['latent_mod']}] get_latent_representation max abs diff {max_abs(z, mu):.2e}")
    assert max_abs(z, mu) <= ATOL

    # negative control: mislabelled genes change the official output far beyond the tolerance
    shuffled = list(np.random.default_rng(0).permutation(vocab))
    wrong = official_forward(off, counts, shuffled, decode=False)
    assert max_abs(wrong["mu"], ref["mu"]) > 100 * ATOL
    # and the cells are not all alike (the tokens depend on the genes)
    assert float(ref["mu"].std(0).mean()) > 1e-2


def test_small_parity_gene_subset_shuffled_with_unknown(small, counts):
    config, off, prefix = small
    vocab = config["gene_list"]
    rng = np.random.default_rng(1)
    cols = rng.permutation(len(vocab))[:120]  # vocabulary rows, shuffled
    X_sub = counts[:, cols]
    unknown = [f"NOTAGENE{i}" for i in range(1, 6)]
    X_unknown = random_counts(N_CELLS, len(unknown), 0.5, seed=5)
    # insert the unknown genes at random positions among the known ones
    order = rng.permutation(len(cols) + len(unknown))
    genes_all = np.array([vocab[c] for c in cols] + unknown, dtype=object)[order]
    X_all = sp.hstack([X_sub, X_unknown], format="csr")[:, order]
    known = np.array([g in set(vocab) for g in genes_all])
    assert known.sum() == 120

    adata = one_tissue_adata(X_all, genes_all)
    model = cp.CellPLM.load_official(prefix, adata)
    vocab_pos = {g: i for i, g in enumerate(vocab)}
    vocab_cols = np.array([vocab_pos[g] for g in genes_all[known]])
    ref = check_parity(
        model,
        off,
        X_all,
        X_all[:, np.flatnonzero(known)],
        list(genes_all[known]),
        vocab_cols,
        f"{config['latent_mod']} subset",
    )
    if not is_gmvae(off):
        z = model.get_latent_representation()
        assert max_abs(z, ref["mu"]) <= ATOL


def test_a_splitter_of_the_models_adata_carries_its_gene_layout(small_vae, counts):
    """``train(datamodule=TissueDataSplitter(model.adata_manager))`` reads the AnnData's columns
    as ``train()`` does: the splitter gets the model's gene layout."""
    config, _, prefix = small_vae
    vocab = config["gene_list"]
    cols = np.random.default_rng(2).permutation(len(vocab))[:50]
    adata = one_tissue_adata(counts[:, cols], [vocab[c] for c in cols])
    model = cp.CellPLM.load_official(prefix, adata)
    splitter = cp.data.TissueDataSplitter(model.adata_manager, train_size=1.0)
    quiet = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
    model.train(datamodule=splitter, max_epochs=1, **quiet)
    batch = next(iter(splitter.train_dataloader()))
    np.testing.assert_array_equal(batch["gene_index"].numpy(), cols)


def test_symbols_and_gene_key(small_vae, counts):
    config, _, prefix = small_vae
    vocab = config["gene_list"]
    z_ens = cp.CellPLM.load_official(
        prefix, one_tissue_adata(counts, vocab)
    ).get_latent_representation()

    table = symbol_table()
    n_sym = table["symbol"].value_counts()
    sym = dict(zip(table["ensembl_id"], table["symbol"]))
    # every other gene as its (unique) HGNC symbol, the others stay Ensembl IDs
    mixed = [
        sym[g] if i % 2 == 0 and g in sym and sym[g] != g and n_sym[sym[g]] == 1 else g
        for i, g in enumerate(vocab)
    ]
    assert sum(m != g for m, g in zip(mixed, vocab)) > 100
    model_sym = cp.CellPLM.load_official(prefix, one_tissue_adata(counts, mixed))
    assert model_sym.module.n_vocab == len(vocab)
    z_sym = model_sym.get_latent_representation()
    np.testing.assert_allclose(z_sym, z_ens, rtol=0, atol=1e-6)

    # gene_key: the IDs live in a var column, var_names are meaningless
    adata = one_tissue_adata(counts, [f"feature{i}" for i in range(len(vocab))])
    adata.var["gene_ids"] = mixed
    z_key = cp.CellPLM.load_official(
        prefix, adata, gene_key="gene_ids"
    ).get_latent_representation()
    np.testing.assert_allclose(z_key, z_ens, rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match="gene_key"):
        cp.CellPLM.load_official(prefix, adata, gene_key="not_a_column")


@pytest.mark.slow
def test_real_85m_config_parity(tmp_path):
    """The real 85M architecture (GMVAE, 19,374 genes) with random weights."""
    pytest.importorskip("CellPLM")
    config = official_config()
    assert config["latent_mod"] == "gmvae"
    off = build_official(config, seed=0, emb_scale=1.0)
    n_official = sum(p.numel() for p in off.parameters())
    assert n_official == 82_402_543
    prefix = save_official(off, config, tmp_path, "20230926_85M")
    X = random_counts(64, len(config["gene_list"]), 0.02, seed=3)
    adata = one_tissue_adata(X, config["gene_list"])
    model = cp.CellPLM.load_official(prefix, adata)
    assert sum(p.numel() for p in model.module.parameters()) == n_official - 2 * 1024
    assert_same_weights(model, off)

    ref = official_forward(off, X, config["gene_list"], decode=False)
    ours = our_forward(model, X, ref["y"])
    d_h, d_mu = max_abs(ours["h"], ref["h"]), max_abs(ours["mu"], ref["mu"])
    print(
        f"[85M] |h|max={ref['h'].abs().max():.3g} dh={d_h:.2e} |mu|max="
        f"{ref['mu'].abs().max():.3g} dmu={d_mu:.2e} "
        f"dlogits={max_abs(ours['logits'], ref['logits']):.2e}"
    )
    # absolute tolerance, at O(1) magnitudes (h is layer-normalised)
    assert float(ref["h"].abs().max()) < 20 and float(ref["mu"].abs().max()) < 20
    assert d_h <= ATOL
    assert d_mu <= ATOL
    assert float(ref["mu"].std(0).mean()) > 1e-3  # the cells differ


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_requires_grad_and_strides(small_vae, counts, tmp_path):
    config, off, prefix = small_vae
    adata = one_tissue_adata(counts, config["gene_list"])
    z_ref = cp.CellPLM.load_official(prefix, adata).get_latent_representation()
    state = {
        k: nn.Parameter(v.t().contiguous().t()) if v.dim() == 2 else v.clone().requires_grad_()
        for k, v in off.state_dict().items()
    }
    assert any(not v.is_contiguous() for v in state.values())
    odd = save_official(off, config, tmp_path, "odd", state={"model_state_dict": state})
    model = cp.CellPLM.load_official(odd, adata)
    assert np.array_equal(model.get_latent_representation(), z_ref)
    assert_same_weights(model, off)
    assert all(p.requires_grad for n, p in model.module.named_parameters() if "pe_enc" not in n)


@pytest.mark.parametrize("trust_pickle", [False, True])
@pytest.mark.parametrize("damage", ["truncated", "random_bytes"])
def test_corrupt_checkpoint(small_vae, counts, tmp_path, damage, trust_pickle):
    config, _, prefix = small_vae
    data = Path(prefix + ".best.ckpt").read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = np.random.default_rng(0).bytes(len(data) // 4)
    bad = write_config(config, tmp_path, "bad")
    Path(bad + ".best.ckpt").write_bytes(data)
    adata = one_tissue_adata(counts, config["gene_list"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a trust_pickle warning is fine here
        with pytest.raises(ValueError, match="corrupt or truncated"):
            cp.CellPLM.load_official(bad, adata, trust_pickle=trust_pickle)


@pytest.mark.parametrize("problem", ["unexpected", "missing", "shape"])
def test_checkpoint_key_mismatch(small_vae, counts, tmp_path, problem):
    config, off, _ = small_vae
    state = dict(off.state_dict())
    key = "encoder.layers.1.norm2.weight"
    if problem == "unexpected":
        key = "encoder.layers.2.norm1.weight"
        state[key] = torch.ones(64)
    elif problem == "missing":
        del state[key]
    else:
        state[key] = torch.ones(65)
    prefix = save_official(off, config, tmp_path, problem, state={"model_state_dict": state})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cp.CellPLM.load_official(prefix, one_tissue_adata(counts, config["gene_list"]))


def test_checkpoint_without_model_state_dict(small_vae, counts, tmp_path):
    config, off, _ = small_vae
    prefix = save_official(off, config, tmp_path, "nokey", state={"state_dict": off.state_dict()})
    with pytest.raises(ValueError, match="model_state_dict"):
        cp.CellPLM.load_official(prefix, one_tissue_adata(counts, config["gene_list"]))
    prefix = save_official(off, config, tmp_path, "bare", state=off.state_dict())
    with pytest.raises(ValueError, match="model_state_dict"):
        cp.CellPLM.load_official(prefix, one_tissue_adata(counts, config["gene_list"]))


def test_checkpoint_with_pickled_object(small_vae, counts, tmp_path):
    config, off, prefix = small_vae
    adata = one_tissue_adata(counts, config["gene_list"])
    z_ref = cp.CellPLM.load_official(prefix, adata).get_latent_representation()
    state = {"model_state_dict": off.state_dict(), "meta": _Meta()}
    pickled = save_official(off, config, tmp_path, "pickled", state=state)
    with pytest.raises(ValueError, match="trust_pickle"):
        cp.CellPLM.load_official(pickled, adata)
    with pytest.warns(UserWarning, match="trust_pickle"):
        model = cp.CellPLM.load_official(pickled, adata, trust_pickle=True)
    assert np.array_equal(model.get_latent_representation(), z_ref)


@pytest.mark.parametrize(
    ("key", "value"),
    [("enc_mod", "performer"), ("latent_mod", "split"), ("dsbn", True), ("head_type", "embedder")],
)
def test_unsupported_config(small_vae, counts, tmp_path, key, value):
    config, off, _ = small_vae
    prefix = save_official(off, {**config, key: value}, tmp_path, "unsupported")
    with pytest.raises(ValueError, match=key):
        cp.CellPLM.load_official(prefix, one_tissue_adata(counts, config["gene_list"]))


def test_missing_files(small_vae, counts, tmp_path):
    config, _, prefix = small_vae
    adata = one_tissue_adata(counts, config["gene_list"])
    with pytest.raises(FileNotFoundError):
        cp.CellPLM.load_official(str(tmp_path / "nothing_here"), adata)
    only_config = write_config(config, tmp_path, "only_config")  # no .best.ckpt
    with pytest.raises(FileNotFoundError):
        cp.CellPLM.load_official(only_config, adata)
    (tmp_path / "only_ckpt.best.ckpt").write_bytes(Path(prefix + ".best.ckpt").read_bytes())
    with pytest.raises(FileNotFoundError):
        cp.CellPLM.load_official(str(tmp_path / "only_ckpt"), adata)


def test_no_gene_matches(small_vae, counts):
    config, _, prefix = small_vae
    adata = one_tissue_adata(counts, [f"NOTAGENE{i}" for i in range(N_SMALL_VOCAB)])
    with pytest.raises(ValueError, match="matched"):
        cp.CellPLM.load_official(prefix, adata)


@pytest.mark.parametrize("latent_mod", ["vae", "gmvae"])
def test_save_load_round_trip(latent_mod, counts, tmp_path):
    pytest.importorskip("CellPLM")
    config, off, prefix = official_files(latent_mod, 4, tmp_path / "ckpt")
    cols = np.arange(N_SMALL_VOCAB)[::-1][:200]  # a subset in reversed order, plus an unknown
    genes = [config["gene_list"][c] for c in cols] + ["NOTAGENE1"]
    X = sp.hstack([counts[:, cols], counts[:, :1]], format="csr")
    adata = one_tissue_adata(X, genes)
    model = cp.CellPLM.load_official(prefix, adata)
    z = model.get_latent_representation()
    model.save(str(tmp_path / "saved"), overwrite=True)
    loaded = cp.CellPLM.load(str(tmp_path / "saved"), adata=adata)
    assert loaded.module.n_vocab == len(config["gene_list"])
    assert loaded.module.decoder.out_layer.dec_disp.shape == (len(config["gene_list"]),)
    assert np.array_equal(loaded.get_latent_representation(), z)
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, loaded.module.state_dict()[key]), key


def test_fine_tuning_an_official_model_records_its_history(small_vae, counts):
    """``load_official`` gives a trained model with an empty history; fine-tuning fills it
    (scvi-tools alone would extend only keys that already exist, i.e. none) and a second
    ``train`` call appends to it."""
    config, _, prefix = small_vae
    adata = one_tissue_adata(counts, config["gene_list"])
    model = cp.CellPLM.load_official(prefix, adata)
    assert model.is_trained_ and model.history == {}
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "train_size": 1.0}
    model.train(max_epochs=2, **quiet)
    assert model.is_trained_
    loss = model.history["train_loss"].to_numpy(dtype=float).ravel()
    assert len(loss) == 2 and np.isfinite(loss).all()
    model.train(max_epochs=1, **quiet)
    assert len(model.history["train_loss"]) == 3


def test_fine_tuning_freezes_what_the_forward_never_differentiates(small_vae, counts):
    """The pretraining covariate tables (used through their detached mean) and the
    missing-coordinate vector get no gradient; training freezes them (plain DDP refuses unused
    parameters) and leaves them unchanged, while every other parameter learns."""
    config, _, prefix = small_vae
    model = cp.CellPLM.load_official(prefix, one_tissue_adata(counts, config["gene_list"]))
    unused = set(model.module.unused_parameter_names())
    assert "embedder.pe_enc.missing_pe" in unused
    assert any(name.startswith("decoder.covariate_layers.") for name in unused)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "train_size": 1.0}
    model.train(max_epochs=1, **quiet)
    for name, param in model.module.named_parameters():
        if name in unused:
            assert not param.requires_grad and torch.equal(param.detach(), before[name]), name
    changed = {k for k, v in model.module.state_dict().items() if not torch.equal(v, before[k])}
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert trainable and trainable <= changed, sorted(trainable - changed)
