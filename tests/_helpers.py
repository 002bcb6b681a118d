"""Shared test settings and helpers.

- ``ARCH`` (a tiny network) and ``FIT`` (quiet CPU training) for the model tests;
- ``simulated_slides``: two small simulated slides with fields of view (counts in a layer);
  ``simulated_fovs``: the same with counts in a CSR ``X``, cell types and four samples, and the
  setup (``FOV_SETUP``) and validation split (``FOV_VAL``) of the shared model on it;
- ``history``, ``renamed_genes``: small helpers of the model tests;
- the four small ``.h5ad`` files of the corpus tests (``write_corpus_files``, ``corpus``);
- bridges to the official CellPLM package: random official models in the official file format
  (``small_config``, ``build_official``, ``save_official``), its forward pass on one tissue
  (``official_forward``, ``official_model_forward``) and the comparisons (``max_abs``,
  ``max_rel``, ``assert_same_weights``). The official package is imported inside the functions
  that need it, so a test file that imports this module is not skipped without it: each test
  (or fixture) that needs it calls ``pytest.importorskip("CellPLM")`` (``build_official`` and
  ``read_official`` skip by themselves);
- ``start_script``/``finish_script``: run a Python script or module as a program in a process
  forked from a server that has imported ``cellplm_scvi`` once (the scripts of the resume, DDP,
  memory and benchmark tests, the documentation build).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import cellplm_scvi as cp
from cellplm_scvi._genes import official_config, symbol_table
from cellplm_scvi.data import TissueCorpus

ARCH = {"n_hidden": 32, "n_layers": 1, "n_heads": 4, "n_latent": 8}  # a tiny network
FIT = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}

ATOL = 1e-5  # official vs ours: absolute, embeddings and hidden states of magnitude ~1
RTOL = 1e-5  # official vs ours: relative, NB means and dispersions
N_SMALL_VOCAB = 300  # genes of ``small_config``
UNKNOWN = "Unknown"  # the unlabelled category of the annotation tests

N_SLIDES_CELLS = 800  # cells of the ``slides`` fixture (``simulated_slides``)
VALIDATE_EVERY_EPOCH = {"check_val_every_n_epoch": 1}  # validation loss every epoch
N_FOVS_CELLS = 400  # cells of the ``fov_slides`` fixture (``simulated_fovs``)
FOV_VAL = {"train_size": 0.75, "check_val_every_n_epoch": 1}  # 2 of 8 fields of view validate
# counts in X (so that a backed AnnData really reads them from disk), fields of view as tissues
FOV_SETUP = {
    "batch_key": "slide",
    "labels_key": "cell_type",
    "spatial_key": "spatial",
    "tissue_key": "fov",
}


# ------------------------------------------------------------------------------ simulated data


def simulated_slides(n_cells: int, seed: int = 0) -> ad.AnnData:
    """Two simulated slides (:func:`cellplm_scvi.datasets.simulate_tissue`, 765 genes, counts in
    ``layers["counts"]``) with ``obs["fov"]``: a 2 x 2 grid of fields of view per slide."""
    adata = cp.datasets.simulate_tissue(n_cells=n_cells, n_slides=2, seed=seed)
    cell = (adata.obsm["spatial"] // 500).astype(int)
    adata.obs["fov"] = pd.Categorical(
        adata.obs["slide"].astype(str) + "_" + cell[:, 0].astype(str) + cell[:, 1].astype(str)
    )
    return adata


def simulated_fovs(n_cells: int = N_FOVS_CELLS, seed: int = 0) -> ad.AnnData:
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


def renamed_genes(adata: ad.AnnData) -> ad.AnnData:
    """``adata``'s counts, cells and coordinates under other gene names (never set up)."""
    return ad.AnnData(
        X=adata.X.copy(),
        obs=adata.obs.copy(),
        obsm={k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        var=pd.DataFrame(index=[f"gene{i}" for i in range(adata.n_vars)]),
    )


def history_values(model: cp.CellPLM, key: str) -> np.ndarray:
    """``model.history[key]`` as a flat float array."""
    return model.history[key].to_numpy(dtype=float).ravel()


# ------------------------------------------------------------------------------ comparisons


def _numpy(a) -> np.ndarray:
    return a.detach().numpy() if torch.is_tensor(a) else np.asarray(a)


def max_abs(a, b) -> float:
    """Largest absolute difference of two arrays or tensors."""
    return float(np.abs(_numpy(a) - _numpy(b)).max())


def max_rel(a, b) -> float:
    """Largest difference relative to ``b`` (in float64)."""
    a, b = _numpy(a).astype(np.float64), _numpy(b).astype(np.float64)
    return float((np.abs(a - b) / np.abs(b)).max())


def to_coo(X: sp.spmatrix) -> torch.Tensor:
    """A float32 torch COO tensor (the official package's input)."""
    coo = X.tocoo()
    index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(index, values, coo.shape).coalesce()


def to_csr(X: sp.spmatrix) -> torch.Tensor:
    """A float32 torch CSR tensor (our module's input)."""
    X = sp.csr_matrix(X)
    return torch.sparse_csr_tensor(
        torch.from_numpy(X.indptr.astype(np.int64)),
        torch.from_numpy(X.indices.astype(np.int64)),
        torch.from_numpy(X.data.astype(np.float32)),
        X.shape,
    )


def random_counts(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    """Sparse float32 counts >= 1 (Poisson(3) + 1) at ``density``."""
    rng = np.random.default_rng(seed)
    return sp.random(
        n_cells,
        n_genes,
        density=density,
        format="csr",
        dtype=np.float32,
        random_state=rng,
        data_rvs=lambda k: rng.poisson(3.0, k).astype(np.float32) + 1,
    )


# ------------------------------------------------------------------------------ official models


def small_config(latent_mod: str) -> dict:
    """An official config of a small model on the first 300 vocabulary genes."""
    vocab = official_config()["gene_list"][:N_SMALL_VOCAB]
    return {
        "gene_list": vocab,
        "enc_mod": "flowformer",
        "enc_hid": 64,
        "enc_layers": 2,
        "post_latent_dim": 16,
        "dec_mod": "nbmlp",
        "dec_hid": 64,
        "dec_layers": 2,
        "out_dim": len(vocab),
        "batch_num": 7,
        "dataset_num": 3,
        "model_dropout": 0.2,
        "norm": "groupnorm",
        "latent_mod": latent_mod,
        "cat_pe": False,
        "mask_node_rate": 0.75,
        "mask_feature_rate": 0.25,
        "num_clusters": 4,
        "lamda": 5.0,
        "w_li": 5.0,
        "w_en": 5.0,
        "dae": True,
    }


def build_official(config: dict, seed: int = 0, emb_scale: float = 20.0) -> nn.Module:
    """Official model (needs the ``CellPLM`` package) with random weights, in eval mode.

    Norm affine parameters, biases and PReLU slopes get noise (so a swapped or skipped one is
    visible) and the gene-embedding table is scaled up (so that the cell tokens depend on the
    genes rather than on the bias of the embedder's linear layer).
    """
    OmicsFormer = pytest.importorskip("CellPLM.model").OmicsFormer

    torch.manual_seed(seed)
    off = OmicsFormer(**config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in off.named_parameters():
            if p.dim() == 1 and "pe_enc" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        off.embedder.feat_enc.emb.mul_(emb_scale)
    return off.eval()


def write_config(config: dict, directory: Path, name: str) -> str:
    """Write ``<name>.config.json``; return the prefix ``directory/name``."""
    with open(directory / f"{name}.config.json", "w") as fh:
        json.dump(config, fh)
    return str(directory / name)


def save_official(off: nn.Module, config: dict, directory: Path, name: str, state=None) -> str:
    """Write ``<name>.config.json`` and ``<name>.best.ckpt`` exactly as the official release."""
    directory.mkdir(parents=True, exist_ok=True)
    write_config(config, directory, name)
    ckpt = {"model_state_dict": off.state_dict()} if state is None else state
    torch.save(ckpt, directory / f"{name}.best.ckpt")
    return str(directory / name)


def official_files(latent_mod: str, seed: int, directory: Path, name: str = "small"):
    """A small random official model (:func:`build_official` of :func:`small_config`) written
    as ``directory/name`` (:func:`save_official`): (config, official model, prefix)."""
    config = small_config(latent_mod)
    off = build_official(config, seed=seed)
    return config, off, save_official(off, config, directory, name)


def read_official(prefix: str) -> nn.Module:
    """The official package's model from files: ``OmicsFormer(**config)``, strict load of a
    weights-only checkpoint, evaluation mode."""
    OmicsFormer = pytest.importorskip("CellPLM.model").OmicsFormer

    config = json.loads(Path(f"{prefix}.config.json").read_text())
    off = OmicsFormer(**config)
    state = torch.load(f"{prefix}.best.ckpt", map_location="cpu", weights_only=True)
    off.load_state_dict(state["model_state_dict"], strict=True)
    return off.eval()


def one_tissue_adata(X: sp.csr_matrix, genes) -> ad.AnnData:
    """An AnnData of counts ``X`` (genes ``genes``), set up with every cell in one tissue (as
    one official forward call)."""
    adata = ad.AnnData(X=X.copy())
    adata.var_names = list(genes)
    adata.obs_names = [f"cell{i}" for i in range(X.shape[0])]
    adata.obs["tissue"] = "all"
    cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
    return adata


def is_gmvae(off: nn.Module) -> bool:
    """Whether an official model has a GMVAE latent layer."""
    return not hasattr(off.latent.layers[1], "hid_2mu")


@torch.no_grad()
def official_forward(off: nn.Module, X: sp.spmatrix, genes: list[str], decode: bool = True):
    """Stage-by-stage evaluation forward of the official model on one group of cells.

    For the GMVAE the cluster is ``y = one_hot(argmax logits)`` (the official code would draw a
    Gumbel sample here).
    """
    xd = {"x_seq": to_coo(X), "coord": -torch.ones(X.shape[0], 2)}
    h = off.embedder(xd, list(genes))
    xd["h"] = h
    xd["h"] = off.encoder(xd)["hidden"]
    h = off.pre_latent_norm(xd)
    out = {"h": h}
    layer = off.latent.layers[1]
    if is_gmvae(off):
        logits = layer.inference.inference_qyx[0].logits(h)
        y = nn.functional.one_hot(logits.argmax(-1), logits.shape[1]).float()
        mu, var, _ = layer.inference.qzxy(h, y)
        out.update(logits=logits, y=y, mu=mu, var=var)
    else:
        out["mu"] = layer.hid_2mu(h)
    if decode:
        dec = off.decoder({"h": out["mu"]})
        out["mean"], out["disp"] = dec["mean"], dec["disp"]
    return out


@torch.no_grad()
def official_model_forward(off, X: sp.spmatrix, genes, batch: np.ndarray | None = None) -> dict:
    """The official evaluation forward in one call (``OmicsFormer.forward``) on one tissue:
    embedding ``latent`` (N, L), NB ``mean`` (N, G) and ``disp`` (N, G)."""
    x_dict = {
        "x_seq": to_coo(X),
        "coord": -torch.ones(X.shape[0], 2),
        "gene_mask": torch.ones(X.shape[1], dtype=torch.bool),
    }
    if batch is not None:
        x_dict["batch"] = torch.as_tensor(batch, dtype=torch.long)
    out, _ = off(x_dict, list(genes))
    return out


def assert_same_weights(model: cp.CellPLM, off: nn.Module) -> None:
    """Our module holds exactly the official model's tensors: all but the two never-called
    ``embedder.norm0`` ones, plus at most the VAE's KL warm-up counter (official files lack
    training counters)."""
    ours, theirs = model.module.state_dict(), off.state_dict()
    assert set(theirs) - set(ours) == {"embedder.norm0.weight", "embedder.norm0.bias"}
    counters = set(ours) - set(theirs)
    assert counters <= {"latent.layers.1.kl_step_count"}
    for key in set(ours) - counters:
        assert torch.equal(ours[key], theirs[key]), key


# ------------------------------------------------------------------------------ corpus files

CORPUS_VOCAB = official_config()["gene_list"][:40]  # 40 real Ensembl IDs
# the TissueCorpus arguments of the four files of ``write_corpus_files``
CORPUS_KWARGS = {
    "gene_key": [None, "symbol", None, None],
    "batch_key": "sample",
    "spatial_key": [None, None, "spatial", None],
    "max_cells": 64,
    "validation_size": 0.2,
}


def poisson_counts(rng: np.random.Generator, n_cells: int, n_genes: int) -> np.ndarray:
    """Dense float32 Poisson(0.8) counts."""
    return rng.poisson(0.8, (n_cells, n_genes)).astype(np.float32)


def write_h5ad(path: Path, x, genes, obs=None, obsm=None, var=None) -> Path:
    """Write an AnnData of ``x`` with genes ``genes`` and cells ``<file stem>_c<i>``."""
    adata = ad.AnnData(X=x, obs=obs, obsm=obsm, var=var)
    adata.var_names = genes
    adata.obs_names = [f"{path.stem}_c{i}" for i in range(adata.n_obs)]
    adata.write_h5ad(path)
    return path


def write_corpus_files(root: Path) -> list[Path]:
    """Four small files: two samples; symbols via gene_key; spatial; dense X."""
    rng = np.random.default_rng(0)
    symbols = dict(zip(symbol_table()["ensembl_id"], symbol_table()["symbol"]))
    files = []
    # f0: Ensembl IDs, two samples, CSR
    obs = pd.DataFrame({"sample": np.repeat(["s1", "s2"], [180, 120])})
    x = sp.csr_matrix(poisson_counts(rng, 300, 25))
    files.append(write_h5ad(root / "f0.h5ad", x, CORPUS_VOCAB[:25], obs))
    # f1: symbols in var["symbol"], shuffled genes plus two unknown ones
    genes = list(rng.permutation(CORPUS_VOCAB[10:35])) + ["NOT_A_GENE1", "NOT_A_GENE2"]
    var = pd.DataFrame({"symbol": [symbols.get(g, g) for g in genes]})
    obs = pd.DataFrame({"sample": ["a"] * 200})
    x = sp.csr_matrix(poisson_counts(rng, 200, 27))
    files.append(write_h5ad(root / "f1.h5ad", x, [f"gene{i}" for i in range(27)], obs, var=var))
    # f2: spatial, versioned Ensembl IDs
    obs = pd.DataFrame({"sample": ["slide"] * 400})
    xy = rng.uniform(0, 100, (400, 2))
    x = sp.csr_matrix(poisson_counts(rng, 400, 20))
    genes = [f"{g}.7" for g in CORPUS_VOCAB[20:40]]
    files.append(write_h5ad(root / "f2.h5ad", x, genes, obs, obsm={"spatial": xy}))
    # f3: dense X, every other vocabulary gene
    obs = pd.DataFrame({"sample": ["b"] * 150})
    files.append(
        write_h5ad(root / "f3.h5ad", poisson_counts(rng, 150, 20), CORPUS_VOCAB[::2], obs)
    )
    return files


def corpus(files, **kwargs) -> TissueCorpus:
    """A TissueCorpus of the corpus files (``CORPUS_KWARGS``, overridden by ``kwargs``)."""
    return TissueCorpus(files, vocabulary=CORPUS_VOCAB, **{**CORPUS_KWARGS, **kwargs})


# ------------------------------------------------------------------------------ scripts

# imported once by the server the scripts are forked from (multiprocessing's forkserver): the
# import of scvi-tools, Lightning and torch costs about 10 s of CPU, more than most scripts' work
FORKSERVER_PRELOAD = ["cellplm_scvi", "tests._helpers"]


def _run_as_main(argv: list[str], log: str, env: dict, cwd: str | None) -> None:
    """Run ``python *argv`` (``[script, *args]`` or ``["-m", module, *args]``) in this (forked)
    process: environment variables ``env`` set (``None``: unset), in ``cwd``, stdout and stderr
    (file descriptors 1 and 2, so the output of C code and of subprocesses too) to ``log``."""
    import runpy
    import sys

    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if "OMP_NUM_THREADS" in env:  # torch, imported by the server, reads it only once
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if cwd is not None:
        os.chdir(cwd)
    with open(log, "w") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def start_script(
    argv: list, log: Path, env: dict | None = None, cwd: Path | None = None
) -> multiprocessing.Process:
    """Start ``python *argv`` (``[script, *args]`` or ``["-m", module, *args]``; its output to
    ``log``) in a process forked from a server that has imported ``cellplm_scvi``
    (``FORKSERVER_PRELOAD``). It is a new process, with the module state of a fresh interpreter;
    its own subprocesses (DDP ranks) start fresh interpreters. :func:`finish_script` waits for
    it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)  # the first server started keeps its own
    cwd = None if cwd is None else str(cwd)
    args = ([str(a) for a in argv], str(log), env or {}, cwd)
    process = context.Process(target=_run_as_main, args=args)
    process.start()
    return process


def finish_script(process: multiprocessing.Process, log: Path, timeout: float = 600):
    """Wait for a process of :func:`start_script`; return its exit code (``-9``: killed by
    SIGKILL) and output. Fails the test if it runs over ``timeout`` seconds."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"{log.name}: ran over {timeout} s:\n{log.read_text()[-3000:]}")
    return process.exitcode, log.read_text()
