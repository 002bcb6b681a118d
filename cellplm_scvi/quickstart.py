"""Quickstart: train CellPLM on a simulated spatial tissue and compare it with PCA.

Run it from a shell (no download needed)::

    python -m cellplm_scvi.quickstart [--out DIR] [--n-cells N] [--epochs E] [--seed S]

It

1. places real PBMCs (scanpy's bundled ``pbmc68k_reduced``, exact raw counts) into simulated
   spatial niches on two slides (:func:`cellplm_scvi.datasets.simulate_tissue`);
2. groups the cells of each slide into spatially contiguous *tissues*
   (:func:`cellplm_scvi.pp.assign_tissues`), the sets of cells that attend to each other;
3. trains :class:`~cellplm_scvi.CellPLM` for a few minutes on the CPU (or a GPU if there is one);
4. stores the cell embedding in ``adata.obsm["X_cellplm"]`` and the niche read-out (each cell
   encoded from its tissue with its own counts hidden,
   ``get_latent_representation(representation="niche")``) in ``adata.obsm["X_cellplm_niche"]``;
5. scores how well a linear classifier recovers the cell type, the niche and the responder flag
   of every cell from the CellPLM embeddings (cell, niche, both), from PCA, and from PCA plus
   the mean PCA of 10 spatial neighbours, and how well a k-means clustering of each (k = number
   of niches) matches the niches (adjusted Rand index);
6. writes a figure (UMAP of the embedding; one slide's tissues, true niches and niche clusters
   of CellPLM (cell + niche) and of PCA + spatial), the AnnData and the trained model into the
   output folder, and prints what each row of the table and each panel of the figure shows.

Its console shows only its own lines and the training progress bar: the start-up chatter of
third-party libraries (docrep's docstring warnings, Lightning's hints and a torch deprecation
inside Lightning) is filtered message by message; any other warning still shows.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import scvi
import torch
from anndata import AnnData
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.spatial import cKDTree
from sklearn.metrics import adjusted_rand_score

from . import datasets, pp
from .metrics import N_FOLDS, cluster, linear_probe
from .model import CellPLM

__all__ = ["format_table", "main", "run", "spatial_mean"]

# Defaults of the command line (the README gives the measured run times and figures).
N_CELLS = 4000
N_SLIDES = 2
EPOCHS = 80
# Small tissues give more optimisation steps per epoch: on the CPU, 250-cell tissues reach a
# given embedding quality about 1.5x faster than 1000-cell ones.
MAX_CELLS = 250
SEED = 0
N_HIDDEN = 256
N_LAYERS = 2
N_LATENT = 32
N_PCS = 50
N_SPATIAL_NEIGHBORS = 10

LATENT_KEY = "X_cellplm"
NICHE_KEY = "X_cellplm_niche"
TISSUE_KEY = "cellplm_tissue"
FIGURE_NAME = "quickstart.png"
ADATA_NAME = "quickstart.h5ad"
MODEL_NAME = "model"
CLUSTER_KEY = "cellplm_niche_cluster"

# Third-party chatter that is no news to a quickstart user, silenced message by message (any
# other warning or log line still shows): filterwarnings arguments, and loggers whose INFO
# lines are hints rather than results.
_FOREIGN_WARNINGS = [
    # docrep (squidpy's docstrings) reports its own docstring keys when squidpy is imported
    {"category": SyntaxWarning, "module": r"docrep", "message": r".* is not a valid key!"},
    # torch deprecates the LeafSpec that Lightning's pytree helper still builds
    {"category": FutureWarning, "message": r"`isinstance\(treespec, LeafSpec\)` is deprecated"},
    # Lightning: fewer minibatches than its logging interval (only with a small --n-cells)
    {"category": UserWarning, "message": r"The number of training batches \(\d+\) is smaller"},
]
_FOREIGN_LOGGERS = [
    "lightning.fabric.utilities.seed",  # "Seed set to 0"
    "lightning.pytorch.utilities.rank_zero",  # "GPU available: ...", the litlogger tip
    "scvi.data.fields._arraylike_field",  # "Generating sequential column names"
]


@contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Silence :data:`_FOREIGN_WARNINGS` and the INFO lines of :data:`_FOREIGN_LOGGERS`."""
    loggers = [logging.getLogger(name) for name in _FOREIGN_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for kwargs in _FOREIGN_WARNINGS:
            warnings.filterwarnings("ignore", **kwargs)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


@_quiet_third_party()
def run(
    out_dir: str | Path = "quickstart_out",
    n_cells: int = N_CELLS,
    epochs: int = EPOCHS,
    seed: int = SEED,
    verbose: bool = True,
    *,
    n_slides: int = N_SLIDES,
    n_hidden: int = N_HIDDEN,
    n_layers: int = N_LAYERS,
    n_latent: int = N_LATENT,
    max_cells: int = MAX_CELLS,
    accelerator: str = "auto",
) -> dict[str, dict[str, float]]:
    """Run the quickstart: simulate, train CellPLM, score, plot and save.

    Parameters
    ----------
    out_dir
        Folder for ``quickstart.png``, ``quickstart.h5ad`` and the model folder ``model/``
        (created if missing; existing files are overwritten).
    n_cells
        Number of simulated cells, split evenly over ``n_slides`` slides.
    epochs
        Training epochs of CellPLM (passes over the training tissues).
    seed
        Seed of the simulation, of the model initialisation and training, of the
        cross-validation folds and of UMAP.
    verbose
        Print progress, the training progress bar and the score table.
    n_slides
        Number of simulated slides.
    n_hidden, n_layers, n_latent
        Width of the cell tokens, number of transformer layers and width of the embedding of
        :class:`~cellplm_scvi.CellPLM`.
    max_cells
        Largest tissue (:func:`cellplm_scvi.pp.assign_tissues`).
    accelerator
        Lightning accelerator for training (``"auto"``: a GPU if there is one, else the CPU).

    Returns
    -------
    The score table: for each representation (``"CellPLM"``: the cell embedding,
    ``"CellPLM niche"``: the niche read-out, ``"CellPLM cell + niche"``: both concatenated,
    ``"PCA"``, ``"PCA + spatial"``) a dict with

    - ``"cell_type_f1"``: macro-F1 of the linear probe predicting ``obs["cell_type"]``;
    - ``"niche_f1"``: macro-F1 of the linear probe predicting ``obs["niche"]``;
    - ``"responder_f1"``: F1 of the linear probe predicting the responder cells
      (``obs["responder"]``);
    - ``"niche_ari"``: adjusted Rand index between the niches and a k-means clustering of the
      representation (:func:`~cellplm_scvi.metrics.cluster`, k = number of niches);
    - ``"seconds"``: wall time to compute the representation (for CellPLM: setup, training
      and embedding).

    Examples
    --------
    >>> from cellplm_scvi.quickstart import run
    >>> scores = run("quickstart_out")
    >>> scores["CellPLM"]["niche_f1"]  # doctest: +SKIP
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else _silent
    scvi.settings.seed = seed
    # scanpy's numba kernels reset the OpenMP thread count shared with torch to all cores
    # (ignoring OMP_NUM_THREADS); training restores the count torch had at the start.
    n_threads = torch.get_num_threads()

    # 1. a spatial tissue: real PBMCs placed into simulated niches on slides
    adata = datasets.simulate_tissue(n_cells=n_cells, n_slides=n_slides, seed=seed)
    say(
        f"Simulated {adata.n_obs} cells x {adata.n_vars} genes on {n_slides} slide(s): "
        f"{adata.obs['cell_type'].nunique()} cell types in "
        f"{adata.obs['niche'].nunique()} niches."
    )

    # 2. tissues: spatially contiguous groups of at most MAX_CELLS cells of one slide
    pp.assign_tissues(adata, spatial_key="spatial", library_key="slide", max_cells=max_cells)
    sizes = adata.obs[TISSUE_KEY].value_counts()
    say(
        f"assign_tissues: {sizes.size} tissues of {sizes.min()}-{sizes.max()} cells "
        f"(adata.obs[{TISSUE_KEY!r}])."
    )

    # baselines: PCA of log1p CP10k, and PCA + mean PCA of the spatial neighbours
    t0 = time.perf_counter()
    sc.pp.normalize_total(adata, target_sum=1e4)  # adata.X; raw counts stay in layers
    sc.pp.log1p(adata)
    sc.tl.pca(adata, n_comps=min(N_PCS, adata.n_vars - 1, adata.n_obs - 1), random_state=seed)
    pca = adata.obsm["X_pca"]
    time_pca = time.perf_counter() - t0
    t0 = time.perf_counter()
    spatial = np.hstack([pca, spatial_mean(adata, pca, N_SPATIAL_NEIGHBORS)])
    time_spatial = time_pca + time.perf_counter() - t0

    # 3. CellPLM on the raw counts, one tissue per minibatch
    t0 = time.perf_counter()
    CellPLM.setup_anndata(
        adata,
        layer="counts",
        spatial_key="spatial",
        library_key="slide",
        tissue_key=TISSUE_KEY,
    )
    model = CellPLM(adata, n_hidden=n_hidden, n_layers=n_layers, n_latent=n_latent)
    say(model)
    gpu = accelerator != "cpu" and torch.cuda.is_available()
    say(f"Training for {epochs} epochs on the {'GPU' if gpu else 'CPU'}:")
    torch.set_num_threads(n_threads)
    with redirect_stdout(sys.stderr):  # the progress bar: stdout keeps the results alone
        model.train(max_epochs=epochs, accelerator=accelerator, enable_progress_bar=verbose)

    # 4. the embeddings: the cell's own, and its niche read from the rest of its tissue
    adata.obsm[LATENT_KEY] = model.get_latent_representation()
    time_cellplm = time.perf_counter() - t0
    t0 = time.perf_counter()
    adata.obsm[NICHE_KEY] = model.get_latent_representation(representation="niche", seed=seed)
    time_niche = time_cellplm + time.perf_counter() - t0
    both = np.hstack([adata.obsm[LATENT_KEY], adata.obsm[NICHE_KEY]])

    # 5. linear probes and niche clusters
    n_niches = adata.obs["niche"].nunique()
    scores, clusters = {}, {}
    for name, features, seconds in [
        ("CellPLM", adata.obsm[LATENT_KEY], time_cellplm),
        ("CellPLM niche", adata.obsm[NICHE_KEY], time_niche),
        ("CellPLM cell + niche", both, time_niche),
        ("PCA", pca, time_pca),
        ("PCA + spatial", spatial, time_spatial),
    ]:
        clusters[name] = cluster(features, n_niches, seed=seed)
        scores[name] = {
            "cell_type_f1": linear_probe(features, adata.obs["cell_type"], seed=seed),
            "niche_f1": linear_probe(features, adata.obs["niche"], seed=seed),
            "responder_f1": linear_probe(
                features, adata.obs["responder"], seed=seed, positive="True"
            ),
            "niche_ari": float(adjusted_rand_score(adata.obs["niche"], clusters[name])),
            "seconds": seconds,
        }
    adata.obs[CLUSTER_KEY] = pd.Categorical(clusters["CellPLM cell + niche"].astype(str))

    # 6. UMAP of the embedding, figure, AnnData and model
    sc.pp.neighbors(adata, use_rep=LATENT_KEY, random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    _plot(adata, clusters["CellPLM cell + niche"], clusters["PCA + spatial"], out / FIGURE_NAME)
    adata.write_h5ad(out / ADATA_NAME)
    model.save(out / MODEL_NAME, overwrite=True)

    say("")
    say(format_table(scores))
    say(_explain(out / FIGURE_NAME, pca.shape[1], n_niches))
    say(f"\nTotal {time.perf_counter() - start:.0f} s. Wrote {out / FIGURE_NAME},")
    say(f"{out / ADATA_NAME} (obsm[{LATENT_KEY!r}], obsm[{NICHE_KEY!r}], obs[{CLUSTER_KEY!r}])")
    say(f"and {out / MODEL_NAME}/.")
    return scores


def _explain(figure: Path, n_pcs: int, n_niches: int) -> str:
    """What each row of the score table and each panel of the figure shows."""
    return "\n".join(
        [
            "Rows of the table:",
            f"* CellPLM: the cell's own embedding, obsm[{LATENT_KEY!r}].",
            f"* CellPLM niche: the niche read-out, obsm[{NICHE_KEY!r}]: each cell encoded from "
            "the rest of its tissue with its own counts hidden.",
            "* CellPLM cell + niche: the two side by side.",
            f"* PCA: {n_pcs} principal components of log1p CP10k.",
            f"* PCA + spatial: PCA beside the mean PCA of the {N_SPATIAL_NEIGHBORS} nearest "
            "spatial neighbours (a spatial baseline).",
            f"Panels of {figure}:",
            f"* top: UMAP of the CellPLM cell embedding (obsm[{LATENT_KEY!r}]) by cell type and "
            "by niche; the tissues of the first slide.",
            f"* bottom, first slide: the true niches; the k-means clusters (k = {n_niches}) of "
            "CellPLM cell + niche and of PCA + spatial, each cluster named after the niche it "
            "shares most cells with ('~niche2': the cluster matched to niche2).",
        ]
    )


def spatial_mean(
    adata: AnnData,
    features: np.ndarray,
    n_neighbors: int = N_SPATIAL_NEIGHBORS,
    spatial_key: str = "spatial",
    library_key: str = "slide",
) -> np.ndarray:
    """Mean of ``features`` over the ``n_neighbors`` nearest spatial neighbours of each cell.

    Neighbours are searched within the cell's slide and exclude the cell itself.

    Parameters
    ----------
    adata
        AnnData with coordinates in ``obsm[spatial_key]`` and slides in ``obs[library_key]``.
    features
        (n_cells, n_features) values to average.
    n_neighbors
        Number of neighbours (fewer on a slide with fewer cells).
    spatial_key
        ``adata.obsm`` key of the coordinates.
    library_key
        ``adata.obs`` column of the slides.

    Returns
    -------
    (n_cells, n_features) array of neighbour means (zeros for a cell alone on its slide).
    """
    features = np.asarray(features, dtype=np.float64)
    xy = np.asarray(adata.obsm[spatial_key])[:, :2]
    out = np.zeros_like(features)
    for slide in adata.obs[library_key].unique():
        idx = np.flatnonzero((adata.obs[library_key] == slide).to_numpy())
        k = min(n_neighbors, idx.size - 1)
        if k < 1:
            continue
        _, nn = cKDTree(xy[idx]).query(xy[idx], k=k + 1)
        out[idx] = features[idx[nn[:, 1:]]].mean(axis=1)
    return out


def format_table(scores: dict[str, dict[str, float]]) -> str:
    """Format the score table returned by :func:`run` as text.

    Parameters
    ----------
    scores
        ``{representation: {"cell_type_f1": ..., "niche_f1": ..., "responder_f1": ...,
        "niche_ari": ..., "seconds": ...}}``.

    Returns
    -------
    A fixed-width table, one row per representation.
    """
    width = max(len("representation"), *map(len, scores))
    lines = [
        f"{'representation':<{width}}  cell-type F1  niche F1  responder F1  niche ARI  time (s)",
        f"{'-' * width}  ------------  --------  ------------  ---------  --------",
    ]
    for name, row in scores.items():
        lines.append(
            f"{name:<{width}}  {row['cell_type_f1']:>12.3f}  {row['niche_f1']:>8.3f}  "
            f"{row['responder_f1']:>12.3f}  {row['niche_ari']:>9.3f}  {row['seconds']:>8.1f}"
        )
    lines.append(
        f"(F1: linear probe, {N_FOLDS}-fold stratified CV, macro-F1 for cell type and niche; "
        "ARI: k-means with k = number of niches)"
    )
    return "\n".join(lines)


def _plot(
    adata: AnnData, cellplm_clusters: np.ndarray, spatial_clusters: np.ndarray, path: Path
) -> None:
    """UMAP by cell type and niche; one slide's tissues, niches and niche clusters."""
    fig = Figure(figsize=(18, 10.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for ax, key in zip(axes[0, :2], ["cell_type", "niche"]):
        title = f"UMAP of the CellPLM cell embedding ({LATENT_KEY}): {key}"
        sc.pl.umap(adata, color=key, ax=ax, show=False, frameon=False, title=title)
    slide = adata.obs["slide"].cat.categories[0]
    one = (adata.obs["slide"] == slide).to_numpy()
    xy = adata.obsm["spatial"][one]
    niche = adata.obs["niche"].to_numpy()[one]
    _spatial(axes[0, 2], xy, adata.obs[TISSUE_KEY].to_numpy()[one], f"{slide}: tissues")
    _spatial(axes[1, 0], xy, niche, f"{slide}: true niches")
    for ax, clusters, name in [
        (axes[1, 1], cellplm_clusters, "CellPLM cell + niche"),
        (axes[1, 2], spatial_clusters, "PCA + spatial"),
    ]:
        matched = _match_clusters(clusters[one], niche)
        title = f"{slide}: k-means clusters of {name}\n(~nicheN: the cluster matched to nicheN)"
        _spatial(ax, xy, matched, title)
    fig.savefig(path, dpi=110)


def _spatial(ax, xy: np.ndarray, labels: np.ndarray, title: str) -> None:
    """Scatter of the cells at their coordinates, one colour per label."""
    colors = sc.pl.palettes.default_20
    for i, label in enumerate(sorted(set(labels.astype(str)))):
        sel = labels.astype(str) == label
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colors[i % len(colors)], label=label, lw=0)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), frameon=False, markerscale=2)


def _match_clusters(clusters: np.ndarray, niches: np.ndarray) -> np.ndarray:
    """Name each cluster after the niche it overlaps most (one-to-one), for matching colours."""
    from scipy.optimize import linear_sum_assignment

    names, niche_idx = np.unique(niches.astype(str), return_inverse=True)
    overlap = np.zeros((clusters.max() + 1, names.size))
    np.add.at(overlap, (clusters, niche_idx), 1)
    rows, cols = linear_sum_assignment(-overlap)
    label = {r: f"~{names[c]}" for r, c in zip(rows, cols)}
    return np.array([label.get(c, f"cluster {c}") for c in clusters])


def _silent(*args, **kwargs) -> None:
    """Print nothing."""


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Command-line entry point: parse the arguments and call :func:`run`.

    Parameters
    ----------
    argv
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    The score table of :func:`run`.
    """
    parser = argparse.ArgumentParser(
        prog="python -m cellplm_scvi.quickstart",
        description="Train CellPLM on a simulated spatial tissue and compare it with PCA.",
    )
    parser.add_argument("--out", default="quickstart_out", help="output folder")
    parser.add_argument("--n-cells", type=int, default=N_CELLS, help="number of cells")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed")
    args = parser.parse_args(argv)
    return run(args.out, n_cells=args.n_cells, epochs=args.epochs, seed=args.seed)


if __name__ == "__main__":
    main()
