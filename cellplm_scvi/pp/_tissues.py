"""Cut cells into tissue-sized groups ("sentences") for CellPLM.

A CellPLM minibatch is one tissue: a group of cells that attend to each other. With spatial
coordinates a tissue is a spatially contiguous patch of at most ``max_cells`` cells of one slide;
without coordinates it is a whole sample (as in the official zero-shot pipeline) or, with a cap,
a random chunk of one sample.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .._validation import check_coordinate_range

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["assign_tissues", "random_chunks"]


def random_chunks(
    groups: np.ndarray, max_cells: int, seed: int = 0, keys: np.ndarray | None = None
) -> np.ndarray:
    """Split every group of cells into random chunks of nearly equal size.

    A group of ``n`` cells is cut into ``ceil(n / max_cells)`` chunks whose sizes differ by at
    most one (1001 cells with ``max_cells=1000`` give 501 + 500, never 1000 + 1).

    Parameters
    ----------
    groups
        One label per cell (any sortable dtype, e.g. integer sample codes).
    max_cells
        Largest allowed chunk size.
    seed
        Seed of the random assignment of cells to chunks.
    keys
        Unique name per cell (e.g. ``obs_names``). When given, the chunks depend on the names,
        not on the row order: a row-permuted AnnData gets the same chunks.

    Returns
    -------
    Integer chunk id per cell, ``0 .. n_chunks - 1``, ordered by group (sorted labels) and then
    by chunk. Every chunk lies inside one group.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"`groups` must be one-dimensional, got shape {groups.shape}.")
    if max_cells < 1:
        raise ValueError(f"`max_cells` must be >= 1, got {max_cells}.")
    n = groups.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, codes = np.unique(groups, return_inverse=True)
    codes = codes.ravel()
    sizes = np.bincount(codes)
    n_chunks = -(-sizes // max_cells)  # ceil
    # random order inside each group: shuffle, then stable sort by group
    canonical = np.arange(n) if keys is None else np.argsort(np.asarray(keys), kind="stable")
    order = canonical[np.random.default_rng(seed).permutation(n)]
    order = order[np.argsort(codes[order], kind="stable")]
    starts = np.cumsum(sizes) - sizes
    rank = np.arange(n) - starts[codes[order]]
    local = rank * n_chunks[codes[order]] // sizes[codes[order]]
    offsets = np.cumsum(n_chunks) - n_chunks
    out = np.empty(n, dtype=np.int64)
    out[order] = offsets[codes[order]] + local
    return out


def assign_tissues(
    adata: AnnData,
    spatial_key: str | None = "spatial",
    library_key: str | None = None,
    batch_key: str | None = None,
    max_cells: int | None = None,
    n_neighs: int = 6,
    key_added: str = "cellplm_tissue",
    seed: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Assign every cell to one tissue (a group of cells that attend to each other).

    **With coordinates** (``adata.obsm[spatial_key]``; the first two columns are used), each
    slide is cut into spatially contiguous groups:

    1. build the squidpy kNN spatial graph (``n_neighs`` neighbours, no edges across slides)
       and symmetrise it;
    2. recursive coordinate bisection: split a group at the median of its widest axis until
       it has at most ``max_cells`` cells (balanced: leaves hold more than ``max_cells / 2``
       cells unless the slide is smaller);
    3. split every group into the connected components of its induced subgraph;
    4. merge components smaller than ``max(2, max_cells // 10)`` cells into the adjacent group
       they share most edges with, as long as the merged group has at most ``max_cells``.

    Every group is connected in the symmetrised graph. Exceptions to "no tiny groups": a small
    component stays on its own when it has no edge to another group (a slide, or a piece of a
    slide, that is disconnected in the kNN graph) or when every adjacent group is too full to
    take it. Slides with at most ``n_neighs`` cells use the complete graph (kNN with
    ``k = n_cells - 1``). Cells at exactly the same position are also chained together in
    the graph, so repeated coordinates still give whole tissues. A ``UserWarning`` says when
    over 5% of the cells of multi-cell slides are alone in their tissue (without context).
    The result does not depend on ``seed``.

    **Without coordinates** (``spatial_key=None``), each sample (each ``batch_key`` value, within
    each ``library_key`` value; all cells when neither is given) is one tissue, as in the official
    ``CellEmbeddingPipeline``, which embeds each ``obs["batch"]`` value in one pass. Training
    subsamples tissues larger than ``max_cells_per_step`` (see :meth:`CellPLM.train`), so a
    large sample costs no more memory per step. With an integer ``max_cells``, samples larger
    than it are cut into random chunks of nearly equal size (see :func:`random_chunks`), seeded
    by ``seed``: a cap for samples too large to embed in one pass (the memory of a forward pass
    grows linearly with the cells of a tissue).

    In both modes, a group never spans two values of ``library_key`` or of ``batch_key`` (when
    given). So if slides are identified by ``batch_key`` only, pass it: coordinates of different
    slides often overlap.

    Parameters
    ----------
    adata
        Annotated data matrix.
    spatial_key
        Key in ``adata.obsm`` with spatial coordinates, shape ``(n_obs, >=2)``. ``None``: no
        coordinates, group cells by ``batch_key``.
    library_key
        Column of ``adata.obs`` with the slide (or sample) of each cell. Groups and graph edges
        never cross slides. ``None``: all cells are on one slide.
    batch_key
        Column of ``adata.obs`` with the sample of each cell; used to group cells when there
        are no coordinates, and never crossed by a group. ``None``: all cells are one sample.
    max_cells
        Largest allowed number of cells in a tissue (an integer, at least 2). ``None`` (the
        default): 1000 with coordinates; no limit without, so each sample is one tissue.
    n_neighs
        Number of neighbours of the squidpy kNN spatial graph.
    key_added
        Name of the ``adata.obs`` column and ``adata.uns`` entry written.
    seed
        Random seed of the chunks of the no-coordinate mode with ``max_cells``. The spatial
        and whole-sample modes are deterministic.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with

    - ``.obs[key_added]``: categorical tissue labels ``"<slide>/<k>"`` (``"<sample>/<k>"``;
      ``"<slide>/<sample>/<k>"`` when both keys are given; ``"all/<k>"`` when neither is);
    - ``.uns[key_added]["params"]``: the parameters used (``max_cells`` as applied: 1000 for
      the spatial default, ``None`` for whole samples) and the ``method``
      (``"bisect+components"``, ``"whole_samples"`` or ``"random_chunks"``).

    Nothing else in ``adata`` is modified (the spatial graph is not stored).

    Examples
    --------
    >>> import cellplm_scvi
    >>> cellplm_scvi.pp.assign_tissues(adata, spatial_key="spatial", library_key="slide")
    >>> adata.obs["cellplm_tissue"].value_counts().max() <= 1000
    True
    >>> cellplm_scvi.pp.assign_tissues(scrna, spatial_key=None, batch_key="sample")
    >>> scrna.obs["cellplm_tissue"].nunique() == scrna.obs["sample"].nunique()
    True
    """
    if adata.n_obs == 0:
        raise ValueError("`adata` has no cells; cannot assign tissues to an empty AnnData.")
    if max_cells is None and spatial_key is not None:
        max_cells = 1000
    if max_cells is not None and (
        isinstance(max_cells, bool) or not isinstance(max_cells, int | np.integer)
    ):
        raise TypeError(f"`max_cells` must be an integer, got {max_cells!r}.")
    if max_cells is not None and max_cells < 2:
        raise ValueError(
            f"`max_cells` must be >= 2 (a tissue needs at least two cells), got {max_cells}."
        )
    if isinstance(n_neighs, bool) or not isinstance(n_neighs, int | np.integer) or n_neighs < 1:
        raise ValueError(f"`n_neighs` must be a positive integer, got {n_neighs!r}.")

    strata, strata_names = _strata(adata, library_key, batch_key)
    if spatial_key is not None:
        xy = _coordinates(adata, spatial_key)
        groups = _spatial_groups(xy, strata, max_cells=int(max_cells), n_neighs=int(n_neighs))
        _warn_one_cell_tissues(groups, strata, spatial_key)
        method = "bisect+components"
    elif max_cells is None:
        groups, method = strata.copy(), "whole_samples"  # one tissue per sample
    else:
        groups = random_chunks(strata, int(max_cells), seed=seed, keys=adata.obs_names.to_numpy())
        method = "random_chunks"
    labels = _labels(groups, strata, strata_names)

    if copy:
        adata = adata.copy()
    adata.obs[key_added] = labels
    adata.uns[key_added] = {
        "params": {
            "spatial_key": spatial_key,
            "library_key": library_key,
            "batch_key": batch_key,
            "max_cells": None if max_cells is None else int(max_cells),
            "n_neighs": int(n_neighs),
            "seed": int(seed),
            "method": method,
        }
    }
    return adata if copy else None


# ------------------------------------------------------------------------------------ helpers


def _strata(
    adata: AnnData, library_key: str | None, batch_key: str | None
) -> tuple[np.ndarray, list[str]]:
    """Integer code per cell for each observed (library, batch) combination, and its name."""
    keys = [k for k in (library_key, batch_key) if k is not None]
    if not keys:
        return np.zeros(adata.n_obs, dtype=np.int64), ["all"]
    codes, cats = [], []
    for name, key in zip(("library_key", "batch_key"), (library_key, batch_key)):
        if key is None:
            continue
        if key not in adata.obs.columns:
            cols = ", ".join(map(repr, list(adata.obs.columns)[:20])) or "none"
            raise KeyError(
                f"`{name}={key!r}` is not a column of `adata.obs` (columns: {cols}). Pass an "
                f"existing column or `{name}=None`."
            )
        col = adata.obs[key]
        n_na = int(col.isna().sum())
        if n_na:
            raise ValueError(
                f"`adata.obs[{key!r}]` (`{name}`) has {n_na} missing value(s). Fill them (e.g. "
                f"with an 'unknown' category) or drop those cells."
            )
        cat = pd.Categorical(col)
        codes.append(cat.codes.astype(np.int64))
        cats.append(cat.categories)
    uniq, strata = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
    names = ["/".join(str(c[i]) for c, i in zip(cats, row)) for row in uniq]
    return strata.ravel().astype(np.int64), names


def _coordinates(adata: AnnData, spatial_key: str) -> np.ndarray:
    if spatial_key not in adata.obsm:
        keys = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise KeyError(
            f"`spatial_key={spatial_key!r}` is not in `adata.obsm` (keys: {keys}). Pass the "
            f"key of the coordinates, or `spatial_key=None` to group cells without coordinates."
        )
    xy = adata.obsm[spatial_key]
    xy = np.asarray(xy.toarray() if sp.issparse(xy) else xy)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(
            f"`adata.obsm[{spatial_key!r}]` must have shape (n_obs, 2) or more columns, got "
            f"{xy.shape}."
        )
    try:
        xy = xy[:, :2].astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`adata.obsm[{spatial_key!r}]` must be numeric.") from e
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise ValueError(
            f"`adata.obsm[{spatial_key!r}]` (`spatial_key`) has {int(bad.sum())} cell(s) with "
            f"NaN or infinite coordinates. Drop those cells (e.g. "
            f"`adata = adata[np.isfinite(adata.obsm[{spatial_key!r}]).all(1)].copy()`) or fill "
            f"their coordinates."
        )
    check_coordinate_range(xy, spatial_key)
    return xy


def _warn_one_cell_tissues(groups: np.ndarray, strata: np.ndarray, spatial_key: str) -> None:
    """Warn when over 5% of the cells of multi-cell slides end up alone in their tissue: they
    would be embedded without context (a one-cell slide is a one-cell tissue, no warning)."""
    alone = (np.bincount(groups)[groups] == 1) & (np.bincount(strata)[strata] > 1)
    n_alone = int(alone.sum())
    if n_alone >= 2 and n_alone > 0.05 * len(groups):
        warnings.warn(
            f"assign_tissues: {n_alone} of {len(groups)} cells are alone in their tissue (no "
            f"spatial neighbour within their slide), so the model sees them without context. "
            f"Check adata.obsm[{spatial_key!r}] (the spatial_key), pass library_key so that "
            "each slide is cut on its own, or use spatial_key=None to group cells by sample.",
            UserWarning,
            stacklevel=3,
        )


@contextmanager
def _without_info(logger_name: str):
    """Hide a dependency's INFO lines about a call the user did not make (warnings still show).

    squidpy logs "Creating graph using ... transform" through spatialdata's logger on every
    graph it builds; here that graph is an internal step of :func:`assign_tissues`. A filter
    drops the calling thread's records below WARNING: the logger's level is not touched, so
    other threads' lines still show and concurrent calls cannot restore a wrong level.
    """
    logger = logging.getLogger(logger_name)
    thread = threading.get_ident()

    def keep(record: logging.LogRecord) -> bool:  # runs in the thread that logs
        return record.levelno >= logging.WARNING or threading.get_ident() != thread

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _spatial_graph(xy: np.ndarray, strata: np.ndarray, n_neighs: int) -> sp.csr_matrix:
    """Symmetric binary kNN graph without self loops and without edges across strata."""
    import anndata as ad

    from .._quiet import quiet_squidpy_import

    with quiet_squidpy_import():  # docrep's SyntaxWarnings about squidpy's docstrings
        import squidpy as sq

    n = xy.shape[0]
    sizes = np.bincount(strata)
    big = sizes[strata] > n_neighs
    rows, cols = [], []
    if big.any():
        idx = np.flatnonzero(big)
        tmp = ad.AnnData(
            obs=pd.DataFrame(
                {"lib": pd.Categorical(strata[idx])}, index=pd.RangeIndex(idx.size).astype(str)
            ),
            obsm={"spatial": xy[idx]},
        )
        with _without_info("spatialdata._logging"):
            if hasattr(sq.gr, "spatial_neighbors_knn"):
                res = sq.gr.spatial_neighbors_knn(
                    tmp, spatial_key="spatial", library_key="lib", n_neighs=n_neighs, copy=True
                )
            else:  # squidpy < 1.7
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    res = sq.gr.spatial_neighbors(
                        tmp,
                        spatial_key="spatial",
                        library_key="lib",
                        coord_type="generic",
                        n_neighs=n_neighs,
                        copy=True,
                    )
        knn = sp.coo_matrix(res[0])
        rows.append(idx[knn.row])
        cols.append(idx[knn.col])
    if not big.all():
        # strata with <= n_neighs cells: kNN with k = n - 1 is the complete graph
        small = np.flatnonzero(~big)
        small = small[np.argsort(strata[small], kind="stable")]
        s = strata[small]
        reps = sizes[s]
        first = np.searchsorted(s, s)  # position of the stratum's first cell in `small`
        offs = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        rows.append(np.repeat(small, reps))
        cols.append(small[np.repeat(first, reps) + offs])
    same_r, same_c = _same_position_edges(xy, strata)
    r, c = np.concatenate([*rows, same_r]), np.concatenate([*cols, same_c])
    keep = r != c
    r, c = r[keep], c[keep]
    g = sp.csr_matrix(
        (np.ones(2 * r.size, dtype=np.int8), (np.r_[r, c], np.r_[c, r])), shape=(n, n)
    )
    g.data[:] = 1
    return g


def _same_position_edges(xy: np.ndarray, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges chaining the cells of one stratum at exactly the same position, in cell order.

    A kNN graph among many identical points is arbitrary (every cell has the same distance
    to all of them, so most pick the same few neighbours) and would leave most of them without
    an edge inside their bisection leaf: one-cell tissues. The bisection splits identical points
    by cell order, so a chain in cell order keeps each leaf's share of them connected.
    """
    order = np.lexsort((xy[:, 1], xy[:, 0], strata))  # stable: ties keep cell order
    before, after = order[:-1], order[1:]
    chained = (strata[after] == strata[before]) & (xy[after] == xy[before]).all(axis=1)
    return before[chained], after[chained]


def _bisect(xy: np.ndarray, labels: np.ndarray, max_cells: int) -> np.ndarray:
    """Recursive coordinate bisection, vectorised over all groups of one level.

    Each group is cut across its widest axis at the quantile that leaves both sides divisible
    into about equal groups of at most ``max_cells`` (the median when two groups suffice).
    """
    labels = labels.copy()
    while True:
        sizes = np.bincount(labels)
        big = sizes > max_cells
        if not big.any():
            return labels
        sel = np.flatnonzero(big[labels])
        sel = sel[np.argsort(labels[sel], kind="stable")]
        lab = labels[sel]
        pts = xy[sel]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        gsize = np.diff(np.r_[starts, lab.size])
        gidx = np.repeat(np.arange(starts.size), gsize)
        span = np.maximum.reduceat(pts, starts, axis=0) - np.minimum.reduceat(pts, starts, axis=0)
        axis = (span[:, 1] > span[:, 0]).astype(np.int64)
        key = pts[np.arange(sel.size), axis[gidx]]
        order = np.lexsort((key, gidx))  # stable: ties keep cell order
        rank = np.arange(sel.size) - starts[gidx[order]]
        # split where the parts can be cut into groups of <= max_cells of similar size
        n_parts = -(-gsize // max_cells)
        cut = (gsize * (n_parts // 2)) // n_parts
        right = rank >= cut[gidx[order]]
        new = labels * 2
        new[sel[order]] += right
        labels = np.unique(new, return_inverse=True)[1].ravel()


def _spatial_groups(
    xy: np.ndarray, strata: np.ndarray, max_cells: int, n_neighs: int
) -> np.ndarray:
    graph = _spatial_graph(xy, strata, n_neighs)
    # bisect a little below the cap, so that stray fragments can still be merged into a group
    leaves = _bisect(xy, strata, max(2, int(0.9 * max_cells)))

    # connected components of each leaf's induced subgraph
    coo = graph.tocoo()
    r, c = coo.row, coo.col
    intra = leaves[r] == leaves[c]
    n = xy.shape[0]
    sub = sp.csr_matrix((np.ones(int(intra.sum()), np.int8), (r[intra], c[intra])), shape=(n, n))
    _, comp = connected_components(sub, directed=False)
    r, c = r[~intra], c[~intra]  # candidate merge edges (never across strata)

    # merge small components into the adjacent group sharing most edges, within the cap
    min_size = max(2, max_cells // 10)
    while True:
        sizes = np.bincount(comp)
        n_comp = sizes.size
        cr, cc = comp[r], comp[c]
        m = (cr != cc) & (sizes[cr] < min_size) & (sizes[cr] + sizes[cc] <= max_cells)
        if not m.any():
            break
        pairs, counts = np.unique(cr[m] * n_comp + cc[m], return_counts=True)
        a, b = np.divmod(pairs, n_comp)
        o = np.lexsort((b, sizes[b], -counts, a))  # most edges, then smallest, then lowest id
        a, b = a[o], b[o]
        first = np.r_[True, a[1:] != a[:-1]]
        a, b = a[first], b[first]
        o = np.lexsort((a, sizes[a]))  # smallest components first
        parent = np.arange(n_comp)
        cur = sizes.copy()
        merged = 0
        for ai, bi in zip(a[o].tolist(), b[o].tolist()):
            ra, rb = _find(parent, ai), _find(parent, bi)
            if ra != rb and cur[ra] + cur[rb] <= max_cells:
                parent[ra] = rb
                cur[rb] += cur[ra]
                merged += 1
        if merged == 0:
            break
        while True:  # flatten the union-find forest
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        comp = np.unique(parent[comp], return_inverse=True)[1].ravel()

    # order groups by their first bisection leaf (stratum-major), then by first cell
    order = np.lexsort((np.arange(n), leaves))
    first_pos = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first_pos, comp[order], np.arange(n))
    rank = np.empty_like(first_pos)
    rank[np.argsort(first_pos)] = np.arange(first_pos.size)
    return rank[comp]


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


def _labels(groups: np.ndarray, strata: np.ndarray, strata_names: list[str]) -> pd.Categorical:
    """Categorical ``"<stratum>/<k>"`` labels; ``groups`` are ordered stratum-major."""
    n_groups = int(groups.max()) + 1
    g_stratum = np.zeros(n_groups, dtype=np.int64)
    g_stratum[groups] = strata
    # groups are numbered stratum-major, so sort is a no-op unless a caller breaks that
    order = np.lexsort((np.arange(n_groups), g_stratum))
    g_stratum = g_stratum[order]
    starts = np.searchsorted(g_stratum, g_stratum)
    k = np.arange(n_groups) - starts
    names = [f"{strata_names[s]}/{j}" for s, j in zip(g_stratum.tolist(), k.tolist())]
    new_code = np.empty(n_groups, dtype=np.int64)
    new_code[order] = np.arange(n_groups)
    return pd.Categorical.from_codes(new_code[groups], categories=names)
