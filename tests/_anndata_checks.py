"""Shared test helpers: make an AnnData look new to scvi-tools, and check it was not modified."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

SCVI_UNS = frozenset({"_scvi_uuid", "_scvi_manager_uuid"})
CELLPLM_OBS = frozenset({"cellplm_tissue", "_cellplm_tissue_code", "_cellplm_indices"})
SCVI_OBS = frozenset({"_scvi_batch", "_scvi_labels"})  # scvi-tools' categorical obs fields


def unregistered(adata: ad.AnnData) -> ad.AnnData:
    """A copy that scvi-tools sees as a new AnnData (no scvi uuids)."""
    out = adata.copy()
    for key in SCVI_UNS:
        out.uns.pop(key, None)
    return out


def dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def snapshot(adata: ad.AnnData) -> dict:
    """Copies of everything a call must leave alone."""
    return {
        "X": None if adata.X is None else adata.X.copy(),
        "layers": {k: v.copy() for k, v in adata.layers.items()},
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": set(adata.uns),
    }


def assert_matrix_unchanged(before, after, where: str) -> None:
    if before is None:
        assert after is None, where
        return
    assert type(after) is type(before), f"{where}: type changed"
    assert after.dtype == before.dtype, f"{where}: dtype changed"
    if sp.issparse(before):
        assert after.format == before.format, f"{where}: sparse format changed"
    np.testing.assert_array_equal(dense(after), dense(before), err_msg=where)


def assert_data_unchanged(adata: ad.AnnData, snap: dict) -> None:
    """X, layers and obsm are identical to the snapshot (NaN compares equal to NaN)."""
    assert_matrix_unchanged(snap["X"], adata.X, "X")
    assert set(adata.layers) == set(snap["layers"])
    for key, value in snap["layers"].items():
        assert_matrix_unchanged(value, adata.layers[key], f"layers[{key!r}]")
    assert set(adata.obsm) == set(snap["obsm"])
    for key, value in snap["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[key]), value, err_msg=key)
