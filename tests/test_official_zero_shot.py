"""Zero-shot embedding with official checkpoints, and the overrides of ``load_official``.

The reference is the official package's own ``CellEmbeddingPipeline(...).predict(...)``, run
offline on the CPU on a random official checkpoint (built with the helpers of
``tests/test_official_load.py``). That pipeline embeds each ``obs["batch"]`` value in one forward
pass (the whole AnnData when there is none); our default for data without coordinates
(``setup_anndata(batch_key=...)``, no ``max_cells``) makes each sample one tissue, so the two
must agree to ``1e-5``:

- VAE checkpoint: as is;
- GMVAE checkpoint: the official evaluation draws a hard Gumbel-softmax cluster; its Gumbel
  noise is patched to zero, so that it takes ``argmax q(y|h)`` as we do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellplm_scvi as cp
from cellplm_scvi.nn._latent import GMVAELatent, VAELatent
from cellplm_scvi.official._files import DEAD_KEYS
from tests._helpers import (
    ATOL,
    build_official,
    official_files,
    official_forward,
    random_counts,
    save_official,
    to_csr,
)

N_CELLS = 3000
SAMPLE_SIZES = {"s1": 1700, "s2": 1300}  # both larger than the old 1000-cell chunks
N_UNKNOWN = 5


# ------------------------------------------------------------------------------------ helpers


def assert_checkpoint_weights_kept(model: cp.CellPLM, off: torch.nn.Module) -> None:
    """Every tensor of the official model (but the unused ``DEAD_KEYS``) is ours, and every
    parameter of ours comes from it."""
    ours, theirs = model.module.state_dict(), off.state_dict()
    for key, value in theirs.items():
        if key not in DEAD_KEYS:
            assert torch.equal(ours[key], value), key
    assert {name for name, _ in model.module.named_parameters()} <= set(theirs)


@pytest.fixture(scope="module", params=["vae", "gmvae"])
def checkpoint(request, tmp_path_factory):
    """(config, official model, checkpoint directory, prefix) of a random official model."""
    pytest.importorskip("CellPLM")
    seed = 10 if request.param == "vae" else 11
    directory = tmp_path_factory.mktemp(f"zero_shot_{request.param}")
    config, off, prefix = official_files(request.param, seed, directory)
    return config, off, directory, prefix


@pytest.fixture(scope="module")
def two_samples(checkpoint):
    """3,000 cells of two interleaved samples; 250 vocabulary genes (shuffled) and five genes
    outside the vocabulary at random positions."""
    config = checkpoint[0]
    vocab = config["gene_list"]
    rng = np.random.default_rng(0)
    genes = [vocab[i] for i in rng.permutation(len(vocab))[:250]]
    genes += [f"NOTAGENE{i}" for i in range(N_UNKNOWN)]
    genes = list(np.asarray(genes, dtype=object)[rng.permutation(len(genes))])
    sample = np.repeat(list(SAMPLE_SIZES), list(SAMPLE_SIZES.values()))
    obs = pd.DataFrame(
        {"sample": pd.Categorical(rng.permutation(sample))},
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(X=random_counts(N_CELLS, len(genes), 0.1, seed=1), obs=obs)
    adata.var_names = genes
    return adata


def official_embedding(directory, adata: ad.AnnData, batch_key: str | None) -> np.ndarray:
    """``CellEmbeddingPipeline(...).predict(...)`` of the official package, on the CPU."""
    from CellPLM.pipeline import cell_embedding as embedding_pipeline

    ref = ad.AnnData(X=adata.X.copy(), obs=pd.DataFrame(index=adata.obs_names))
    ref.var_names = adata.var_names
    if batch_key is not None:
        ref.obs["batch"] = adata.obs[batch_key].to_numpy()
    pipeline = embedding_pipeline.CellEmbeddingPipeline(
        pretrain_prefix="small", pretrain_directory=str(directory)
    )
    with torch.no_grad():
        z = pipeline.predict(ref, ensembl_auto_conversion=False, device="cpu")
    return z.numpy()


def clear_clusters(off, adata: ad.AnnData, batch_key: str) -> np.ndarray:
    """Cells whose two largest official GMVAE logits (whole-sample context) differ by more
    than 1e-4, so that an argmax cannot flip between implementations."""
    known = np.flatnonzero(~adata.var_names.str.startswith("NOTAGENE"))
    clear = np.zeros(adata.n_obs, dtype=bool)
    for value in adata.obs[batch_key].unique():
        rows = np.flatnonzero((adata.obs[batch_key] == value).to_numpy())
        X = adata.X[rows][:, known]
        logits = official_forward(off, X, list(adata.var_names[known]), decode=False)["logits"]
        top2 = torch.topk(logits, 2).values
        clear[rows] = (top2[:, 0] - top2[:, 1] > 1e-4).numpy()
    return clear


def report(label: str, z: np.ndarray, ref: np.ndarray) -> float:
    d = np.abs(z - ref)
    print(
        f"[{label}] max|z|={np.abs(ref).max():.3g} max abs diff={d.max():.2e} "
        f"max abs diff / max|z|={d.max() / np.abs(ref).max():.2e} "
        f"||diff||/||z||={np.linalg.norm(z - ref) / np.linalg.norm(ref):.2e}"
    )
    return float(d.max())


# ------------------------------------------------------------------------------------ parity


def test_whole_sample_embedding_matches_official_pipeline(checkpoint, two_samples, gumbel_argmax):
    config, off, directory, prefix = checkpoint
    adata = two_samples.copy()
    cp.CellPLM.setup_anndata(adata, batch_key="sample")  # no coordinates, default context
    assert adata.obs["cellplm_tissue"].value_counts().to_dict() == {"s1/0": 1700, "s2/0": 1300}
    model = cp.CellPLM.load_official(prefix, adata)
    z = model.get_latent_representation()
    ref = official_embedding(directory, adata, "sample")
    assert z.shape == ref.shape == (N_CELLS, config["post_latent_dim"])
    assert float(ref.std(0).mean()) > 1e-2  # the cells differ
    keep = np.ones(N_CELLS, dtype=bool)
    if config["latent_mod"] == "gmvae":
        keep = clear_clusters(off, two_samples, "sample")
        assert keep.mean() > 0.99
        assert len(np.unique(ref.round(4), axis=0)) > 1
    assert report(config["latent_mod"], z[keep], ref[keep]) <= ATOL

    # negative control: the old default (1,000-cell chunks) changes the context, and the
    # embedding moves far beyond the tolerance
    chunked = two_samples.copy()
    cp.CellPLM.setup_anndata(chunked, batch_key="sample", max_cells=1000)
    assert chunked.obs["cellplm_tissue"].nunique() == 4
    z_chunked = cp.CellPLM.load_official(prefix, chunked).get_latent_representation()
    assert np.abs(z_chunked - ref).max() > 100 * ATOL


def test_without_batch_the_whole_anndata_is_one_context(checkpoint, two_samples, gumbel_argmax):
    """No ``obs["batch"]``: the official pipeline embeds all cells together, so do we."""
    config, off, directory, prefix = checkpoint
    if config["latent_mod"] != "vae":
        pytest.skip("one latent suffices here")
    adata = two_samples.copy()
    cp.CellPLM.setup_anndata(adata)
    assert adata.obs["cellplm_tissue"].nunique() == 1
    z = cp.CellPLM.load_official(prefix, adata).get_latent_representation()
    with pytest.warns(UserWarning, match="Batch labels not found"):
        ref = official_embedding(directory, adata, None)
    assert report("vae, no batch", z, ref) <= ATOL


def test_large_sample_is_embedded_in_one_pass(checkpoint, two_samples):
    """The 1,700 cells of ``s1`` are one tissue: their embedding is one forward pass of our
    module over exactly those cells (not chunks of them)."""
    config, _, _, prefix = checkpoint
    adata = two_samples.copy()
    cp.CellPLM.setup_anndata(adata, batch_key="sample")
    model = cp.CellPLM.load_official(prefix, adata)
    z = model.get_latent_representation()
    rows = np.flatnonzero((adata.obs["sample"] == "s1").to_numpy())
    assert rows.size == 1700 > 1000
    genes = model._layout_of(adata).tensors().get("gene_index")  # as in the loader's minibatch

    def encode(cells: np.ndarray) -> np.ndarray:
        x = to_csr(adata.X[cells])
        return model.module.inference(x=x, coords=None, gene_index=genes)["qz_m"].numpy()

    with torch.no_grad():
        one_pass = encode(rows)
    assert np.abs(z[rows] - one_pass).max() <= 1e-6
    # the same cells cut in two give other embeddings
    with torch.no_grad():
        halves = [encode(part) for part in np.array_split(rows, 2)]
    assert np.abs(np.concatenate(halves) - one_pass).max() > 100 * ATOL
    # a cap on request still cuts the sample
    capped = two_samples.copy()
    cp.CellPLM.setup_anndata(capped, batch_key="sample", max_cells=1000)
    assert capped.obs["cellplm_tissue"].value_counts().max() <= 1000


# ------------------------------------------------------------------------------------ overrides


@pytest.fixture(scope="module")
def gmvae_checkpoint(tmp_path_factory):
    pytest.importorskip("CellPLM")
    return official_files("gmvae", 12, tmp_path_factory.mktemp("overrides"))


@pytest.fixture(scope="module")
def small_adata(gmvae_checkpoint):
    config = gmvae_checkpoint[0]
    adata = ad.AnnData(X=random_counts(200, len(config["gene_list"]), 0.2, seed=2))
    adata.var_names = config["gene_list"]
    adata.obs_names = [f"cell{i}" for i in range(200)]
    cp.CellPLM.setup_anndata(adata)
    return adata


def _dropout_rates(module: torch.nn.Module) -> set[float]:
    """Dropout rates of the network, without the attention output's (fixed at 0.01 as in the
    official Flowformer)."""
    modules = module.named_modules()
    rates = {m.p for n, m in modules if isinstance(m, torch.nn.Dropout) and "self_attn" not in n}
    attention = {m.p for n, m in module.named_modules() if n.endswith("self_attn.dropout")}
    assert attention == {0.01}
    return rates


def test_training_overrides_change_training_not_weights(gmvae_checkpoint, small_adata, tmp_path):
    config, off, prefix = gmvae_checkpoint
    plain = cp.CellPLM.load_official(prefix, small_adata)
    assert _dropout_rates(plain.module) == {config["model_dropout"]}
    assert (plain.module.mask_cell_rate, plain.module.mask_gene_rate) == (0.75, 0.25)
    model = cp.CellPLM.load_official(
        prefix, small_adata, dropout=0.5, mask_cell_rate=0.3, mask_gene_rate=0.6, dae=False
    )
    assert _dropout_rates(model.module) == {0.5}
    assert (model.module.mask_cell_rate, model.module.mask_gene_rate) == (0.3, 0.6)
    assert model.module.dae is False
    assert_checkpoint_weights_kept(model, off)  # overrides never touch the pretrained weights
    np.testing.assert_array_equal(
        model.get_latent_representation(), plain.get_latent_representation()
    )
    # training really uses the rates: int(0.3 * 200) masked cells, ~60% of their entries hidden
    X = to_csr(small_adata.X)
    model.module.train()
    torch.manual_seed(0)
    with torch.no_grad():
        mask = model.module.inference(x=X, coords=None)["mask"]
    model.module.eval()
    assert mask.cells.numel() == 60
    assert abs(mask.entries.float().mean().item() - 0.6) < 0.02
    # the overrides are part of the saved model
    model.save(str(tmp_path / "saved"), overwrite=True)
    loaded = cp.CellPLM.load(str(tmp_path / "saved"), adata=small_adata)
    assert (loaded.module.mask_cell_rate, loaded.module.mask_gene_rate) == (0.3, 0.6)
    assert _dropout_rates(loaded.module) == {0.5} and loaded.module.dae is False


def test_latent_replacement_is_a_fresh_layer(gmvae_checkpoint, small_adata, caplog):
    """``latent="vae"`` on a GMVAE checkpoint: as the official ``load_pretrain`` with
    ``overwrite_config={"latent_mod": "vae"}``, the encoder and decoder keep the checkpoint's
    weights and the latent layer is new."""
    from CellPLM.pipeline import load_pretrain

    config, off, prefix = gmvae_checkpoint
    with caplog.at_level(logging.INFO, logger="cellplm_scvi"):
        model = cp.CellPLM.load_official(prefix, small_adata, latent="vae")
    assert "freshly initialised" in caplog.text
    layer = model.module.latent.layers[1]
    assert isinstance(layer, VAELatent) and layer.lamda == 1.0
    ours = model.module.state_dict()
    checkpoint_state = off.state_dict()
    kept = [k for k in ours if not k.startswith("latent.")]
    assert kept and all(torch.equal(ours[k], checkpoint_state[k]) for k in kept)
    official_vae = load_pretrain("small", {"latent_mod": "vae"}, str(Path(prefix).parent))
    official_names = {n for n, _ in official_vae.named_parameters() if n.startswith("latent.")}
    ours_names = {n for n, _ in model.module.named_parameters() if n.startswith("latent.")}
    assert ours_names == official_names
    z = model.get_latent_representation()
    assert z.shape == (small_adata.n_obs, config["post_latent_dim"]) and np.isfinite(z).all()
    assert model.official_config_["latent_mod"] == "gmvae"  # the checkpoint's, for the record


def test_fresh_gmvae_on_a_vae_checkpoint(small_adata, tmp_path):
    config, off, prefix = official_files("vae", 13, tmp_path)
    model = cp.CellPLM.load_official(prefix, small_adata, latent="gmvae", n_clusters=5, w_en=2.0)
    layer = model.module.latent.layers[1]
    assert isinstance(layer, GMVAELatent) and layer.n_clusters == 5
    # the official model with latent_mod="gmvae" takes these loss weights from the config
    assert (layer.lamda, layer.w_li, layer.w_en) == (config["lamda"], config["w_li"], 2.0)
    # keeping the checkpoint's own latent is not a replacement
    same = cp.CellPLM.load_official(
        prefix, small_adata, latent="vae", lamda=3.0, kl_warmup_steps=0, max_kl_weight=0.5
    )
    assert_checkpoint_weights_kept(same, off)
    layer = same.module.latent.layers[1]
    assert (layer.lamda, layer.kl_warmup_steps, layer.max_kl_weight) == (3.0, 0, 0.5)
    assert float(layer.kl_weight()) == 0.5  # no warm-up: the final weight from the first step
    default = cp.CellPLM.load_official(prefix, small_adata).module.latent.layers[1]
    assert (default.kl_warmup_steps, float(default.kl_weight())) == (10_000, 0.0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_hiden": 64}, r"`n_hiden`.*Allowed overrides: dropout, mask_cell_rate"),
        ({"model_dropout": 0.5}, r"`model_dropout`.*use the name `dropout`"),
        ({"mask_node_rate": 0.5}, r"use the name `mask_cell_rate`"),
        ({"latent_mod": "vae"}, r"use the name `latent`"),
        ({"n_hidden": 128}, r"`n_hidden`.*checkpoint"),
        ({"n_latent": 8}, r"`n_latent`.*decoder"),
        ({"vocabulary": ["A"]}, r"`vocabulary`.*gene list"),
        ({"use_batch_covariate": True}, r"pretraining samples"),
        ({"drop_node_rate": 0.3}, r"pass `drop_node_rate` to `model.train\(\)`"),
        ({"max_batch_size": 100}, r"pass `max_cells_per_step` to `model.train\(\)`"),
    ],
)
def test_unknown_or_fixed_overrides_are_refused(gmvae_checkpoint, small_adata, overrides, match):
    prefix = gmvae_checkpoint[2]
    with pytest.raises(TypeError, match=match):
        cp.CellPLM.load_official(prefix, small_adata, **overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dropout": 1.0}, r"`dropout` must be a number in \[0, 1\)"),
        ({"dropout": "0.1"}, r"`dropout`"),
        ({"mask_cell_rate": 1.5}, r"`mask_cell_rate` must be a number in \[0, 1\]"),
        ({"mask_gene_rate": -0.1}, r"`mask_gene_rate`"),
        ({"dae": "yes"}, r"`dae` must be True or False"),
        ({"latent": "ae"}, r"'ae' latent is not implemented"),
        ({"latent": "split"}, r"`latent` must be one of \['gmvae', 'vae'\]"),
        ({"n_clusters": 5}, r"differs from the checkpoint's 4 clusters"),
        ({"latent": "vae", "n_clusters": 5}, r"`n_clusters` applies to the 'gmvae' latent only"),
        ({"latent": "vae", "w_li": 1.0}, r"\['w_li'\] do not apply to the 'vae' latent"),
        ({"kl_warmup_steps": 100}, r"\['kl_warmup_steps'\] do not apply to the 'gmvae'"),
        ({"latent": "vae", "kl_warmup_steps": -1}, r"`kl_warmup_steps` must be an integer"),
        ({"latent": "vae", "kl_warmup_steps": 1}, r"kl_warmup_steps must be 0"),
        ({"latent": "vae", "max_kl_weight": -2.0}, r"`max_kl_weight` must be a non-negative"),
        ({"lamda": -1}, r"`lamda` must be a non-negative number"),
        ({"classifier_dropout": 2}, r"`classifier_dropout`"),
    ],
)
def test_bad_override_values(gmvae_checkpoint, small_adata, overrides, match):
    prefix = gmvae_checkpoint[2]
    with pytest.raises(ValueError, match=match):
        cp.CellPLM.load_official(prefix, small_adata, **overrides)


def test_matching_n_clusters_and_latent_keep_the_checkpoint(gmvae_checkpoint, small_adata):
    config, off, prefix = gmvae_checkpoint
    model = cp.CellPLM.load_official(
        prefix, small_adata, latent="gmvae", n_clusters=config["num_clusters"], lamda=1.0
    )
    assert_checkpoint_weights_kept(model, off)
    assert model.module.latent.layers[1].lamda == 1.0


def test_overrides_are_checked_before_the_checkpoint_is_read(gmvae_checkpoint, small_adata):
    """A typo fails fast, before a large checkpoint file is loaded (here: a broken one)."""
    config = gmvae_checkpoint[0]
    directory = Path(gmvae_checkpoint[2]).parent
    broken = directory / "broken"
    save_official(build_official(config, seed=0), config, directory, "broken")
    (directory / "broken.best.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(TypeError, match="n_hiden"):
        cp.CellPLM.load_official(str(broken), small_adata, n_hiden=3)
    with pytest.raises(ValueError, match="corrupt"):
        cp.CellPLM.load_official(str(broken), small_adata)
