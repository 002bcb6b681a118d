"""Shared helpers of the performance benchmarks: process memory, machine info, random counts."""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform

import numpy as np
import scipy.sparse as sp


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


# ------------------------------------------------------------------------------ machine
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


# ------------------------------------------------------------------------------ start-up
def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--seed``, taken by every performance script."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)


def start(args: argparse.Namespace) -> None:
    """Apply ``--threads``, print the machine line and keep scvi-tools / cellplm_scvi at WARNING.

    ``cellplm_scvi`` (and with it scvi-tools, which sets its logger level when imported) is
    imported here, before the levels are set, so that they stick.
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info())
    import cellplm_scvi  # noqa: F401

    for name in ("cellplm_scvi", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


def to_torch_coo(x: sp.csr_matrix):
    """Coalesced torch COO tensor of a scipy matrix: the official model's input format."""
    import torch

    coo = x.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data), coo.shape).coalesce()


def load_line(when: str = "at end") -> str:
    """``load average <when> 1-min 5-min 15-min``."""
    return f"load average {when} {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
