"""Peak memory of zero-shot embedding with the full-size (85M) CellPLM, as a function of cells.

A random-weight checkpoint with the official ``20230926_85M`` layout (GMVAE latent, 1024
hidden, 4 Flowformer layers, 512 latent, 19,374-gene vocabulary, decoder covariate tables) is
written with :func:`cellplm_scvi.datasets.random_official_checkpoint` into a temporary
directory and loaded with :meth:`CellPLM.load_official`. For each ``--n-cells`` value, an
AnnData of that many cells x 19,374 genes (``--density`` non-zero, float32 CSR raw counts,
values Poisson(2) + 1) is built with **all cells in one tissue** (``tissue_key`` = a constant
column: one forward pass over all cells, like the official pipeline's single group), and
``model.get_latent_representation(adata)`` is timed.

Memory: before each call VmHWM is reset (``5`` -> ``/proc/self/clear_refs``); the figure is the
peak RSS during the call minus the RSS just before it (model *and* input AnnData already
loaded), i.e. the extra memory the call needs. The slope between the two largest sizes gives
the growth in MB per 1,000 cells. Target: <= 0.5 GB above the loaded model at 10k cells (the
official pipeline: +1.8-1.9 GB, spec section 6).

``--official`` additionally runs the official ``CellEmbeddingPipeline.predict`` (cellplm
0.1.0.post2, same checkpoint files, whole matrix as one group) at ``--official-n-cells`` cells
in the same process, after our runs.

Usage::

    python benchmarks/bench_memory.py                                # 1k, 10k, 50k cells
    python benchmarks/bench_memory.py --n-cells 1000 10000 --official
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    add_common_options,
    counts_adata,
    load_line,
    make_counts,
    official_genes,
    peak_mb,
    reset_peak,
    rss_mb,
    start,
    trim_heap,
)

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------ data
def make_adata(n_cells: int, genes: list[str], density: float, seed: int):
    """Random counts, all cells in one tissue: every cell attends to every other cell."""
    return counts_adata(make_counts(n_cells, len(genes), density, seed), genes, tissues="all")


def x_mb(adata) -> float:
    x = adata.X
    return (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 2**20


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, nargs="+", default=[1000, 10_000, 50_000])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--official", action="store_true", help="also run the official pipeline")
    parser.add_argument("--official-n-cells", type=int, default=10_000)
    add_common_options(parser)
    args = parser.parse_args()

    start(args)
    import cellplm_scvi as cp

    genes = official_genes()

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "random_85M"
        t0 = time.perf_counter()
        cp.datasets.random_official_checkpoint(
            prefix, latent="gmvae", n_hidden=1024, n_layers=4, n_latent=512, seed=args.seed
        )
        size = Path(f"{prefix}.best.ckpt").stat().st_size / 2**20
        print(
            f"checkpoint (official layout, random weights): {size:.0f} MB, "
            f"written in {time.perf_counter() - t0:.1f}s"
        )

        rss0 = rss_mb()
        warm = make_adata(64, genes, args.density, args.seed)
        cp.CellPLM.setup_anndata(warm, tissue_key="tissue")
        t0 = time.perf_counter()
        model = cp.CellPLM.load_official(prefix, warm)
        t_load = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.module.parameters())
        model.get_latent_representation()  # warm-up (first-call allocations, thread pools)
        gc.collect()
        print(
            f"model: load_official {t_load:.1f}s, {n_params:,} parameters "
            f"({n_params * 4 / 2**20:.0f} MB fp32); RSS {rss0:.0f} MB before loading, "
            f"{rss_mb():.0f} MB with the model loaded (after a 64-cell warm-up)"
        )
        print(
            f"input: one tissue of N cells x {len(genes):,} genes, {args.density:.0%} "
            f"non-zero, float32 CSR; 'extra' = peak RSS during get_latent_representation - "
            f"RSS just before it (model + input already resident)"
        )

        rows = []
        for n in args.n_cells:
            adata = make_adata(n, genes, args.density, args.seed + n)
            trim_heap()
            reset_peak()
            base = rss_mb()
            t0 = time.perf_counter()
            z = model.get_latent_representation(adata)
            dt = time.perf_counter() - t0
            extra = peak_mb() - base
            rows.append((n, dt, extra, base))
            print(
                f"  N={n:>6,}: input X {x_mb(adata):6.0f} MB ({adata.X.nnz:,} nnz) | "
                f"{dt:7.2f}s ({n / dt:5.0f} cells/s) | RSS before {base:6.0f} MB | peak "
                f"{base + extra:6.0f} MB | extra +{extra:6.0f} MB "
                f"({extra / n * 1000:5.1f} MB per 1k cells) | z {z.shape}"
            )
            del adata, z
            gc.collect()

        if len(rows) >= 2:
            (n1, _, e1, _), (n2, _, e2, _) = rows[-2], rows[-1]
            slope = (e2 - e1) / (n2 - n1) * 1000
            print(
                f"growth between N={n1:,} and N={n2:,}: {slope:.1f} MB per 1k cells "
                f"(intercept {e1 - slope * n1 / 1000:.0f} MB)"
            )
        for n, _, extra, _ in rows:
            if n == 10_000:
                print(
                    f"target at 10k cells: <= 512 MB extra -> {extra:.0f} MB "
                    f"({'met' if extra <= 512 else 'NOT met'}); official (spec section 6): "
                    f"+1.8-1.9 GB"
                )

        if args.official:
            from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline
            from CellPLM.utils import set_seed

            del model
            gc.collect()
            set_seed(42, cuda=False)
            quiet = contextlib.redirect_stdout(io.StringIO())
            with quiet:
                pipe = CellEmbeddingPipeline(
                    pretrain_prefix=prefix.name, pretrain_directory=str(prefix.parent)
                )
                pipe.predict(warm[:64].copy(), device="cpu")  # warm-up
            n = args.official_n_cells
            adata = make_adata(n, genes, args.density, args.seed + n)
            del adata.obs["tissue"]  # official: no obs['batch'] -> all cells are one group
            trim_heap()
            reset_peak()
            base = rss_mb()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                emb = pipe.predict(adata, device="cpu")
            dt = time.perf_counter() - t0
            extra = peak_mb() - base
            print(
                f"official CellEmbeddingPipeline.predict, N={n:,} (same process, after ours; "
                f"our model freed): {dt:.2f}s ({n / dt:.0f} cells/s) | RSS before {base:.0f} MB "
                f"| extra +{extra:.0f} MB | emb {tuple(emb.shape)}"
            )
    print(load_line())


if __name__ == "__main__":
    main()
