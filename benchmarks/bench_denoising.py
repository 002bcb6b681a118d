"""Denoising (simulated dropout) on the 700 real PBMCs (pbmc68k_reduced, recovered counts).

10% of the non-zero entries are hidden (set to 0 in the input, seeded). Models train on the
corrupted counts. Scoring follows the CellPLM protocol (``denoising_eval``): the prediction
matrix and the truth matrix are each normalised by their own row sums to 1e4 and log1p'd; RMSE
(computed correctly: sqrt of the mean squared error), MAE, Pearson r and cosine similarity are
taken over the hidden entries only.

Methods: CellPLM ``get_normalized_expression(library_size=1e4)``, scVI
``get_normalized_expression(library_size=1e4)``, the gene-mean profile of the corrupted data,
and the corrupted input itself (predicts 0 at every hidden entry: the floor).

    python benchmarks/bench_denoising.py [--epochs 100] [--seed 0]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from _common import QUIET_TRAIN, dense, log1p_cp10k, parser, print_table, setup, timer


def scores(pred_log: np.ndarray, truth_log: np.ndarray, rows, cols) -> dict:
    p, t = pred_log[rows, cols], truth_log[rows, cols]
    err = p - t
    return {
        "RMSE": float(np.sqrt(np.mean(err**2))),
        "MAE": float(np.mean(np.abs(err))),
        "Pearson": float(np.corrcoef(p, t)[0, 1]),
        "cosine": float(p @ t / (np.linalg.norm(p) * np.linalg.norm(t))),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=100)
    p.add_argument("--rate", type=float, default=0.1, help="fraction of non-zeros hidden")
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-cells", type=int, default=200, help="cells per CellPLM tissue")
    p.add_argument("--scvi-epochs", type=int, default=400)
    args = p.parse_args()
    setup(args)

    import scvi

    import cellplm_scvi as cp

    t_start = time.perf_counter()
    adata = cp.datasets.pbmc68k_counts()
    counts = dense(adata.layers["counts"])
    rng = np.random.default_rng(args.seed)
    nz_rows, nz_cols = np.nonzero(counts)
    pick = rng.random(nz_rows.size) < args.rate
    rows, cols = nz_rows[pick], nz_cols[pick]
    corrupted = counts.copy()
    corrupted[rows, cols] = 0
    adata.layers["counts"] = sp.csr_matrix(corrupted.astype(np.float32))
    adata.X = adata.layers["counts"].copy()
    truth_log = log1p_cp10k(counts)
    print(
        f"# data: {adata.n_obs} cells x {adata.n_vars} genes; hidden {rows.size} of "
        f"{nz_rows.size} non-zero entries ({args.rate:.0%}, seed {args.seed})"
    )
    results, times = [], {}

    with timer(times, "CellPLM"):
        cp.CellPLM.setup_anndata(adata, layer="counts", max_cells=args.max_cells)
        model = cp.CellPLM(
            adata, n_hidden=args.n_hidden, n_layers=args.n_layers, n_latent=32, preset="official"
        )
        model.train(max_epochs=args.epochs, lr=args.lr, train_size=1.0, **QUIET_TRAIN)
        pred = model.get_normalized_expression(library_size=1e4, return_numpy=True)
    results.append((f"CellPLM ({args.epochs} ep)", log1p_cp10k(pred), times["CellPLM"]))

    with timer(times, "scVI"):
        sc_adata = adata.copy()
        scvi.model.SCVI.setup_anndata(sc_adata, layer="counts")
        vae = scvi.model.SCVI(sc_adata, n_latent=10)
        vae.train(max_epochs=args.scvi_epochs, **QUIET_TRAIN)
        pred = vae.get_normalized_expression(library_size=1e4, return_numpy=True)
    results.append((f"scVI ({args.scvi_epochs} ep)", log1p_cp10k(pred), times["scVI"]))

    with timer(times, "mean"):
        total = corrupted.sum(1, keepdims=True)
        profile = (corrupted / np.where(total > 0, total, 1)).mean(0)
        pred = np.broadcast_to(profile, corrupted.shape)
    results.append(("gene mean (corrupted data)", log1p_cp10k(pred), times["mean"]))
    results.append(("no denoising (corrupted input)", log1p_cp10k(corrupted), 0.0))

    table = [
        {"method": name, **scores(pred_log, truth_log, rows, cols), "time (s)": f"{t:.1f}"}
        for name, pred_log, t in results
    ]
    print_table(
        "Denoising, hidden entries (log1p CP10k, CellPLM protocol; RMSE = sqrt(MSE))",
        table,
        ["method", "RMSE", "MAE", "Pearson", "cosine", "time (s)"],
    )
    print(
        f"\nCellPLM: n_hidden={args.n_hidden}, n_layers={args.n_layers}, n_latent=32, "
        f"lr={args.lr}, tissues of <= {args.max_cells} cells, train_size=1.0"
    )
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
