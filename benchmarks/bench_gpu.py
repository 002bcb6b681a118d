"""GPU benchmark: embedding and training throughput of the 85M CellPLM, and the fraction of the
card's bf16 matmul peak that the encoder reaches.

A random-weight checkpoint with the official ``20230926_85M`` layout (GMVAE, 1024 hidden, 4
Flowformer layers, 512 latent, 19,374 genes) is written with
:func:`cellplm_scvi.datasets.random_official_checkpoint` and loaded with
:meth:`CellPLM.load_official`; the data are ``--n-tissues`` tissues of ``--n-cells`` cells x
19,374 genes (``--density`` non-zero, raw counts). Three measurements:

1. ``get_latent_representation(precision=...)`` for each ``--precisions`` value: cells/s, peak
   accelerator memory, and the difference to the float32 embedding (max abs and relative
   Frobenius norm);
2. the Flowformer encoder alone on one (N, 1024) tissue under each precision: time per call,
   TFLOP/s (multiply-adds of the projections, feed-forward and flow products, x 2) and the
   fraction of the card's dense bf16 peak (table below, or ``--peak-tflops``);
3. ``model.train()`` through scvi-tools' Lightning trainer (``accelerator`` from ``--device``)
   for each ``--train-precisions`` value (Lightning's ``precision``): seconds per step (one
   tissue) and whether the loss stayed finite.

Nothing is asserted; the script prints figures. It also runs on a CPU as a smoke test::

    python benchmarks/bench_gpu.py                                  # CUDA, full size
    python benchmarks/bench_gpu.py --device cpu --small --n-cells 300 --n-tissues 2 \\
        --precisions 32 --train-precisions 32
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import counts_adata, machine_info, make_counts, official_genes

warnings.filterwarnings("ignore")

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "GH200": 989.4,
    "H100 PCIe": 756.5,
    "H100 NVL": 835.5,
    "H100": 989.4,  # SXM ("H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10": 125.0,
}


def bf16_peak(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "peak memory n/a"
    return f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:5.2f} GiB"


def encoder_flops(n_cells: int, n_hidden: int, n_layers: int, n_heads: int) -> float:
    """Floating-point operations of one encoder call (2 per multiply-add)."""
    head = n_hidden // n_heads
    per_cell_layer = (
        4 * n_hidden * n_hidden  # query, key, value and output projections
        + 2 * n_hidden * 2 * n_hidden  # feed-forward d -> 2d -> d
        + 2 * n_hidden * head  # key-value summary and its product with the queries
    )
    return 2.0 * n_cells * n_layers * per_cell_layer


def make_adata(n_tissues: int, n_cells: int, genes: list[str], density: float) -> ad.AnnData:
    X = make_counts(n_tissues * n_cells, len(genes), density, seed=0)
    return counts_adata(X, genes, tissues=np.repeat([f"t{i}" for i in range(n_tissues)], n_cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="torch device, e.g. cuda, cuda:1, cpu")
    p.add_argument("--n-cells", type=int, default=10_000, help="cells per tissue")
    p.add_argument("--n-tissues", type=int, default=4)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--precisions", nargs="+", default=["32", "bf16", "16"])
    p.add_argument("--train-precisions", nargs="+", default=["32", "bf16-mixed"])
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 peak")
    p.add_argument("--small", action="store_true", help="256 hidden, 2 layers (smoke test)")
    args = p.parse_args()

    import scvi

    from cellplm_scvi import CellPLM
    from cellplm_scvi.datasets import random_official_checkpoint

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "cellplm_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.verbosity = logging.ERROR
    device = torch.device(args.device)
    print(machine_info())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"device {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        )
    n_hidden, n_layers, n_latent = (256, 2, 64) if args.small else (1024, 4, 512)

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "random_85M"
        random_official_checkpoint(
            prefix, latent="gmvae", n_hidden=n_hidden, n_layers=n_layers, n_latent=n_latent
        )
        genes = official_genes()
        adata = make_adata(args.n_tissues, args.n_cells, genes, args.density)
        CellPLM.setup_anndata(adata, tissue_key="tissue", max_cells=None)
        n_cells = adata.n_obs
        print(
            f"data: {args.n_tissues} tissues x {args.n_cells:,} cells x {len(genes):,} genes, "
            f"{adata.X.nnz:,} non-zeros ({args.density:.0%}); model {n_hidden} hidden, "
            f"{n_layers} layers, {n_latent} latent"
        )

        # 1. embedding ------------------------------------------------------------------
        model = CellPLM.load_official(prefix, adata)
        model.to_device(device)
        first = np.arange(args.n_cells)  # warm-up: one tissue
        reference = None
        print("\n1. get_latent_representation")
        for precision in args.precisions:
            model.get_latent_representation(indices=first, precision=precision)
            reset_memory(device)
            sync(device)
            t0 = time.perf_counter()
            z = model.get_latent_representation(precision=precision)
            dt = time.perf_counter() - t0
            if reference is None:
                reference = z
            diff = np.abs(z - reference).max()
            rel = np.linalg.norm(z - reference) / np.linalg.norm(reference)
            print(
                f"  precision {precision:>4}: {dt:7.2f}s  {n_cells / dt:10,.0f} cells/s  "
                f"{peak_memory(device)}  vs float32: max |diff| "
                f"{diff:.2e}, relative {rel:.2e}"
            )

        # 2. encoder only --------------------------------------------------------------
        encoder = model.module.encoder
        n_heads = encoder.layers[0].self_attn.n_heads
        flops = encoder_flops(args.n_cells, n_hidden, n_layers, n_heads)
        peak = bf16_peak(device, args.peak_tflops)
        x = torch.randn(args.n_cells, n_hidden, device=device)
        dtypes = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
        print(f"\n2. encoder alone, one tissue of {args.n_cells:,} cells: {flops / 1e9:.1f} GFLOP")
        for precision in args.precisions:
            dtype = dtypes[precision]
            autocast = torch.autocast(
                device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
            )
            with torch.inference_mode(), autocast:
                for _ in range(3):
                    encoder(x)
                sync(device)
                repeats = 10
                t0 = time.perf_counter()
                for _ in range(repeats):
                    encoder(x)
                sync(device)
                dt = (time.perf_counter() - t0) / repeats
            tflops = flops / dt / 1e12
            share = f"{tflops / peak:.1%} of the bf16 peak {peak:g}" if peak else "peak unknown"
            ms = dt * 1e3
            print(f"  precision {precision:>4}: {ms:8.2f} ms, {tflops:6.2f} TFLOP/s, {share}")

        # 3. training through the scvi trainer -------------------------------------------
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        devices = [device.index or 0] if device.type == "cuda" else 1
        print(f"\n3. model.train(accelerator={accelerator!r}), one tissue per step")
        for precision in args.train_precisions:
            trained = CellPLM.load_official(prefix, adata)
            t0 = time.perf_counter()
            trained.train(
                max_epochs=args.train_epochs,
                accelerator=accelerator,
                devices=devices,
                precision=precision,
                train_size=1.0,
                max_cells_per_step=args.n_cells,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            dt = time.perf_counter() - t0
            steps = args.train_epochs * args.n_tissues
            loss = trained.history["train_loss"].to_numpy(dtype=float).ravel()
            print(
                f"  precision {precision:>10}: {dt / steps:6.3f} s/step over {steps} steps "
                f"(first epoch included); train loss {loss[0]:.4g} -> {loss[-1]:.4g}, "
                f"finite: {bool(np.isfinite(loss).all())}"
            )
    print(machine_info().split(" | ")[-1] + " at end")


if __name__ == "__main__":
    main()
