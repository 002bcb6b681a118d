"""Niche (spatial domain) prediction on a simulated tissue built from the 700 real PBMCs.

``simulate_tissue(n_cells=4000, n_slides=2)``: 5 Voronoi niches with distinct cell-type
mixtures, plus "responder" cells whose 20-gene module is up-regulated next to monocytes (see
``cellplm_scvi.datasets.simulate_tissue``). CellPLM is trained without labels; its embedding is
evaluated by a linear probe (standardised features, class-balanced LogisticRegression,
stratified 5-fold CV, mean of the folds' scores) for the niche (macro-F1), the cell type
(macro-F1) and the responder flag (F1).

Representations:

- CellPLM, tissues = spatially contiguous squidpy-graph groups
  (``setup_anndata(spatial_key="spatial", library_key="slide")``; spatial encoding on, the
  default with coordinates);
- the same model configuration with *random* tissues of the same sizes (the squidpy tissue
  labels permuted within each slide, passed as ``tissue_key``): the control for context;
- CellPLM, squidpy tissues, ``spatial_pe=False`` (context only, as the official code);
- PCA (50 PCs of log1p CP10k) and PCA + the mean PCA of the 10 nearest spatial neighbours.

    python benchmarks/bench_niche.py [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import QUIET_TRAIN, log1p_cp10k, parser, pca, print_table, setup, timer


def probe(x: np.ndarray, y: np.ndarray, scoring: str, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced")
    )
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv, scoring=scoring).mean())


def neighbour_mean(x: np.ndarray, coords: np.ndarray, slides: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``x`` over the ``k`` nearest spatial neighbours (same slide, self excluded)."""
    from scipy.spatial import cKDTree

    out = np.zeros_like(x)
    for s in np.unique(slides):
        idx = np.flatnonzero(slides == s)
        nbrs = cKDTree(coords[idx]).query(coords[idx], k=k + 1)[1][:, 1:]
        out[idx] = x[idx][nbrs].mean(1)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=30)
    p.add_argument("--n-cells", type=int, default=4000)
    p.add_argument("--n-slides", type=int, default=2)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-cells", type=int, default=500, help="cells per CellPLM tissue")
    p.add_argument("--skip-no-pe", action="store_true", help="skip the spatial_pe=False model")
    args = p.parse_args()
    setup(args)

    import cellplm_scvi as cp

    t_start = time.perf_counter()
    adata = cp.datasets.simulate_tissue(
        n_cells=args.n_cells, n_slides=args.n_slides, seed=args.seed
    )
    niche = adata.obs["niche"].astype(str).to_numpy()
    cell_type = adata.obs["cell_type"].astype(str).to_numpy()
    responder = adata.obs["responder"].to_numpy().astype(int)
    slides = adata.obs["slide"].astype(str).to_numpy()
    coords = np.asarray(adata.obsm["spatial"])
    print(
        f"# data: {adata.n_obs} cells x {adata.n_vars} genes, {args.n_slides} slides, "
        f"{len(set(niche))} niches, {len(set(cell_type))} cell types, "
        f"{responder.mean():.1%} responders (seed {args.seed})"
    )
    reps, times = {}, {}
    model_kwargs = {"n_hidden": args.n_hidden, "n_layers": args.n_layers, "n_latent": 32}
    train_kwargs = {"max_epochs": args.epochs, "lr": args.lr, "train_size": 1.0, **QUIET_TRAIN}

    def cellplm(name: str, a, setup: dict, **model_extra):
        """Set up ``a`` (a copy of the data), train CellPLM on it and embed; timed as ``name``."""
        with timer(times, name):
            cp.CellPLM.setup_anndata(a, layer="counts", spatial_key="spatial", **setup)
            model = cp.CellPLM(a, **model_kwargs, **model_extra)
            model.train(**train_kwargs)
            reps[name] = model.get_latent_representation()
        return a

    # --- CellPLM, squidpy tissues
    squidpy_tissues = {"library_key": "slide", "max_cells": args.max_cells}
    a = cellplm(f"CellPLM squidpy tissues ({args.epochs} ep)", adata.copy(), squidpy_tissues)
    tissues = a.obs["cellplm_tissue"].astype(str).to_numpy()
    sizes = np.bincount(np.unique(tissues, return_inverse=True)[1].ravel())
    print(f"# squidpy tissues: {len(sizes)}, sizes {sorted(sizes.tolist(), reverse=True)}")

    # --- CellPLM, random tissues of the same sizes (within each slide)
    rng = np.random.default_rng(args.seed)
    random_tissues = tissues.copy()
    for s in np.unique(slides):
        idx = np.flatnonzero(slides == s)
        random_tissues[idx] = tissues[rng.permutation(idx)]
    a = adata.copy()
    a.obs["random_tissue"] = random_tissues
    cellplm(f"CellPLM random tissues ({args.epochs} ep)", a, {"tissue_key": "random_tissue"})

    if not args.skip_no_pe:
        name = f"CellPLM squidpy tissues, no spatial PE ({args.epochs} ep)"
        cellplm(name, adata.copy(), squidpy_tissues, spatial_pe=False)

    # --- PCA baselines
    with timer(times, "PCA (50)"):
        reps["PCA (50)"] = pca(log1p_cp10k(adata.layers["counts"]), 50, args.seed)
    with timer(times, "PCA + mean of 10 spatial neighbours"):
        x = reps["PCA (50)"]
        reps["PCA + mean of 10 spatial neighbours"] = np.hstack(
            [x, neighbour_mean(x, coords, slides, 10)]
        )
    times["PCA + mean of 10 spatial neighbours"] += times["PCA (50)"]

    rows = []
    for name, x in reps.items():
        rows.append(
            {
                "representation": name,
                "dim": x.shape[1],
                "niche macro-F1": probe(x, niche, "f1_macro", args.seed),
                "cell-type macro-F1": probe(x, cell_type, "f1_macro", args.seed),
                "responder F1": probe(x, responder, "f1", args.seed),
                "time (s)": f"{times[name]:.1f}",
            }
        )
    print_table(
        "Linear probe (5-fold CV) on the simulated tissue",
        rows,
        [
            "representation",
            "dim",
            "niche macro-F1",
            "cell-type macro-F1",
            "responder F1",
            "time (s)",
        ],
    )
    print(
        f"\nCellPLM: n_hidden={args.n_hidden}, n_layers={args.n_layers}, n_latent=32, "
        f"lr={args.lr}, tissues of <= {args.max_cells} cells, unsupervised, train_size=1.0"
    )
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
