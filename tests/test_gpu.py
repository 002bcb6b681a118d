"""The CUDA paths: embedding, reduced-precision inference, mixed-precision and DDP training and
the CSR embedder on the device named by ``CELLPLM_TEST_DEVICE`` (see ``tests/conftest.py``).

Skipped unless that variable is set. On a GPU machine ``benchmarks/gpu_suite.sh`` runs them
with ``CELLPLM_TEST_DEVICE=cuda``; ``CELLPLM_TEST_DEVICE=cpu`` runs the same code on a CPU (a
dry run: device and CPU results then agree trivially, but every step is exercised).

Data: random raw counts, 3 tissues x 200 cells, 1,400 genes of the official vocabulary in a
shuffled order plus 100 genes outside it (so the embedder's gene-index path with ``-1`` entries
is used); a random-weight checkpoint in the official layout (GMVAE, 64 hidden, 2 layers).

Also a script: ``python tests/test_gpu.py OUT.json DEVICE COORDINATES`` (``COORDINATES`` 0 or
1) trains with ``strategy="ddp"`` on one device and writes the loss curve, world size and
process-group backend (used by :func:`test_ddp_one_process_on_device`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

pytestmark = pytest.mark.gpu

N_TISSUES, N_CELLS = 3, 200
N_VOCAB_GENES, N_UNKNOWN_GENES = 1400, 100
ARCH = {"latent": "gmvae", "n_hidden": 64, "n_layers": 2, "n_latent": 16}
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


# ------------------------------------------------------------------------------ helpers
def random_counts(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    """Float32 CSR raw counts: Bernoulli(density) positions, Poisson(3) + 1 values."""
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=density, format="csr", dtype=np.float32, rng=rng)
    x.data = (rng.poisson(3.0, x.nnz) + 1).astype(np.float32)
    return x


def counts_adata(genes: list[str], n_tissues: int, n_cells: int, seed: int = 0) -> ad.AnnData:
    """Random counts with ``obs["tissue"]`` (``n_tissues`` tissues of ``n_cells`` cells)."""
    adata = ad.AnnData(random_counts(n_tissues * n_cells, len(genes), 0.1, seed))
    adata.var_names = genes
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    adata.obs["tissue"] = np.repeat([f"t{i}" for i in range(n_tissues)], n_cells)
    return adata


def trainer_device(device: torch.device) -> dict:
    """Lightning's ``accelerator`` / ``devices`` for a torch device."""
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": "cpu", "devices": 1}


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def param_device(model) -> torch.device:
    return next(model.module.parameters()).device


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from cellplm_scvi.datasets import random_official_checkpoint

    prefix = tmp_path_factory.mktemp("ckpt") / "random_gmvae"
    random_official_checkpoint(prefix, seed=0, **ARCH)
    return prefix


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    from cellplm_scvi import CellPLM
    from cellplm_scvi._genes import official_config

    vocabulary = list(official_config()["gene_list"])
    rng = np.random.default_rng(1)
    known = [vocabulary[i] for i in rng.choice(len(vocabulary), N_VOCAB_GENES, replace=False)]
    unknown = [f"NOT_A_GENE_{i}" for i in range(N_UNKNOWN_GENES)]
    genes = list(rng.permutation(known + unknown))
    adata = counts_adata(genes, N_TISSUES, N_CELLS)
    CellPLM.setup_anndata(adata, tissue_key="tissue", max_cells=None)
    return adata


def load(checkpoint: Path, adata: ad.AnnData):
    from cellplm_scvi import CellPLM

    model = CellPLM.load_official(checkpoint, adata)
    gene_index = model._layout_of(adata).gene_index  # the gene-index path of the embedder
    assert gene_index is not None and (gene_index < 0).sum() == N_UNKNOWN_GENES
    return model


# ------------------------------------------------------------------------------ inference
def test_embedding_on_device_matches_cpu_float32(checkpoint, adata, test_device):
    model = load(checkpoint, adata)
    mean_cpu, var_cpu = model.get_latent_representation(return_dist=True)
    model.to_device(test_device)
    assert param_device(model).type == test_device.type
    mean, var = model.get_latent_representation(return_dist=True)
    assert mean.dtype == np.float32 and mean.shape == (adata.n_obs, ARCH["n_latent"])
    assert relative_difference(mean, mean_cpu) < 1e-4
    assert relative_difference(var, var_cpu) < 1e-4
    np.testing.assert_allclose(mean, mean_cpu, rtol=1e-3, atol=1e-4)


def test_imputation_on_device_matches_cpu(checkpoint, adata, test_device):
    """The decoder's count-scale output (dense counts, gene columns moved to the device)."""
    model = load(checkpoint, adata)
    genes = list(model.matched_genes[:50])
    expr_cpu = model.impute_genes(genes).to_numpy()
    model.to_device(test_device)
    expr = model.impute_genes(genes).to_numpy()
    assert expr.shape == (adata.n_obs, 50) and np.isfinite(expr).all()
    assert relative_difference(expr, expr_cpu) < 1e-4


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_reduced_precision_inference_close_to_float32(checkpoint, adata, test_device, precision):
    model = load(checkpoint, adata)
    model.to_device(test_device)
    reference = model.get_latent_representation()
    low = model.get_latent_representation(precision=precision)
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert not np.array_equal(low, reference)  # autocast was on
    assert relative_difference(low, reference) < 5e-2
    np.testing.assert_array_equal(model.get_latent_representation(), reference)  # weights kept


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16],
    ids=["bf16", "fp16"],
)
def test_flow_attention_reduced_precision_on_a_large_tissue(test_device, dtype):
    """One tissue of 8,192 cells, 4 heads of 64 channels: the sums over cells are large (they
    overflowed float16 before the flow part ran in float32)."""
    from cellplm_scvi.nn import FlowAttention

    torch.manual_seed(0)
    attention = FlowAttention(256, 4).to(test_device).eval()
    x = torch.randn(8192, 256, device=test_device)
    with torch.inference_mode():
        reference = attention(x)
        with torch.autocast(test_device.type, dtype=dtype):
            low = attention(x)
    assert low.dtype == dtype  # the projections ran in reduced precision
    low = low.float()
    assert torch.isfinite(low).all()
    assert ((low - reference).norm() / reference.norm()).item() < 5e-2


def test_csr_embedder_on_device(test_device):
    """CSR counts (int32 and int64 indices) through the embedder on the device equal the dense
    product, in inference and in training (the gene-embedding gradient too)."""
    from cellplm_scvi.nn import CellEmbedder

    torch.manual_seed(0)
    n_vocab, n_genes = 500, 400
    embedder = CellEmbedder(n_vocab, 64, dropout=0.0)
    x = random_counts(300, n_genes, 0.1, seed=2)
    gene_index = torch.as_tensor(np.random.default_rng(3).integers(-1, n_vocab, n_genes))
    dense = torch.as_tensor(x.toarray())
    with torch.inference_mode():
        h_cpu = embedder.eval()(dense, gene_index)
    embedder.to(test_device)
    gene_index, dense = gene_index.to(test_device), dense.to(test_device)
    weights = torch.randn(300, 64, device=test_device)  # a loss with a non-trivial gradient
    for index_dtype in (np.int32, np.int64):
        csr = torch.sparse_csr_tensor(
            torch.from_numpy(x.indptr.astype(index_dtype)),
            torch.from_numpy(x.indices.astype(index_dtype)),
            torch.from_numpy(x.data),
            size=x.shape,
        ).to(test_device)
        assert csr.layout == torch.sparse_csr and csr.device.type == test_device.type
        with torch.inference_mode():
            h = embedder.eval()(csr, gene_index)
        assert h.device.type == test_device.type
        torch.testing.assert_close(h.cpu(), h_cpu, rtol=1e-4, atol=1e-5)

        grads = []
        for counts in (csr, dense):  # training: one embedding_bag call with its backward
            embedder.train().zero_grad()
            (embedder(counts, gene_index) * weights).sum().backward()
            grads.append(embedder.feat_enc.emb.grad.clone())
        scale = grads[1].abs().max()  # float32 sums over 300 cells: compare relative to it
        assert scale > 0
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5 * scale.item())


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_on_device(checkpoint, adata, test_device, precision):
    if precision == "16-mixed" and test_device.type != "cuda":
        pytest.skip("Lightning trains float16 (with a gradient scaler) on CUDA only")
    model = load(checkpoint, adata)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    dtypes = []  # output dtype of an encoder projection in each step
    projection = model.module.encoder.layers[0].self_attn.query_projection
    hook = projection.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    try:
        model.train(
            max_epochs=2,
            precision=precision,
            gradient_clip_val=1.0,
            train_size=1.0,
            **trainer_device(test_device),
            **QUIET,
        )
    finally:
        hook.remove()
    expected = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    assert dtypes and set(dtypes) == {expected}  # the precision reached the network
    loss = model.history["train_loss"].to_numpy(dtype=float).ravel()
    assert len(loss) == 2 and np.isfinite(loss).all()
    assert param_device(model).type == test_device.type
    assert all(p.dtype == torch.float32 for p in model.module.parameters())  # master weights
    after = model.module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k].cpu())]
    assert "embedder.feat_enc.emb" in changed  # the CSR gene-embedding path got gradients
    z = model.get_latent_representation()
    assert np.isfinite(z).all()


class UnusedParametersError(AssertionError):
    """DDP stopped because a parameter took no part in the loss."""


@pytest.mark.parametrize("coordinates", [True, False], ids=["spatial", "no_coordinates"])
def test_ddp_one_process_on_device(tmp_path, test_device, coordinates):
    """``strategy="ddp"`` at world size 1: NCCL on CUDA (gloo on CPU), the tissue sampler.

    Without coordinates the spatial encoding's ``missing_pe`` takes no part in the loss:
    Lightning's plain ``"ddp"`` (``find_unused_parameters=False``) stops unless it is frozen.
    """
    out = tmp_path / "ddp.json"
    root = str(Path(__file__).parents[1])  # cellplm_scvi need not be installed
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    command = [sys.executable, __file__, str(out), str(test_device), str(int(coordinates))]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
    )
    if "were not used in producing the loss" in proc.stderr:
        raise UnusedParametersError(proc.stderr[-1500:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 1
    assert result["backend"] == ("nccl" if test_device.type == "cuda" else "gloo")
    assert result["device"].startswith(test_device.type)
    assert len(result["train_loss"]) == 3 and np.isfinite(result["train_loss"]).all()


def _ddp_main(out: str, device_name: str, coordinates: bool) -> None:
    import scvi

    from cellplm_scvi import CellPLM

    scvi.settings.seed = 0
    adata = counts_adata([f"g{i}" for i in range(300)], n_tissues=4, n_cells=100)
    setup = {"tissue_key": "tissue", "max_cells": None}
    if coordinates:  # given tissues: no squidpy graph is built
        adata.obsm["spatial"] = np.random.default_rng(0).uniform(0, 1000, (adata.n_obs, 2))
        setup["spatial_key"] = "spatial"
    CellPLM.setup_anndata(adata, **setup)
    model = CellPLM(adata, n_hidden=32, n_layers=1, n_heads=4, n_latent=8)
    device = trainer_device(torch.device(device_name))
    model.train(max_epochs=3, strategy="ddp", train_size=1.0, **device, **QUIET)
    result = {
        "train_loss": model.history["train_loss"]["train_loss"].astype(float).tolist(),
        "world_size": model.trainer.world_size,
        "backend": model.trainer.strategy.process_group_backend,
        "device": str(param_device(model)),
    }
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _ddp_main(sys.argv[1], sys.argv[2], bool(int(sys.argv[3])))
