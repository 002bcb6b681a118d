"""Ablation of how tissue context enters CellPLM (issue 14): objective, tissues, read-out.

The quickstart's data (:func:`cellplm_scvi.datasets.simulate_tissue`: real PBMCs in simulated
Voronoi niches, a 20-gene module up in cells next to monocytes) and its linear probe
(:func:`cellplm_scvi.metrics.linear_probe`: macro-F1 of pooled 5-fold predictions). Each
configuration is trained from scratch, unsupervised, on every seed (seed of the data, the
model and the folds), and read out as

- ``cell``: ``get_latent_representation()`` (the cell's own posterior mean, in tissue context);
- ``niche``: ``representation="niche"`` (the cell's latent with its own counts hidden: read
  from its tissue through the attention), for models trained with hidden cells;
- ``both``: the two side by side.

Baselines: PCA (50 PCs of log1p CP10k) and PCA + the mean PCA of the 10 nearest spatial
neighbours (the quickstart's "PCA + spatial").

    python benchmarks/experiments/ablate_niche.py [--configs default hide hide_pe hide_redraw ...]
        [--seeds 0 1] [--epochs 80] [--n-cells 4000] [--n-slides 2] [--n-seeds 15]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))
from _common import QUIET_TRAIN, log1p_cp10k, parser, pca, print_table, setup

# The configurations before the local heads: the official latent, every head global.
GLOBAL = {"latent": "gmvae", "n_local_heads": 0}
HIDE = {**GLOBAL, "hide_cell_rate": 0.3, "spatial_pe": False}
LOCAL = {"hide_cell_rate": 0.3, "spatial_pe": False, "latent": "gmvae"}

# name: (CellPLM kwargs, train kwargs, description)
CONFIGS = {
    "default": (
        {**GLOBAL, "hide_cell_rate": 0.0, "spatial_pe": True},
        {"redraw_tissues": False},
        "official objective (75% cells masked, 25% of their genes), spatial PE",
    ),
    "default_nope": (
        {**GLOBAL, "hide_cell_rate": 0.0, "spatial_pe": False},
        {"redraw_tissues": False},
        "official objective, no spatial PE",
    ),
    "hide": (
        HIDE,
        {"redraw_tissues": False},
        "30% of cells hidden whole + 45% partially masked, no PE",
    ),
    "hide_pe": (
        {**HIDE, "spatial_pe": True},
        {"redraw_tissues": False},
        "30% hidden + 45% partial, spatial PE",
    ),
    "hide_redraw": (
        HIDE,
        {"redraw_tissues": True},
        "30% hidden + 45% partial, no PE, tissues re-drawn every epoch",
    ),
    "hide_redraw_pe": (
        {**HIDE, "spatial_pe": True},
        {"redraw_tissues": True},
        "30% hidden + 45% partial, spatial PE, tissues re-drawn every epoch",
    ),
    "hide_window": (
        HIDE,
        {"redraw_tissues": 64},
        "30% hidden + 45% partial, no PE, 64-cell tissues re-drawn every epoch (run with "
        "--epochs 20: the same number of steps)",
    ),
    "local": (
        {**LOCAL, "n_local_heads": 4, "local_grid": 4},
        {"redraw_tissues": True},
        "`hide_redraw` + 4 of 8 heads attending through a distance-decaying spatial "
        "kernel (4 x 4 anchor lattice, width 1/3 of the tissue side)",
    ),
    "local_all": (
        {**LOCAL, "n_local_heads": 8, "local_grid": 4},
        {"redraw_tissues": True},
        "`local` with all 8 heads through the spatial kernel",
    ),
    "local_fine": (
        {**LOCAL, "n_local_heads": 4, "local_grid": 7},
        {"redraw_tissues": True},
        "`local` with a narrower kernel (7 x 7 lattice, width 1/6 of the tissue side)",
    ),
    "local_vae": (
        {**LOCAL, "n_local_heads": 4, "local_grid": 7, "latent": "vae"},
        {"redraw_tissues": True},
        "`local_fine` with the plain VAE latent instead of the Gaussian mixture",
    ),
    "spatial_default": (
        {},
        {},
        "the defaults for spatial data: 30% hidden + 45% partial, no PE, tissues re-drawn "
        "every epoch, 4 of 8 heads local (7 x 7 lattice), VAE latent (= `local_vae`)",
    ),
}


def responder_f1(features: np.ndarray, responder: np.ndarray, seed: int) -> float:
    """F1 of the responder class from pooled 5-fold predictions, class-balanced (as
    ``bench_niche.py``: an unweighted probe predicts no responder from PCA)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced")
    )
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(f1_score(responder, cross_val_predict(probe, features, responder, cv=folds)))


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=80)
    p.add_argument("--configs", nargs="+", default=["default", "hide", "hide_redraw"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--n-cells", type=int, default=4000)
    p.add_argument("--n-slides", type=int, default=2)
    p.add_argument("--n-seeds", type=int, default=15, help="Voronoi seeds per slide")
    p.add_argument("--n-niches", type=int, default=5)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--max-cells", type=int, default=250, help="cells per registered tissue")
    args = p.parse_args()
    setup(args)

    import scvi

    import cellplm_scvi as cp
    from cellplm_scvi.metrics import linear_probe
    from cellplm_scvi.quickstart import spatial_mean

    rows = []

    def score(config: str, seed: int, rep: str, x: np.ndarray, seconds: float, adata) -> None:
        row = {
            "config": config,
            "seed": seed,
            "read-out": rep,
            "niche F1": linear_probe(x, adata.obs["niche"], seed=seed),
            "cell-type F1": linear_probe(x, adata.obs["cell_type"], seed=seed),
            "responder F1": responder_f1(x, adata.obs["responder"].to_numpy(), seed),
            "time (s)": f"{seconds:.0f}",
        }
        rows.append(row)
        print(
            "  ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )

    for seed in args.seeds:
        adata = cp.datasets.simulate_tissue(
            n_cells=args.n_cells,
            n_slides=args.n_slides,
            n_seeds=args.n_seeds,
            n_niches=args.n_niches,
            seed=seed,
        )
        t0 = time.perf_counter()
        x_pca = pca(log1p_cp10k(adata.layers["counts"]), 50, seed)
        t_pca = time.perf_counter() - t0
        score("PCA (50)", seed, "-", x_pca, t_pca, adata)
        spatial = np.hstack([x_pca, spatial_mean(adata, x_pca, 10)])
        score("PCA + mean of 10 spatial neighbours", seed, "-", spatial, t_pca, adata)
        for config in args.configs:
            model_kwargs, train_kwargs, _ = CONFIGS[config]
            scvi.settings.seed = seed
            a = adata.copy()
            t0 = time.perf_counter()
            cp.CellPLM.setup_anndata(
                a, layer="counts", spatial_key="spatial", library_key="slide",
                max_cells=args.max_cells,
            )  # fmt: skip
            model = cp.CellPLM(
                a, n_hidden=args.n_hidden, n_layers=args.n_layers, n_latent=32, **model_kwargs
            )
            model.train(max_epochs=args.epochs, train_size=1.0, **train_kwargs, **QUIET_TRAIN)
            t_train = time.perf_counter() - t0
            cell = model.get_latent_representation()
            score(config, seed, "cell", cell, t_train, a)
            if model.module.hide_cell_rate > 0:
                niche = model.get_latent_representation(representation="niche")
                score(config, seed, "niche", niche, t_train, a)
                score(config, seed, "both", np.hstack([cell, niche]), t_train, a)

    print_table(
        f"Niche context ablation ({args.n_cells} cells, {args.n_slides} slides, "
        f"{args.n_seeds} Voronoi seeds/slide, {args.n_niches} niches)",
        rows,
        ["config", "seed", "read-out", "niche F1", "cell-type F1", "responder F1", "time (s)"],
    )
    for name in args.configs:
        print(f"- {name}: {CONFIGS[name][2]}")
    print(
        f"\nCellPLM: n_hidden={args.n_hidden}, n_layers={args.n_layers}, n_latent=32, "
        f"{args.epochs} epochs, registered tissues <= {args.max_cells} cells, train_size=1.0"
    )


if __name__ == "__main__":
    main()
