"""Several tissues per step (``train(pack_tissues=True)``): epoch time, 1 vs 16 tissues per step.

Data: simulated PBMC slides (:func:`cellplm_scvi.datasets.simulate_tissue`, 765 genes), cut into
tissues of exactly ``--tissue-size`` cells (consecutive cells of a random order). One run trains
with one tissue per step (``batch_size=tissue size``), the others with ``k`` tissues packed per
step (``batch_size=k * tissue size, pack_tissues=True``); node drop is off so that every packed
step holds exactly ``k`` tissues. Every run sees the same cells per epoch; only the number of
optimizer steps differs. The epoch time is the median over epochs 2.. (a Lightning callback).

A second table times one flow-attention forward + backward over ``k`` packed tissues, in the
padded (T, n_max) layout the package uses, against a Python loop over the tissues (one plain
call per tissue), the other way to keep attention within tissues.

Usage (the figures in benchmarks/README.md)::

    OMP_NUM_THREADS=1 python benchmarks/bench_packing.py --threads 1
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from _common import QUIET_TRAIN, parser, print_table, setup


class EpochTimer(Callback):
    """Wall time of each training epoch."""

    def __init__(self):
        self.times, self._t0 = [], None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._t0)


def _adata(n_cells: int, tissue_size: int, seed: int):
    import cellplm_scvi as cp

    adata = cp.datasets.simulate_tissue(n_cells=n_cells, n_slides=1, seed=seed)
    order = np.random.default_rng(seed).permutation(adata.n_obs)
    tissue = np.empty(adata.n_obs, dtype=int)
    tissue[order] = np.arange(adata.n_obs) // tissue_size
    adata.obs["tissue"] = pd.Categorical(tissue)
    cp.CellPLM.setup_anndata(adata, layer="counts", tissue_key="tissue")
    return adata


def _epoch_time(adata, per_step: int, args) -> dict:
    import scvi

    import cellplm_scvi as cp

    scvi.settings.seed = args.seed
    model = cp.CellPLM(
        adata,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        n_heads=8,
        n_latent=32,
        preset="official",
    )
    timer = EpochTimer()
    model.train(
        max_epochs=args.epochs,
        batch_size=per_step * args.tissue_size,
        pack_tissues=per_step > 1,
        drop_node_rate=0.0,
        train_size=1.0,
        accelerator="cpu",
        callbacks=[timer],
        **QUIET_TRAIN,
    )
    n_steps = int(np.ceil(adata.n_obs / args.tissue_size / per_step))
    epoch_s = statistics.median(timer.times[1:] or timer.times)
    return {
        "tissues per step": per_step,
        "cells per step": per_step * args.tissue_size,
        "steps per epoch": n_steps,
        "epoch (s)": epoch_s,
        "cells/s": adata.n_obs / epoch_s,
        "final train loss": float(model.history["train_loss"].iloc[-1, 0]),
    }


def _flow_times(per_step: int, args, repeats: int = 20) -> dict:
    from cellplm_scvi.nn import FlowAttention, TissueSegments

    torch.manual_seed(args.seed)
    heads, dh = 8, args.n_hidden // 8
    n = per_step * args.tissue_size
    index = torch.arange(n) // args.tissue_size
    tissues = TissueSegments.from_index(index)
    rows = tissues.rows()
    qkv = [torch.rand(heads, n, dh, requires_grad=True) for _ in range(2)]
    v = torch.randn(heads, n, dh, requires_grad=True)

    def padded():
        return tissues.unpad(FlowAttention._packed_flow(*qkv, v, tissues, 1e-6))

    def loop():
        q, k = qkv
        parts = [FlowAttention._flow(q[:, r], k[:, r], v[:, r], len(r), 1e-6) for r in rows]
        return torch.cat(parts, dim=1)

    out = {"tissues": per_step, "cells": n}
    for name, fn in (("padded (ms)", padded), ("loop over tissues (ms)", loop)):
        fn().sum().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn().sum().backward()
        out[name] = 1e3 * (time.perf_counter() - t0) / repeats
    torch.testing.assert_close(padded(), loop(), rtol=1e-5, atol=1e-5)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=4)
    p.add_argument("--cells", type=int, default=4096)
    p.add_argument("--tissue-size", type=int, default=64)
    p.add_argument("--per-step", default="1,16", help="tissues per step, comma-separated")
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    args = p.parse_args()
    setup(args)
    per_step = [int(k) for k in args.per_step.split(",")]
    adata = _adata(args.cells, args.tissue_size, args.seed)
    print(f"# {adata.n_obs} cells x {adata.n_vars} genes, tissues of {args.tissue_size} cells")
    rows = [_epoch_time(adata, k, args) for k in per_step]
    base = rows[0]["epoch (s)"]
    for row in rows:
        row["speed-up"] = base / row["epoch (s)"]
    print_table(
        f"Epoch time, n_hidden {args.n_hidden}, {args.n_layers} layers "
        f"(median of epochs 2..{args.epochs})",
        rows,
        list(rows[0]),
    )
    flows = [_flow_times(k, args) for k in per_step if k > 1]
    if flows:
        print_table("Flow attention forward + backward, per layer", flows, list(flows[0]))


if __name__ == "__main__":
    main()
