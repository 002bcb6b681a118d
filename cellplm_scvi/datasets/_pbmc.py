"""Raw counts of scanpy's bundled ``pbmc68k_reduced`` dataset (works offline)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

# ``raw.X`` is stored with three decimals, so recovered counts are not exact integers;
# the largest deviation observed for the shipped file is ~0.08.
_MAX_ROUNDING_ERROR = 0.25
_TARGET_SUM = 1e4


def pbmc68k_counts() -> AnnData:
    """Integer raw counts of the 700 labelled PBMCs bundled with scanpy.

    ``sc.datasets.pbmc68k_reduced()`` ships scaled data in ``.X`` and
    ``log1p`` CP10k data in ``.raw``. The raw counts are recovered exactly as
    ``round(expm1(raw.X) * n_counts / 1e4)`` for all 765 genes of ``.raw``.

    Returns
    -------
    AnnData
        700 cells x 765 genes with

        - ``X`` and ``layers["counts"]``: the counts, CSR ``float32`` holding integers;
        - ``obs["cell_type"]``: categorical, from ``bulk_labels`` (10 types);
        - ``obs["n_counts"]``: the original library size. It counts all genes of the
          full dataset, so it is larger than the row sums of ``X``;
        - ``var_names``: gene symbols.

    Raises
    ------
    ValueError
        If the recovered values are not close to integers, i.e. the bundled file is
        not the one this recovery formula was written for.
    """
    adata = sc.datasets.pbmc68k_reduced()
    if adata.raw is None:
        raise ValueError("pbmc68k_reduced has no `.raw`; cannot recover counts.")
    n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float64)

    lognorm = sp.csr_matrix(adata.raw.X, dtype=np.float64)
    lognorm.data = np.expm1(lognorm.data)
    counts = sp.csr_matrix(sp.diags(n_counts / _TARGET_SUM) @ lognorm)
    rounded = np.rint(counts.data)
    deviation = float(np.abs(counts.data - rounded).max(initial=0.0))
    if deviation > _MAX_ROUNDING_ERROR or (rounded < 0).any():
        raise ValueError(
            f"Count recovery from pbmc68k_reduced failed: values deviate from integers "
            f"by up to {deviation:.3f} (tolerance {_MAX_ROUNDING_ERROR})."
        )
    counts.data = rounded.astype(np.float32)
    counts.eliminate_zeros()
    counts.sort_indices()

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(adata.obs["bulk_labels"]),
            "n_counts": n_counts.astype(np.float32),
        },
        index=adata.obs_names.copy(),
    )
    var = pd.DataFrame(index=pd.Index(adata.raw.var_names.astype(str)))
    out = AnnData(X=counts, obs=obs, var=var)
    out.layers["counts"] = counts.copy()
    return out
