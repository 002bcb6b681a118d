"""A controlled spatial benchmark: real cells placed into simulated tissue niches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial import cKDTree

from ._pbmc import pbmc68k_counts

_SENDER_TYPE = "CD14+ Monocyte"
_N_NEIGHBORS = 10
_RESPONDER_FRACTION = 0.3
_DIRICHLET_ALPHA = 0.4
_MIN_MODULE_DETECTION = 0.1


def simulate_tissue(
    cells: AnnData | None = None,
    n_cells: int = 6000,
    n_niches: int = 5,
    n_slides: int = 2,
    n_seeds: int = 15,
    thinning: float = 0.6,
    effect: float = 1.5,
    n_module_genes: int = 20,
    label_key: str = "cell_type",
    side: float = 1000.0,
    seed: int = 0,
) -> AnnData:
    """Simulate spatial slides by placing thinned copies of real cells into niches.

    For each slide:

    1. ``n_cells / n_slides`` centroids are scattered uniformly in a ``side x side``
       square.
    2. Niches are the Voronoi regions of ``n_seeds`` random seed points. Seeds get the
       niche ids ``0 .. n_niches - 1`` in a balanced random order, so every niche occurs
       on every slide when ``n_seeds >= n_niches``.
    3. Each niche has a Dirichlet(0.4) cell-type composition, shared by all slides. A
       cell's type is drawn from the composition of its niche, and a real cell of that
       type is drawn with replacement. Its counts are binomially thinned with
       probability ``thinning``, so copies of a cell differ.
    4. A cell that is not a ``"CD14+ Monocyte"`` and has at least 30% of them among its
       10 nearest spatial neighbours is a *responder*. In responders, the counts of a
       fixed random module of ``n_module_genes`` genes (detected in >= 10% of the input
       cells) are scaled by ``effect`` in expectation: ``x + Poisson((effect - 1) x)``
       for ``effect >= 1``, ``Binomial(x, effect)`` below 1. ``effect=1`` leaves the
       counts untouched.

    Parameters
    ----------
    cells
        Real cells with integer counts in ``layers["counts"]`` (or ``X``) and labels in
        ``obs[label_key]``. Defaults to :func:`pbmc68k_counts`.
    n_cells
        Total number of simulated cells, split evenly over the slides.
    n_niches
        Number of niche types.
    n_slides
        Number of slides.
    n_seeds
        Number of Voronoi seed points per slide.
    thinning
        Binomial capture probability in ``(0, 1]`` applied to every count.
    effect
        Expected fold change of the module genes in responders (``> 0``).
    n_module_genes
        Number of genes in the responder module.
    label_key
        Column of ``cells.obs`` with the cell types.
    side
        Side length of each square slide (µm).
    seed
        Seed of the random generator; the output is deterministic for a seed.

    Returns
    -------
    AnnData
        ``n_cells`` cells x the genes of ``cells`` with ``X`` and ``layers["counts"]``
        (CSR ``float32`` integer counts), ``obsm["spatial"]`` (slide coordinates),
        ``obs`` columns ``slide``, ``niche``, ``cell_type`` (categorical),
        ``responder`` (bool) and ``source_cell`` (obs name of the copied cell), and
        ``uns["simulation"]`` with the parameters, ``module_genes`` and the niche
        compositions (``niche_composition``, rows = niches, columns = ``cell_types``).
    """
    if cells is None:
        cells = pbmc68k_counts()
    if not 0 < thinning <= 1:
        raise ValueError(f"`thinning` must be in (0, 1], got {thinning}.")
    if effect <= 0:
        raise ValueError(f"`effect` must be positive, got {effect}.")
    if min(n_cells, n_niches, n_slides, n_seeds) < 1:
        raise ValueError("`n_cells`, `n_niches`, `n_slides` and `n_seeds` must be >= 1.")
    if label_key not in cells.obs:
        raise KeyError(f"`cells.obs` has no column {label_key!r}.")

    rng = np.random.default_rng(seed)
    counts = _integer_counts(cells)
    labels = pd.Categorical(cells.obs[label_key]).remove_unused_categories()
    if (labels.codes < 0).any():
        raise ValueError(f"`cells.obs[{label_key!r}]` has missing labels.")
    cell_types = labels.categories.astype(str)
    n_types = len(cell_types)

    compositions = rng.dirichlet(np.full(n_types, _DIRICHLET_ALPHA), size=n_niches)
    detected = np.asarray((counts > 0).mean(axis=0)).ravel()
    eligible = np.flatnonzero(detected >= _MIN_MODULE_DETECTION)
    if eligible.size < n_module_genes:
        raise ValueError(
            f"Only {eligible.size} genes are detected in >= {_MIN_MODULE_DETECTION:.0%} "
            f"of cells; cannot draw a module of {n_module_genes} genes."
        )
    module = np.sort(rng.choice(eligible, size=n_module_genes, replace=False))

    # Spatial layout: coordinates, niches and per-slide neighbourhoods.
    slide_sizes = [len(chunk) for chunk in np.array_split(np.arange(n_cells), n_slides)]
    slide = np.repeat(np.arange(n_slides), slide_sizes)
    coords = rng.uniform(0.0, side, size=(n_cells, 2))
    niche = np.empty(n_cells, dtype=np.int64)
    for s in range(n_slides):
        in_slide = slide == s
        seeds = rng.uniform(0.0, side, size=(n_seeds, 2))
        seed_niche = rng.permutation(np.resize(np.arange(n_niches), n_seeds))
        niche[in_slide] = seed_niche[cKDTree(seeds).query(coords[in_slide])[1]]

    # Cell types from the niche compositions, then a random real cell of each type.
    cumulative = np.cumsum(compositions, axis=1)[niche]
    cell_type = (rng.random(n_cells)[:, None] > cumulative).sum(axis=1)
    cell_type = np.minimum(cell_type, n_types - 1)
    by_type = np.argsort(labels.codes, kind="stable")
    type_sizes = np.bincount(labels.codes, minlength=n_types)
    type_starts = np.concatenate([[0], np.cumsum(type_sizes)[:-1]])
    offset = (rng.random(n_cells) * type_sizes[cell_type]).astype(np.int64)
    source = by_type[type_starts[cell_type] + offset]

    x = counts[source]
    x.data = rng.binomial(x.data, thinning).astype(np.int64)

    # Responders: non-senders with enough senders among their spatial neighbours.
    is_sender = cell_types[cell_type] == _SENDER_TYPE
    sender_fraction = np.zeros(n_cells)
    for s in range(n_slides):
        idx = np.flatnonzero(slide == s)
        k = min(_N_NEIGHBORS + 1, idx.size)
        if k < 2:
            continue
        neighbours = cKDTree(coords[idx]).query(coords[idx], k=k)[1][:, 1:]
        sender_fraction[idx] = is_sender[idx][neighbours].mean(axis=1)
    responder = ~is_sender & (sender_fraction >= _RESPONDER_FRACTION)

    rows = np.repeat(np.arange(n_cells), np.diff(x.indptr))
    is_module = np.zeros(x.shape[1], dtype=bool)
    is_module[module] = True
    hit = responder[rows] & is_module[x.indices]
    if effect >= 1:
        x.data[hit] += rng.poisson((effect - 1.0) * x.data[hit])
    else:
        x.data[hit] = rng.binomial(x.data[hit], effect)
    x = sp.csr_matrix(x, dtype=np.float32)
    x.eliminate_zeros()

    obs = pd.DataFrame(
        {
            "slide": pd.Categorical.from_codes(slide, [f"slide{i}" for i in range(n_slides)]),
            "niche": pd.Categorical.from_codes(niche, [f"niche{i}" for i in range(n_niches)]),
            "cell_type": pd.Categorical.from_codes(cell_type, cell_types),
            "responder": responder,
            "source_cell": np.asarray(cells.obs_names[source], dtype=str),
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=cells.var_names.copy()))
    adata.layers["counts"] = x.copy()
    adata.obsm["spatial"] = coords
    adata.uns["simulation"] = {
        "n_cells": n_cells,
        "n_niches": n_niches,
        "n_slides": n_slides,
        "n_seeds": n_seeds,
        "thinning": thinning,
        "effect": effect,
        "n_module_genes": n_module_genes,
        "label_key": label_key,
        "side": side,
        "seed": seed,
        "sender_type": _SENDER_TYPE,
        "n_neighbors": _N_NEIGHBORS,
        "responder_fraction": _RESPONDER_FRACTION,
        "module_genes": np.asarray(cells.var_names[module], dtype=str),
        "cell_types": np.asarray(cell_types, dtype=str),
        "niche_composition": compositions,
    }
    return adata


def _integer_counts(cells: AnnData) -> sp.csr_matrix:
    """Return the counts of ``cells`` as an int64 CSR matrix, checking they are counts."""
    raw = cells.layers["counts"] if "counts" in cells.layers else cells.X
    counts = sp.csr_matrix(raw)
    data = counts.data
    if data.size and (data.min() < 0 or not np.allclose(data, np.rint(data))):
        raise ValueError("`cells` must hold non-negative integer counts.")
    counts = sp.csr_matrix(
        (np.rint(data).astype(np.int64), counts.indices, counts.indptr), shape=counts.shape
    )
    counts.eliminate_zeros()
    return counts
