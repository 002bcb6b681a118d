"""Pretraining throughput with 1 and N processes, and time to first step.

Generates a corpus as ``bench_corpus.py`` does (``_common.write_corpus``: ``--n-files``
``.h5ad`` files, each with its own genes of the 85M vocabulary, file 0 spatial) and, each in a
fresh process:

1. **time to first step**: one process, from ``TissueCorpus(...)`` construction (files opened,
   checked, aligned, tissues computed or read from the cache) to the end of the first
   optimiser step of ``model.train(datamodule=dm)``; with a cold tissue cache (a new folder)
   and then warm;
2. **cells/s of pretraining**: ``--epochs`` epochs of ``train(datamodule=dm)``, with
   ``devices=1`` and with ``devices=N, strategy="ddp"`` (gloo on CPU). Cells/s = cells of all
   ranks' steps / wall time from the first step's start to the end of training (rank 0's
   clock; DDP start-up is reported apart, in "first step").

No assertions: figures only. On a machine with fewer free cores than processes, N processes
share the cores and cannot be faster than one; the script says so next to the figures.

Usage::

    python benchmarks/experiments/bench_ddp.py          # 4 files, 20,000 cells, 1 vs 2
    python benchmarks/experiments/bench_ddp.py --n-cells 100000 --devices 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import load_line, machine_info, tissue_corpus, write_corpus


def worker(args) -> None:
    """One training run (the DDP launcher re-runs this same command for the other ranks)."""
    import torch

    torch.set_num_threads(1)
    import scvi
    from lightning.pytorch.callbacks import Callback

    import cellplm_scvi as cp

    class Clock(Callback):
        def __init__(self):
            self.first_start = self.first_end = None
            self.cells = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.first_start is None:
                self.first_start = time.perf_counter()
            self.cells += int(batch["X"].shape[0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.first_end is None:
                self.first_end = time.perf_counter()

    scvi.settings.seed = args.seed
    t0 = time.perf_counter()
    dm = tissue_corpus(json.loads(args.files), args.max_cells, args.seed, args.cache_dir)
    built = time.perf_counter() - t0
    model = cp.CellPLM(
        adata=None,
        registry=dm.registry,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        n_latent=16,
    )
    clock = Clock()
    ddp = {"strategy": "ddp"} if args.devices > 1 else {}
    model.train(
        datamodule=dm,
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        enable_progress_bar=False,
        callbacks=[clock],
        **ddp,
    )
    end = time.perf_counter()
    cells = torch.tensor([clock.cells])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(cells)
    if model.trainer.global_rank == 0:
        record = {
            "devices": model.trainer.world_size,
            "cached": bool(dm.alignment_report["cached"].all()),
            "build_s": built,
            "first_step_s": clock.first_end - t0,
            "steps": model.trainer.global_step,
            "cells": int(cells),
            "cells_per_s": int(cells) / (end - clock.first_start),
        }
        Path(args.out).write_text(json.dumps(record))


def run(args, paths, cache_dir, devices: int, epochs: int, out: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--files",
        json.dumps([str(p) for p in paths]),
        "--cache-dir",
        str(cache_dir),
        "--out",
        str(out),
        "--devices",
        str(devices),
        "--epochs",
        str(epochs),
    ]
    for name in ("max_cells", "seed", "n_hidden", "n_layers"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"devices": devices, "error": proc.stderr.strip()[-400:]}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cells", type=int, default=20_000, help="cells in all files")
    parser.add_argument("--n-files", type=int, default=4)
    parser.add_argument("--n-genes", type=int, default=2_000, help="genes per file")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--max-cells", type=int, default=500, help="cells per tissue")
    parser.add_argument("--n-hidden", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--devices", type=int, default=2, help="processes of the DDP run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="folder for the files (default: temp)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(machine_info())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        paths = write_corpus(
            folder, args.n_files, args.n_cells, args.n_genes, args.density, args.seed
        )
        print(
            f"corpus: {args.n_files} files, {args.n_cells:,} cells, {args.n_genes} genes per file "
            f"(85M vocabulary, 19,374 genes), tissues of <= {args.max_cells} cells; model "
            f"n_hidden {args.n_hidden}, n_layers {args.n_layers}; 1 torch thread per process"
        )
        cache = folder / "cache"
        rows = [
            run(args, paths, cache, 1, 1, folder / "cold.json"),  # first run: cold cache
            run(args, paths, cache, 1, 1, folder / "warm.json"),
        ]
        print("\n| time to first step | tissue cache | build corpus (s) | first step done (s) |")
        print("|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| 1 process | - | error: {r['error']} | |")
                continue
            cache_state = "warm" if r["cached"] else "cold"
            print(f"| 1 process | {cache_state} | {r['build_s']:.2f} | {r['first_step_s']:.2f} |")
        runs = [
            run(args, paths, cache, d, args.epochs, folder / f"d{d}.json")
            for d in (1, args.devices)
        ]
        print("\n| processes | steps | cells | cells/s | first step done (s) |")
        print("|---|---|---|---|---|")
        for r in runs:
            if "error" in r:
                print(f"| {r['devices']} | error: {r['error']} | | | |")
                continue
            print(
                f"| {r['devices']} | {r['steps']} | {r['cells']:,} | {r['cells_per_s']:,.0f} | "
                f"{r['first_step_s']:.2f} |"
            )
    cores = len(os.sched_getaffinity(0))
    if cores < 2 * args.devices:
        print(
            f"\nnote: {cores} cores here, shared with other jobs: {args.devices} processes share "
            "them, so DDP cannot be faster than one process on this machine."
        )
    print(load_line())


if __name__ == "__main__":
    main()
