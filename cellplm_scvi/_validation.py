"""Input checks with errors that name the argument and the fix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

_CHUNK_ROWS = 10_000
MAX_COORDINATE = 1e30  # coordinates are read as float32 (max 3.4e38) and their squares as float64


def _stored_values(x, start: int, stop: int) -> np.ndarray:
    block = x[start:stop]
    if sp.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block)


def check_counts(adata: AnnData, layer: str | None) -> None:
    """Raise ``ValueError`` unless ``adata.X`` / ``adata.layers[layer]`` holds raw counts.

    Counts must be finite, non-negative and integer-valued. Backed and large matrices are
    checked in row chunks; nothing is copied or modified.
    """
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        named = [key for key in adata.layers if key is not None]  # anndata >= 0.13 lists X as None
        raise KeyError(f"layer={layer!r} is not in adata.layers (available: {named}).")
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        raise ValueError(f"{where} is empty; pass the layer that holds raw counts.")
    if sp.issparse(x) and x.format not in ("csr", "csc"):
        x = sp.csr_matrix(x)  # row slicing needs CSR/CSC; a temporary copy
    hint = (
        f"CellPLM needs raw counts (it applies log1p itself). Pass `layer=` naming the raw-count "
        f"layer (e.g. layer='counts'), or put counts in {where}."
    )
    for start in range(0, adata.n_obs, _CHUNK_ROWS):
        values = _stored_values(x, start, start + _CHUNK_ROWS)
        if values.size == 0:
            continue
        if not np.isfinite(values).all():
            raise ValueError(f"{where} contains NaN or infinite values. {hint}")
        if (values < 0).any():
            raise ValueError(f"{where} contains negative values. {hint}")
        if not np.array_equal(values, np.round(values)):
            raise ValueError(f"{where} contains non-integer values (normalised data?). {hint}")


def check_obs_key(adata: AnnData, key: str | None, argument: str) -> None:
    """Raise ``KeyError`` if ``key`` is not an obs column; ``ValueError`` on missing values."""
    if key is None:
        return
    if key not in adata.obs:
        raise KeyError(
            f"{argument}={key!r} is not a column of adata.obs "
            f"(available: {list(adata.obs.columns)})."
        )
    if adata.obs[key].isna().any():
        raise ValueError(
            f"adata.obs[{key!r}] ({argument}) has missing values; fill or drop those cells."
        )


def check_spatial(adata: AnnData, spatial_key: str) -> None:
    """Coordinates must exist in obsm, have >= 2 columns and be finite."""
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"spatial_key={spatial_key!r} is not in adata.obsm (available: {list(adata.obsm)})."
            " Pass spatial_key=None for data without coordinates."
        )
    if not isinstance(adata.obsm[spatial_key], np.ndarray):
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must be a numpy array of shape (n_cells, 2), got a "
            f"{type(adata.obsm[spatial_key]).__name__}; convert it with .to_numpy()."
        )
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must have shape (n_cells, 2), got {coords.shape}."
        )
    bad = ~np.isfinite(coords[:, :2].astype(float)).all(1)
    if bad.any():
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] has NaN or infinite coordinates for {bad.sum()} cells; "
            "drop those cells (adata = adata[finite_mask].copy()) or fill their coordinates."
        )
    check_coordinate_range(coords[:, :2], spatial_key)


def check_coordinate_range(coords: np.ndarray, spatial_key: str) -> None:
    """Raise ``ValueError`` if finite coordinates are too large for float32 and squared distances.

    Coordinates become float32 tensors in the model and squared distances in the spatial graph,
    so values beyond :data:`MAX_COORDINATE` would overflow to infinity.
    """
    largest = float(np.abs(np.asarray(coords, dtype=np.float64)).max(initial=0.0))
    if largest > MAX_COORDINATE:
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] (spatial_key) has coordinates up to {largest:.3g}; they "
            f"must be at most {MAX_COORDINATE:.0e} in absolute value (they are read as float32). "
            f"Rescale them, e.g. adata.obsm[{spatial_key!r}] = adata.obsm[{spatial_key!r}] / "
            f"{10 ** np.floor(np.log10(largest)):.0e} (tissues depend on relative positions only)."
        )


def check_batch_size(batch_size, argument: str = "batch_size") -> int | None:
    """``None`` or a positive integer (cells per forward pass or training step)."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(
            f"{argument} must be a positive integer (cells per step) or None (whole tissues), "
            f"got {batch_size!r}."
        )
    if batch_size < 1:
        raise ValueError(
            f"{argument} must be a positive integer (cells per step) or None (whole tissues), "
            f"got {batch_size}."
        )
    return int(batch_size)


def check_indices(indices, n_obs: int) -> np.ndarray:
    """Row positions (int64) from ``None`` (all rows), integer positions or a boolean mask.

    Raises ``ValueError`` for an empty selection, non-integer values (``2.5`` would silently
    become row 2) and positions outside ``[0, n_obs)``.
    """
    if indices is None:
        return np.arange(n_obs)
    indices = np.asarray(indices)
    if indices.dtype == bool:
        if indices.shape != (n_obs,):
            raise ValueError(
                f"A boolean indices mask must have one entry per cell ({n_obs}), got shape "
                f"{indices.shape}."
            )
        indices = np.flatnonzero(indices)
    elif indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"indices must be integer row positions or a boolean mask, got {indices.dtype} "
            f"values (e.g. {indices.reshape(-1)[:3].tolist()}); convert them with "
            "np.asarray(indices, dtype=int) if they are whole numbers."
        )
    if indices.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {indices.shape}.")
    if indices.size == 0:
        raise ValueError(
            "indices selects no cell; pass at least one row position (indices=None: all cells)."
        )
    if indices.min() < 0 or indices.max() >= n_obs:
        raise ValueError(f"indices must be row positions in [0, {n_obs}).")
    return indices.astype(np.int64, copy=False)


def check_drop_node_rate(drop_node_rate: float) -> float:
    """The fraction of a tissue's cells left out per training step: a number in ``[0, 1)``."""
    if isinstance(drop_node_rate, bool) or not isinstance(drop_node_rate, int | float | np.number):
        raise ValueError(f"drop_node_rate must be a number in [0, 1), got {drop_node_rate!r}.")
    if not 0 <= drop_node_rate < 1:
        raise ValueError(
            f"drop_node_rate must be in [0, 1) (the fraction of a tissue's cells left out at "
            f"each training step; 0: none), got {drop_node_rate}."
        )
    return float(drop_node_rate)


def check_predict_options(use_posterior_mean: bool, integrated_gradients, dataloader) -> None:
    """Refuse ``predict`` arguments of ``SCANVI.predict`` that have no CellPLM meaning."""
    if not use_posterior_mean:
        raise ValueError(
            "use_posterior_mean=False has no meaning here: CellPLM's head classifies the "
            "deterministic pre-latent state, not a latent sample."
        )
    if integrated_gradients:
        raise ValueError("Integrated-gradient interpretability is not available for CellPLM.")
    if dataloader is not None:
        raise ValueError("Pass adata/indices instead of a dataloader.")


def check_loader_options(drop_last, load_sparse_tensor, data_and_attributes) -> None:
    """Refuse scvi-tools data-loader options that a tissue loader cannot honour.

    A tissue minibatch holds a whole tissue (its size is the tissue's), its counts are always
    a sparse CSR tensor (``load_sparse_tensor``: ``None`` or ``True``; this is the one check of
    it, for ``train``, the splitter and the loader) and every registered field is read (the
    module needs the tissue codes).
    """
    if drop_last:
        raise ValueError(
            f"drop_last={drop_last!r} is not supported: a CellPLM minibatch is one tissue, of its "
            "own size, so there is no incomplete last batch to drop. Leave drop_last out; to "
            "leave small tissues out, subset adata before setup_anndata."
        )
    if load_sparse_tensor is not None and not isinstance(load_sparse_tensor, bool | np.bool_):
        raise ValueError(
            f"load_sparse_tensor must be a bool, got {load_sparse_tensor!r} (CellPLM always "
            "loads counts as sparse tensors)."
        )
    if load_sparse_tensor is not None and not load_sparse_tensor:
        raise ValueError(
            "load_sparse_tensor=False is not supported: CellPLM always reads counts as a sparse "
            "CSR tensor (the embedder sums over each cell's stored genes). Leave "
            "load_sparse_tensor out (or pass True)."
        )
    if data_and_attributes is not None:
        raise ValueError(
            "data_and_attributes is not supported: CellPLM's loader reads every registered field "
            "(the module needs the tissue codes and coordinates). Leave it out."
        )


def check_counts_sample(
    adata: AnnData, layer: str | None, n_rows: int = 100, seed: int | None = None
) -> None:
    """:func:`check_counts` on ``n_rows`` randomly chosen cells (all cells if fewer).

    For checks that run on every call on possibly large data (``train()``), as scvi-tools'
    ``_check_nonnegative_integers`` samples: only the sampled rows are read. The draw uses
    its own generator, so NumPy's and torch's global random states are untouched.
    """
    n_rows = min(n_rows, adata.n_obs)
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, size=n_rows, replace=False))
    try:
        check_counts(adata[rows], layer)  # a view: only the sampled rows are read
    except ValueError as err:
        raise ValueError(
            f"{err} (Found in {n_rows} cells sampled at train(): were the registered counts "
            "replaced after setup_anndata, e.g. by normalised values?)"
        ) from None
