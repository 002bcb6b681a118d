"""Out-of-core benchmark: embed a backed ``.h5ad`` of many spatial cells in bounded memory.

1. **Generate** ``--n-cells`` cells x ``--n-genes`` genes of sparse raw counts (about
   ``--density`` non-zero; Poisson(2) + 1 values) into an ``.h5ad`` file, chunk by chunk:
   the AnnData skeleton (obs with a ``slide`` column, var, ``obsm["spatial"]``) is written
   first, then ``X`` is written as CSR with :func:`anndata.io.write_elem` for the first chunk and
   :meth:`anndata.io.sparse_dataset(...).append` for the others, so the count matrix is never
   held in RAM. Slides hold ``--cells-per-slide`` cells on a jittered square grid. Cells are
   stored tissue by tissue (the tissues :func:`cellplm_scvi.pp.assign_tissues` computes from
   the coordinates alone, i.e. those ``setup_anndata`` will find), in k-d tree order inside a
   tissue, so every tissue is one contiguous row range on disk.
2. **Open** it with ``anndata.read_h5ad(path, backed="r")`` and run
   ``CellPLM.setup_anndata(adata, spatial_key="spatial", library_key="slide")`` (which
   computes the tissues: kNN graph + recursive bisection, <= ``--max-cells`` cells each).
3. **Embed** with a small, *untrained* (random-weight) ``CellPLM`` (default n_hidden 128,
   n_layers 2, n_latent 32, GMVAE) through ``get_latent_representation()``,
   which reads one tissue at a time from the file (``--precision int8``: the encoder's
   Linear layers int8, quantized in the call). The result goes to
   ``adata.obsm["X_cellplm"]`` (in memory; backed mode keeps only ``X`` on disk) and to an
   ``.npy`` file next to the ``.h5ad``.

Reported: generation time and file size, time of each step, embedding throughput (cells/s),
and the process peak RSS (VmHWM) after each step; the requirement is a peak below 4 GB.
No speed assertions. Weights are random: the embeddings carry no biology, and speed and
memory do not depend on the weights.

Usage::

    python benchmarks/bench_out_of_core.py                      # 1,000,000 cells
    python benchmarks/bench_out_of_core.py --n-cells 20000      # quick run
    python benchmarks/bench_out_of_core.py --path /tmp/x.h5ad --reuse   # skip generation
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import load_line, machine_info, make_counts, peak_mb, reset_peak, rss_mb, trim_heap

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------ generation
def _spatial_sort(xy: np.ndarray, leaf: int) -> np.ndarray:
    """Order of the cells for a k-d tree walk: split at the median of the widest axis until a
    part has at most ``leaf`` cells, and list the parts depth first (spatial locality)."""
    out, stack = [], [np.arange(len(xy))]
    while stack:
        idx = stack.pop()
        if len(idx) <= leaf:
            out.append(idx)
            continue
        pts = xy[idx]
        axis = int(np.ptp(pts[:, 1]) > np.ptp(pts[:, 0]))
        order = idx[np.argsort(pts[:, axis], kind="stable")]
        half = len(order) // 2
        stack.extend([order[half:], order[:half]])  # left half is popped first
    return np.concatenate(out)


def slide_layout(
    n_cells: int, cells_per_slide: int, seed: int, leaf: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Slide index and (x, y) coordinates (um) of every cell, in on-disk order.

    Each slide is a jittered square grid (10 um spacing); its cells are stored in k-d tree
    order (see :func:`_spatial_sort`), so a spatial patch is a few contiguous row ranges.
    """
    rng = np.random.default_rng(seed)
    slides, coords = [], []
    for s, start in enumerate(range(0, n_cells, cells_per_slide)):
        n = min(cells_per_slide, n_cells - start)
        side = int(np.ceil(np.sqrt(n)))
        i, j = np.divmod(np.arange(n, dtype=np.int64), side)
        xy = np.stack([i, j], 1) * 10.0 + rng.uniform(-3, 3, (n, 2))
        coords.append(xy[_spatial_sort(xy, leaf)])
        slides.append(np.full(n, s, dtype=np.int64))
    return np.concatenate(slides), np.concatenate(coords)


def generate(
    path: Path,
    n_cells: int,
    n_genes: int,
    density: float,
    cells_per_slide: int,
    chunk: int,
    seed: int,
    max_cells: int,
) -> dict:
    """Write the backed-ready h5ad chunk-wise; return stats."""
    import anndata as ad
    import h5py

    t0 = time.perf_counter()
    slides, xy = slide_layout(n_cells, cells_per_slide, seed)
    # store each tissue contiguously: group the cells as setup_anndata will (only the
    # coordinates are needed) and sort by tissue, keeping the k-d order inside a tissue
    import cellplm_scvi as cp

    layout = ad.AnnData(
        obs=pd.DataFrame({"slide": pd.Categorical(slides.astype(str))}),
        obsm={"spatial": xy},
    )
    cp.pp.assign_tissues(layout, spatial_key="spatial", library_key="slide", max_cells=max_cells)
    order = np.argsort(layout.obs["cellplm_tissue"].cat.codes.to_numpy(), kind="stable")
    slides, xy = slides[order], xy[order]
    del layout
    obs = pd.DataFrame(
        {"slide": pd.Categorical([f"slide{s}" for s in slides])},
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene{g}" for g in range(n_genes)]))
    skeleton = ad.AnnData(obs=obs, var=var, obsm={"spatial": xy})
    skeleton.write_h5ad(path)  # X is None: written below, chunk by chunk
    del skeleton, obs, xy
    gc.collect()
    rng = np.random.default_rng(seed + 1)
    nnz = 0
    with h5py.File(path, "a") as f:
        for start in range(0, n_cells, chunk):
            x = make_counts(min(chunk, n_cells - start), n_genes, density, rng)
            nnz += x.nnz
            if start == 0:
                ad.io.write_elem(f, "X", x)  # anndata makes the datasets resizable
            else:
                ad.io.sparse_dataset(f["X"]).append(x)
            del x
    return {
        "seconds": time.perf_counter() - t0,
        "nnz": nnz,
        "size_gb": path.stat().st_size / 2**30,
        "n_slides": int(slides.max()) + 1,
    }


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--cells-per-slide", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=50_000, help="rows per written chunk")
    parser.add_argument("--max-cells", type=int, default=1000, help="cells per tissue")
    parser.add_argument("--n-hidden", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-latent", type=int, default=32)
    parser.add_argument("--path", type=str, default=None, help="h5ad path (default: temp dir)")
    parser.add_argument("--reuse", action="store_true", help="reuse an existing --path file")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=["32", "int8"],
        default="32",
        help="inference precision; int8: the encoder's Linear layers int8 (CPU)",
    )
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info())
    print(f"RSS at start {rss_mb():.0f} MB")
    tmpdir = None
    if args.path is None:
        tmpdir = tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMPDIR"))
        path = Path(tmpdir.name) / "ooc.h5ad"
    else:
        path = Path(args.path)

    peaks = {}  # step -> peak RSS (MB) during that step

    # ------------------------------------------------------------------ 1. generate
    t_wall = time.perf_counter()
    if args.reuse and path.exists():
        print(f"reusing {path} ({path.stat().st_size / 2**30:.2f} GB)")
    else:
        reset_peak()
        stats = generate(
            path,
            args.n_cells,
            args.n_genes,
            args.density,
            args.cells_per_slide,
            args.chunk,
            args.seed,
            args.max_cells,
        )
        print(
            f"[generate] {args.n_cells:,} cells x {args.n_genes:,} genes, {stats['nnz']:,} "
            f"non-zeros ({stats['nnz'] / (args.n_cells * args.n_genes):.2%}), "
            f"{stats['n_slides']} slides, chunks of {args.chunk:,} rows: "
            f"{stats['seconds']:.1f}s, file {stats['size_gb']:.2f} GB, "
            f"peak RSS {peak_mb():.0f} MB"
        )
        peaks["generate"] = peak_mb()

    # ------------------------------------------------------------------ 2. open + setup
    import anndata as ad

    import cellplm_scvi as cp

    logging.getLogger("scvi").setLevel(logging.WARNING)
    trim_heap()
    reset_peak()
    t0 = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r")
    t_open = time.perf_counter() - t0
    print(
        f"[open backed] {t_open:.1f}s, X is {type(adata.X).__name__}, "
        f"isbacked={adata.isbacked}, RSS {rss_mb():.0f} MB (peak {peak_mb():.0f} MB)"
    )
    peaks["open"] = peak_mb()
    reset_peak()
    t0 = time.perf_counter()
    cp.CellPLM.setup_anndata(
        adata, spatial_key="spatial", library_key="slide", max_cells=args.max_cells
    )
    t_setup = time.perf_counter() - t0
    sizes = adata.obs["cellplm_tissue"].value_counts()
    codes = adata.obs["_cellplm_tissue_code"].to_numpy()
    # how contiguous are tissues on disk: row-range runs per tissue
    runs = 1 + np.count_nonzero(np.diff(codes))
    print(
        f"[setup_anndata] {t_setup:.1f}s: {len(sizes):,} tissues, cells/tissue min "
        f"{sizes.min()} median {int(sizes.median())} max {sizes.max()}; {runs / len(sizes):.1f} "
        f"contiguous row runs per tissue; RSS {rss_mb():.0f} MB (peak {peak_mb():.0f} MB); "
        f"X still backed: {adata.isbacked}"
    )
    peaks["setup_anndata"] = peak_mb()

    reset_peak()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = cp.CellPLM(
        adata, n_hidden=args.n_hidden, n_layers=args.n_layers, n_latent=args.n_latent
    )
    model.is_trained_ = True  # random weights on purpose: speed and memory only
    t_model = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.module.parameters())
    print(
        f"[model] untrained (random weights) CellPLM n_hidden={args.n_hidden} "
        f"n_layers={args.n_layers} n_latent={args.n_latent} gmvae, {n_params:,} parameters, "
        f"built in {t_model:.1f}s; RSS {rss_mb():.0f} MB (peak {peak_mb():.0f} MB)"
    )
    peaks["model"] = peak_mb()

    # ------------------------------------------------------------------ 3. embed
    trim_heap()
    reset_peak()
    base = rss_mb()
    t0 = time.perf_counter()
    z = model.get_latent_representation(precision=args.precision)
    t_embed = time.perf_counter() - t0
    adata.obsm["X_cellplm"] = z
    out_npy = path.with_suffix(".X_cellplm.npy")
    np.save(out_npy, z)
    print(
        f"[embed] get_latent_representation(precision={args.precision!r}): {t_embed:.1f}s = "
        f"{adata.n_obs / t_embed:,.0f} cells/s, z {z.shape} {z.dtype} "
        f"(finite: {bool(np.isfinite(z).all())}); RSS before {base:.0f} MB, peak "
        f"{peak_mb():.0f} MB (+{peak_mb() - base:.0f} MB); saved {out_npy.name}"
    )
    peaks["embed"] = peak_mb()
    wall = time.perf_counter() - t_wall
    worst = max(peaks, key=peaks.get)
    print(
        f"total wall (generation + open + setup + model + embed) {wall:.1f}s; peak RSS per "
        f"step: {', '.join(f'{k} {v:.0f} MB' for k, v in peaks.items())}; overall peak "
        f"{peaks[worst]:.0f} MB ({worst}); requirement < 4096 MB: "
        f"{'met' if peaks[worst] < 4096 else 'NOT met'}"
    )
    print(load_line())
    adata.file.close()
    if tmpdir is not None and not args.keep:
        tmpdir.cleanup()
    elif args.keep:
        print(f"kept {path}")


if __name__ == "__main__":
    main()
