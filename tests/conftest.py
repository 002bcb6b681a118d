"""Shared pytest set-up: the device of the ``gpu``-marked tests, and the data and models that
several test files read, each built once per test run (``scope="session"``; tests take copies
of the data and never train these models further):

- ``slides`` (simulated slides, counts in a layer) and its models ``fitted`` (computed tissues,
  2 epochs with validation) and ``fov_model`` (fields of view as tissues, 1 epoch);
- ``fov_slides`` (simulated slides, counts in ``X``, batches, cell types, fields of view) and
  its GMVAE model ``gmvae_model``;
- ``pbmc`` (700 real PBMCs) and ``labelled`` (30% of the labels hidden, trained 12 epochs).

Tests marked ``gpu`` (``tests/test_gpu.py``) run their model on the torch device named by the
environment variable ``CELLPLM_TEST_DEVICE`` (``cuda``, ``cuda:1``, or ``cpu`` for a dry run on
a machine without a GPU) and are skipped when it is unset, so the normal suite never needs a
GPU.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest

DEVICE_VARIABLE = "CELLPLM_TEST_DEVICE"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2`` in ``pyproject.toml``) each worker computes with one thread
    (two workers share a 2-core CI machine); its subprocesses (scripts, notebooks) inherit it.
    numba's OpenMP threads (scanpy's ``seurat_v3`` genes) start here, at one thread, before
    torch's are set: started later, they would reset torch's to one per core."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # numba reads NUMBA_NUM_THREADS again at each compilation and refuses a value other than
        # the one it was imported with: set it only if no plugin imported numba yet
        libraries = ("OMP", "MKL", "OPENBLAS") + (() if "numba" in sys.modules else ("NUMBA",))
        for library in libraries:
            os.environ[f"{library}_NUM_THREADS"] = "1"
        try:
            import numba
        except ImportError:
            pass
        else:
            numba.set_num_threads(1)
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # files with more slow tests first (otherwise in their order): the parallel workers, which
    # take whole files in this order (--dist loadfile --no-loadscope-reorder), then finish
    # together instead of one waiting on the other
    n_slow = Counter(item.path for item in items if item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -n_slow[item.path])
    if os.environ.get(DEVICE_VARIABLE):
        return
    skip = pytest.mark.skip(
        reason=f"device test: set {DEVICE_VARIABLE}=cuda (or cpu for a dry run) to run it"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def test_device():
    """The ``torch.device`` of ``CELLPLM_TEST_DEVICE``; fails if it names a missing GPU."""
    import torch

    name = os.environ.get(DEVICE_VARIABLE, "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_VARIABLE}={name!r}, but torch {torch.__version__} sees no GPU.")
    if device.type not in ("cuda", "cpu"):
        pytest.fail(f"{DEVICE_VARIABLE}={name!r}: use 'cuda', 'cuda:<index>' or 'cpu'.")
    return device


@pytest.fixture
def gumbel_argmax(monkeypatch):
    """The official hard Gumbel-softmax with zero noise: ``y = one_hot(argmax logits)`` (needs
    the official ``CellPLM`` package; skips without it)."""
    import torch

    autoencoders = pytest.importorskip("CellPLM.latent.autoencoders")
    monkeypatch.setattr(
        autoencoders.GumbelSoftmax,
        "sample_gumbel",
        lambda self, logits, eps=1e-20: torch.zeros_like(logits),
    )


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """Four small .h5ad files (``tests/_helpers.py:write_corpus_files``), new for each module
    (a module's tests may leave a tissue cache next to them)."""
    from tests._helpers import write_corpus_files

    return write_corpus_files(tmp_path_factory.mktemp("corpus"))


# ------------------------------------------------------------------ shared data and models


@pytest.fixture(scope="session")
def slides():
    """Read-only source; tests take copies."""
    from tests._helpers import N_SLIDES_CELLS, simulated_slides

    return simulated_slides(N_SLIDES_CELLS)


@pytest.fixture(scope="session")
def fitted(slides, tmp_path_factory):
    """Spatial AnnData written to .h5ad, read back, set up with computed tissues, 2 epochs."""
    import anndata as ad
    import scvi

    from cellplm_scvi import CellPLM
    from tests._helpers import ARCH, FIT, VALIDATE_EVERY_EPOCH

    path = tmp_path_factory.mktemp("h5ad") / "slides.h5ad"
    slides.write_h5ad(path)
    adata = ad.read_h5ad(path)
    CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", library_key="slide", max_cells=200
    )
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=2, train_size=0.8, **FIT, **VALIDATE_EVERY_EPOCH)
    return model, adata


@pytest.fixture(scope="session")
def fov_model(slides):
    """Tissues given explicitly (``tissue_key="fov"``), coordinates registered, 1 epoch."""
    import scvi

    from cellplm_scvi import CellPLM
    from tests._helpers import ARCH, FIT

    adata = slides.copy()
    CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial", tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    model.train(max_epochs=1, **FIT)
    return model, adata


@pytest.fixture(scope="session")
def fov_slides():
    """Read-only source; tests take copies."""
    from tests._helpers import simulated_fovs

    return simulated_fovs()


@pytest.fixture(scope="session")
def gmvae_model(fov_slides):
    """Batch, labels, coordinates and fields of view registered; 2 epochs with validation."""
    import scvi

    from cellplm_scvi import CellPLM
    from tests._helpers import ARCH, FIT, FOV_SETUP, FOV_VAL

    adata = fov_slides.copy()
    CellPLM.setup_anndata(adata, **FOV_SETUP)
    scvi.settings.seed = 0
    # the GMVAE: its latent (free-bits) loss is > 0 in train mode, which the resume test reads
    model = CellPLM(adata, latent="gmvae", **ARCH)
    model.train(max_epochs=2, **FOV_VAL, **FIT)
    return model, adata


@pytest.fixture(scope="session")
def pbmc():
    """The 700 real PBMCs of :func:`cellplm_scvi.datasets.pbmc68k_counts` (read-only)."""
    import cellplm_scvi as cp

    return cp.datasets.pbmc68k_counts()


@pytest.fixture(scope="session")
def labelled(pbmc):
    """PBMCs with 30% of labels hidden, four fixed tissues, a tiny model trained 12 epochs."""
    import numpy as np
    import scvi

    import cellplm_scvi as cp
    from tests._helpers import ARCH, FIT, UNKNOWN

    scvi.settings.seed = 0
    adata = pbmc.copy()
    rng = np.random.default_rng(0)
    hidden = rng.random(adata.n_obs) < 0.3
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[hidden, "label"] = UNKNOWN
    adata.obs["fov"] = rng.permutation(np.arange(adata.n_obs) % 4).astype(str)
    cp.CellPLM.setup_anndata(adata, layer="counts", labels_key="label", tissue_key="fov")
    untrained = cp.CellPLM(adata, **ARCH).predict()
    model = cp.CellPLM(adata, **ARCH)
    model.train(max_epochs=12, train_size=1.0, **FIT)  # the preset's lr (2e-3)
    return adata, model, hidden, untrained
