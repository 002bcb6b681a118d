"""Helpers shared by the benchmark scripts (the one place for them).

- start-up: the options every script takes, threads, logging, the machine line;
- process memory (VmRSS / VmHWM of ``/proc/self/status``);
- data: random raw counts, AnnDatas of them, the 85M vocabulary, an official-format checkpoint
  with random weights;
- tables and scores: markdown tables, normalisation, PCA, per-gene imputation scores.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp

QUIET_TRAIN = {"enable_progress_bar": False, "enable_model_summary": False}


# ------------------------------------------------------------------------------ start-up
def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--seed``, taken by every script."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)


def parser(description: str, epochs: int) -> argparse.ArgumentParser:
    """Argument parser of the task scripts: ``--epochs``, ``--threads``, ``--seed``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs, help="CellPLM training epochs")
    add_common_options(p)  # --threads, --seed (of splits, models and baselines)
    return p


def set_threads(threads: int | None) -> None:
    """Compute with ``threads`` torch threads (``None``: torch's default). numba's OpenMP pool
    (scanpy's kernels) is started first at as many threads: started later, at one per core, it
    resets torch's count (the Wilcoxon test of the DE scripts did, before every fit)."""
    import torch

    if not threads:
        return
    try:
        import numba
    except ImportError:
        pass
    else:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)


def setup(args: argparse.Namespace) -> None:
    """Start-up of the task scripts: seed everything, set threads, silence training chatter,
    print the machine and the arguments."""
    import scvi

    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "cellplm_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.verbosity = logging.ERROR
    scvi.settings.seed = args.seed
    print_machine(args)


def print_machine(args: argparse.Namespace) -> None:
    import scvi
    import torch

    import cellplm_scvi

    print(f"# {machine_info()}")
    print(
        f"# OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"CUDA {'yes' if torch.cuda.is_available() else 'no'}, scvi-tools {scvi.__version__}, "
        f"cellplm_scvi {getattr(cellplm_scvi, '__version__', '?')}, "
        f"python {platform.python_version()}"
    )
    print(f"# args: {vars(args)}")


def start(args: argparse.Namespace) -> None:
    """Start-up of the speed and memory scripts: apply ``--threads``, print the machine line and
    keep scvi-tools / cellplm_scvi at WARNING.

    ``cellplm_scvi`` (and with it scvi-tools, which sets its logger level when imported) is
    imported here, before the levels are set, so that they stick.
    """
    set_threads(args.threads)
    print(machine_info())
    import cellplm_scvi  # noqa: F401

    for name in ("cellplm_scvi", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cpu_model(fallback: str = "unknown") -> str:
    """CPU model name from /proc/cpuinfo, else ``platform.processor()``, else ``fallback``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or fallback


def machine_info() -> str:
    import torch

    load = os.getloadavg()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"date {datetime.datetime.now().isoformat(timespec='seconds')} | CPU {cpu_model()} | "
        f"{os.cpu_count()} logical cores | RAM {mem:.0f} GB | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}"
    )


def load_line(when: str = "at end") -> str:
    """``load average <when> 1-min 5-min 15-min``."""
    return f"load average {when} {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


@contextmanager
def timer(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = time.perf_counter() - t0


# ------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    """Current resident set size (MB)."""
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    """Peak resident set size since start or the last :func:`reset_peak` (MB)."""
    return _status_kb("VmHWM") / 1024


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def trim_heap() -> None:
    """Collect garbage and return freed heap pages to the OS, so that the base RSS of the next
    measurement is live memory (otherwise a call can reuse pages freed by the previous one and
    look free)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------ data
def make_counts(
    n_cells: int, n_genes: int, density: float, seed: int | np.random.Generator
) -> sp.csr_matrix:
    """Random raw counts, float32 CSR: i.i.d. Bernoulli(density) positions, Poisson(2) + 1 values.

    Built in row blocks (a dense float32 uniform block of about 16 MB at a time). ``seed`` may
    be a Generator, to draw successive chunks of one stream.
    """
    rng = np.random.default_rng(seed)
    parts = []
    block = max(1, 4_000_000 // n_genes)
    for start in range(0, n_cells, block):
        b = min(block, n_cells - start)
        m = sp.csr_matrix(rng.random((b, n_genes), dtype=np.float32) < density, dtype=np.float32)
        m.data = (rng.poisson(2.0, m.nnz) + 1).astype(np.float32)
        parts.append(m)
    return sp.vstack(parts, format="csr")


def counts_adata(X: sp.csr_matrix, genes: list[str], tissues=None):
    """AnnData of the counts ``X`` with ``genes`` as var names and cells ``c0, c1, ...``;
    ``tissues`` (a label for all cells, or one per cell) goes to ``obs["tissue"]``."""
    import anndata as ad

    adata = ad.AnnData(X=X)
    adata.var_names = genes
    adata.obs_names = [f"c{i}" for i in range(X.shape[0])]
    if tissues is not None:
        adata.obs["tissue"] = tissues
    return adata


def to_torch_coo(x: sp.csr_matrix):
    """Coalesced torch COO tensor of a scipy matrix: the official model's input format."""
    import torch

    coo = x.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data), coo.shape).coalesce()


def official_85m_config() -> dict:
    """The vendored config of the official ``20230926_85M`` checkpoint."""
    from cellplm_scvi._genes import official_config

    return official_config()


def official_genes() -> list[str]:
    """The 19,374 Ensembl IDs of the official 85M vocabulary, in its order."""
    return list(official_85m_config()["gene_list"])


def write_official_checkpoint(
    directory: Path, seed: int = 0, latent: str = "gmvae", **model_overrides
):
    """The official ``OmicsFormer`` of the 85M config with random weights
    (``torch.manual_seed(seed)``), saved in the official file format as
    ``<directory>/20230926_85M.{config.json,best.ckpt}``.

    ``latent="vae"``: the plain VAE latent of ``20231027_85M`` instead of the config's GMVAE.
    ``model_overrides`` change the returned model's constructor arguments only (not the
    weights' shapes, not the written config), e.g. ``drop_node_rate=0.0``.

    Returns
    -------
    The file prefix (for ``CellPLM.load_official``) and the official model.
    """
    import torch
    from CellPLM.model import OmicsFormer

    config = official_85m_config()
    config["latent_mod"] = latent
    torch.manual_seed(seed)
    model = OmicsFormer(**{**config, **model_overrides})
    prefix = Path(directory) / "20230926_85M"
    Path(f"{prefix}.config.json").write_text(json.dumps(config))
    torch.save({"model_state_dict": model.state_dict()}, f"{prefix}.best.ckpt")
    return str(prefix), model


def write_corpus(
    folder: Path, n_files: int, n_cells: int, n_genes: int, density: float, seed: int
) -> list[Path]:
    """Write a corpus of ``n_files`` ``.h5ad`` files holding ``n_cells`` cells in all, each with
    its own random ``n_genes`` genes of the 85M vocabulary (a quarter of them shared by all
    files), random raw counts, two samples per file; file 0 is spatial (a jittered grid).
    ``X`` is written chunk by chunk, never held in RAM. Returns the paths."""
    import anndata as ad
    import pandas as pd

    vocab = np.asarray(official_genes())
    rng = np.random.default_rng(seed)
    shared = rng.choice(len(vocab), n_genes // 4, replace=False)
    rest = np.setdiff1d(np.arange(len(vocab)), shared)
    paths = []
    for k, n in enumerate(np.diff(np.linspace(0, n_cells, n_files + 1).astype(int))):
        genes = np.concatenate([shared, rng.choice(rest, n_genes - len(shared), replace=False)])
        obs = pd.DataFrame(
            {"sample": np.repeat(["s1", "s2"], [n // 2, n - n // 2])},
            index=[f"f{k}_{i}" for i in range(n)],
        )
        obsm = {}
        if k == 0:  # spatial: a jittered square grid
            side = int(np.ceil(np.sqrt(n)))
            grid = np.stack(np.divmod(np.arange(n), side), 1).astype(float)
            obsm["spatial"] = grid + rng.uniform(-0.3, 0.3, grid.shape)
        skeleton = ad.AnnData(obs=obs, var=pd.DataFrame(index=vocab[genes]), obsm=obsm)
        path = folder / f"part{k}.h5ad"
        skeleton.write_h5ad(path)
        import h5py

        with h5py.File(path, "a") as fh:
            chunk = 100_000
            for start in range(0, n, chunk):
                x = make_counts(min(chunk, n - start), n_genes, density, rng)
                if start == 0:
                    ad.io.write_elem(fh, "X", x)
                else:
                    ad.io.sparse_dataset(fh["X"]).append(x)
        paths.append(path)
    return paths


def tissue_corpus(paths, max_cells: int, seed: int, cache_dir):
    """The :class:`~cellplm_scvi.data.TissueCorpus` of a :func:`write_corpus` corpus."""
    from cellplm_scvi.data import TissueCorpus

    spatial = ["spatial" if Path(p).name == "part0.h5ad" else None for p in paths]
    return TissueCorpus(
        paths,
        batch_key="sample",
        spatial_key=spatial,
        max_cells=max_cells,
        validation_size=0.0,
        seed=seed,
        cache_dir=cache_dir,
    )


# ------------------------------------------------------------------------------ tables, scores
def print_table(title: str, rows: list[dict], columns: list[str], fmt: str = "{:.3f}") -> None:
    """Markdown table: one row per method."""
    print(f"\n## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float | np.floating):
                cells.append(fmt.format(v))
            else:
                cells.append(str(v))
        print("| " + " | ".join(cells) + " |")


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def log1p_cp10k(x) -> np.ndarray:
    """log1p of counts scaled to 1e4 per cell (cells with no counts stay zero)."""
    x = dense(x)
    total = x.sum(1, keepdims=True)
    return np.log1p(x / np.where(total > 0, total, 1.0) * 1e4)


def pca(x: np.ndarray, n_comps: int, seed: int, fit_rows=None) -> np.ndarray:
    """PCA of ``x`` (fitted on ``fit_rows`` when given, then applied to all rows)."""
    from sklearn.decomposition import PCA

    model = PCA(n_components=n_comps, random_state=seed)
    model.fit(x if fit_rows is None else x[fit_rows])
    return model.transform(x)


def per_gene_scores(pred_counts: np.ndarray, truth_counts: np.ndarray) -> dict:
    """CellPLM ``imputation_eval`` (dim=1): per-gene metrics on log1p, averaged over genes."""
    p = np.log1p(np.maximum(pred_counts, 0))
    t = np.log1p(truth_counts)
    pc, tc = p - p.mean(0), t - t.mean(0)
    denom = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    ok = denom > 0
    pearson = (pc * tc).sum(0)[ok] / denom[ok]
    norm = np.linalg.norm(p, axis=0) * np.linalg.norm(t, axis=0)
    cosine = (p * t).sum(0)[norm > 0] / norm[norm > 0]
    rmse = np.sqrt(((p - t) ** 2).mean(0))
    return {
        "Pearson": float(pearson.mean()),
        "cosine": float(cosine.mean()),
        "RMSE": float(rmse.mean()),
        "genes": int(ok.sum()),
    }
