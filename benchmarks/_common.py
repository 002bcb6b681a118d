"""Shared helpers of the benchmark scripts: machine info, logging, tables and normalisation."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import warnings
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
from _system import add_common_options, machine_info

QUIET_TRAIN = {"enable_progress_bar": False, "enable_model_summary": False}


def parser(description: str, epochs: int) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs, help="CellPLM training epochs")
    add_common_options(p)  # --threads, --seed (of splits, models and baselines)
    return p


def setup(args: argparse.Namespace) -> None:
    """Seed everything, set threads, silence training chatter, print the machine."""
    import scvi
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
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


@contextmanager
def timer(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = time.perf_counter() - t0


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
