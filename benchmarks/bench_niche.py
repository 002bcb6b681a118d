"""Niche (spatial domain) prediction on a simulated tissue built from the 700 real PBMCs.

``simulate_tissue(n_cells=4000, n_slides=2)``: 5 Voronoi niches with distinct cell-type
mixtures, plus "responder" cells whose 20-gene module is up-regulated next to monocytes (see
``cellplm_scvi.datasets.simulate_tissue``). CellPLM is trained without labels; its embedding is
evaluated by a linear probe (standardised features, class-balanced LogisticRegression,
stratified 5-fold CV, mean of the folds' scores) for the niche (macro-F1), the cell type
(macro-F1) and the responder flag (F1).

Representations:

- CellPLM, tissues = spatially contiguous squidpy-graph groups
  (``setup_anndata(spatial_key="spatial", library_key="slide")``; the default model for
  spatial data), as its cell embedding, its niche read-out
  (``get_latent_representation(representation="niche")``) and both concatenated;
- the same model configuration with *random* tissues of the same sizes (the squidpy tissue
  labels permuted within each slide, passed as ``tissue_key``): the control for context;
- PCA (50 PCs of log1p CP10k) and PCA + the mean PCA of the 10 nearest spatial neighbours;
- peers (issue 14), on the same data and folds: CellCharter-style neighbour aggregation
  (``cellcharter.gr.aggregate_neighbors``, 3 layers of a Delaunay graph with CellCharter's
  long-link pruning) of PCA, of scVI (``scvi.model.SCVI``) and of the CellPLM embedding;
  Novae trained from scratch on these slides (no pretrained weights); scVIVA
  (``scvi.external.SCVIVA``, on the scVI embedding; it also reads the true cell-type labels,
  which the others do not).

Besides the probes, each representation is clustered by k-means with k = number of niches
(standardised features, :func:`cellplm_scvi.metrics.cluster`) and the clusters are compared
with the niches (adjusted Rand index). Times are wall seconds to compute the representation
(for an aggregation: its input's time plus the aggregation).

A peer whose package is missing is skipped with a printed line; install them with
``pip install -e ".[bench]"`` (``cellcharter``, ``novae``).

    python benchmarks/bench_niche.py [--epochs 30] [--seed 0] [--skip-controls]
        [--peers cellcharter novae scviva]
"""

from __future__ import annotations

import importlib
import sys
import time
from contextlib import contextmanager
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


PEERS = ("cellcharter", "novae", "scviva")


def optional(module: str, peer: str):
    """``import module``, or ``None`` after printing why ``peer`` is skipped."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        print(f"# skipped {peer}: {err} (pip install -e '.[bench]')")
        return None


@contextmanager
def reported(peer: str):
    """Run a peer; if it raises, print the error and go on with the others."""
    try:
        yield
    except Exception as err:  # a third-party model failing must not lose the other rows
        print(f"# failed {peer}: {type(err).__name__}: {err}")


def niche_ari(x: np.ndarray, niche: np.ndarray, seed: int) -> float:
    from sklearn.metrics import adjusted_rand_score

    from cellplm_scvi.metrics import cluster

    return float(adjusted_rand_score(niche, cluster(x, len(set(niche)), seed=seed)))


def spatial_graph(adata, library_key: str = "slide"):
    """An AnnData with only the coordinates and a CellCharter graph: Delaunay per slide
    (squidpy), long links removed (``cellcharter.gr.remove_long_links``)."""
    import anndata as ad
    import cellcharter as cc
    import squidpy as sq

    g = ad.AnnData(obs=adata.obs[[library_key]].copy(), obsm={"spatial": adata.obsm["spatial"]})
    sq.gr.spatial_neighbors(g, library_key=library_key, coord_type="generic", delaunay=True)
    cc.gr.remove_long_links(g)
    return g


def aggregate(g, x: np.ndarray, n_layers: int, library_key: str = "slide") -> np.ndarray:
    """CellCharter features: ``x`` and its mean over the 1..``n_layers``-hop neighbours."""
    import cellcharter as cc

    g.obsm["features"] = np.asarray(x, dtype=np.float32)
    return np.asarray(
        cc.gr.aggregate_neighbors(
            g, n_layers=n_layers, use_rep="features", sample_key=library_key, copy=True
        )
    )


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
    p.add_argument("--skip-controls", action="store_true", help="skip the random-tissue model")
    p.add_argument(
        "--peers",
        nargs="*",
        choices=PEERS,
        default=list(PEERS),
        help="peers to run (none: no peers, not even scVI)",
    )
    p.add_argument("--scvi-epochs", type=int, default=100, help="scVI and scVIVA epochs")
    p.add_argument("--novae-epochs", type=int, default=10)
    p.add_argument("--cellcharter-layers", type=int, default=3, help="hops aggregated")
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

    def cellplm(name: str, a, setup: dict, readouts: bool = False, **model_extra):
        """Set up ``a`` (a copy of the data), train CellPLM on it and embed; timed as ``name``.
        ``readouts``: also the niche read-out and [cell, niche] (training time included)."""
        with timer(times, name):
            cp.CellPLM.setup_anndata(a, layer="counts", spatial_key="spatial", **setup)
            model = cp.CellPLM(a, **model_kwargs, **model_extra)
            model.train(**train_kwargs)
            reps[name] = model.get_latent_representation()
        for representation in ("niche", "both") if readouts else ():
            key = f"{name}, representation={representation!r}"
            with timer(times, key):
                reps[key] = model.get_latent_representation(representation=representation)
            times[key] += times[name]
        return a

    # --- CellPLM, squidpy tissues
    squidpy_tissues = {"library_key": "slide", "max_cells": args.max_cells}
    cellplm_name = f"CellPLM squidpy tissues ({args.epochs} ep)"
    a = cellplm(cellplm_name, adata.copy(), squidpy_tissues, readouts=True)
    tissues = a.obs["cellplm_tissue"].astype(str).to_numpy()
    sizes = np.bincount(np.unique(tissues, return_inverse=True)[1].ravel())
    print(f"# squidpy tissues: {len(sizes)}, sizes {sorted(sizes.tolist(), reverse=True)}")

    # --- CellPLM, random tissues of the same sizes (within each slide)
    if not args.skip_controls:
        rng = np.random.default_rng(args.seed)
        random_tissues = tissues.copy()
        for s in np.unique(slides):
            idx = np.flatnonzero(slides == s)
            random_tissues[idx] = tissues[rng.permutation(idx)]
        a = adata.copy()
        a.obs["random_tissue"] = random_tissues
        name = f"CellPLM random tissues ({args.epochs} ep)"
        cellplm(name, a, {"tissue_key": "random_tissue"}, readouts=True)

    # --- PCA baselines
    with timer(times, "PCA (50)"):
        reps["PCA (50)"] = pca(log1p_cp10k(adata.layers["counts"]), 50, args.seed)
    with timer(times, "PCA + mean of 10 spatial neighbours"):
        x = reps["PCA (50)"]
        reps["PCA + mean of 10 spatial neighbours"] = np.hstack(
            [x, neighbour_mean(x, coords, slides, 10)]
        )
    times["PCA + mean of 10 spatial neighbours"] += times["PCA (50)"]

    if args.peers:
        peers(args, adata, reps, times, cellplm_name)

    rows = []
    for name, x in reps.items():
        rows.append(
            {
                "representation": name,
                "dim": x.shape[1],
                "niche macro-F1": probe(x, niche, "f1_macro", args.seed),
                "cell-type macro-F1": probe(x, cell_type, "f1_macro", args.seed),
                "responder F1": probe(x, responder, "f1", args.seed),
                "niche ARI": niche_ari(x, niche, args.seed),
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
            "niche ARI",
            "time (s)",
        ],
    )
    print(
        "(F1: linear probe, 5-fold CV; ARI: k-means of the standardised representation, "
        f"k = {len(set(niche))} niches, seed {args.seed})"
    )
    print(
        f"\nCellPLM: n_hidden={args.n_hidden}, n_layers={args.n_layers}, n_latent=32, "
        f"lr={args.lr}, tissues of <= {args.max_cells} cells, unsupervised, train_size=1.0"
    )
    if args.peers:
        print(
            f"Peers: scVI / scVIVA n_latent=10, {args.scvi_epochs} epochs; Novae default "
            f"architecture, {args.novae_epochs} epochs; CellCharter {args.cellcharter_layers} "
            "layers of a Delaunay graph (long links removed)"
        )
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")


def peers(args, adata, reps: dict, times: dict, cellplm_name: str) -> None:
    """Add the peers' representations (and times) to ``reps`` (``times``); skip missing ones."""
    import scanpy as sc
    import scvi

    n = args.cellcharter_layers
    base = {"PCA": "PCA (50)", "CellPLM": cellplm_name}

    # --- scVI (its embedding is also scVIVA's input)
    with timer(times, "scVI"):
        a = adata.copy()
        scvi.settings.seed = args.seed
        scvi.model.SCVI.setup_anndata(a, layer="counts", batch_key="slide")
        model = scvi.model.SCVI(a, n_latent=10)
        model.train(max_epochs=args.scvi_epochs, **QUIET_TRAIN)
        reps["scVI"] = a.obsm["X_scVI"] = model.get_latent_representation()
    base["scVI"] = "scVI"

    # --- CellCharter aggregation of PCA, scVI and CellPLM
    if "cellcharter" in args.peers and optional("cellcharter", "CellCharter") is not None:
        t0 = time.perf_counter()
        g = spatial_graph(adata)
        t_graph = time.perf_counter() - t0
        for short, name in base.items():
            agg = f"CellCharter({short}), {n} layers"
            with timer(times, agg):
                reps[agg] = aggregate(g, reps[name], n)
            times[agg] += t_graph + times[name]

    # --- Novae from scratch (log1p CP10k in X, its own radius graph)
    novae = optional("novae", "Novae") if "novae" in args.peers else None
    if novae is not None:
        with reported("Novae"), timer(times, f"Novae ({args.novae_epochs} ep)"):
            b = adata.copy()
            b.X = b.layers["counts"].copy()
            sc.pp.normalize_total(b, target_sum=1e4)
            sc.pp.log1p(b)
            novae.spatial_neighbors(b, slide_key="slide", verbose=False)
            model = novae.Novae(b)
            # its cosine learning-rate schedule divides by zero below 3 epochs (novae 1.1.2)
            model.fit(
                b,
                max_epochs=args.novae_epochs,
                accelerator="cpu",
                num_workers=0,
                use_scheduler=args.novae_epochs > 2,
                **QUIET_TRAIN,
            )
            model.compute_representations(b, accelerator="cpu", num_workers=0)
            reps[f"Novae ({args.novae_epochs} ep)"] = np.asarray(b.obsm["novae_latent"])

    # --- scVIVA (scvi-tools' own niche model; reads the true cell types)
    if "scviva" not in args.peers:
        return
    if not hasattr(scvi.external, "SCVIVA"):
        print(f"# skipped scVIVA: not in scvi-tools {scvi.__version__}")
        return
    name = f"scVIVA ({args.scvi_epochs} ep, uses true cell types)"
    with reported("scVIVA"), timer(times, name):
        keys = {
            "sample_key": "slide",
            "labels_key": "cell_type",
            "cell_coordinates_key": "spatial",
            "expression_embedding_key": "X_scVI",
        }
        scvi.external.SCVIVA.preprocessing_anndata(a, k_nn=20, **keys)
        scvi.external.SCVIVA.setup_anndata(a, layer="counts", batch_key="slide", **keys)
        model = scvi.external.SCVIVA(a, n_latent=10)
        model.train(max_epochs=args.scvi_epochs, **QUIET_TRAIN)
        reps[name] = model.get_latent_representation()
    if name in times:  # it ran
        times[name] += times["scVI"]


if __name__ == "__main__":
    main()
