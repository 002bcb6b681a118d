"""Input checks with errors that name the argument and the fix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

_CHUNK_ROWS = 10_000


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
