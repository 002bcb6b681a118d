"""Minified AnnData (scvi-tools' recipe) for CellPLM: :class:`MinifyMixin`, :func:`is_minified`."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scvi.data._constants import _ADATA_MINIFY_TYPE_UNS_KEY


def is_minified(adata: AnnData) -> bool:
    """Whether ``adata`` is a minified AnnData (``minify_adata``'s, or one loaded from it)."""
    return adata.uns.get(_ADATA_MINIFY_TYPE_UNS_KEY) is not None


class MinifyMixin:
    """``minify_adata`` with each cell's posterior computed in its whole tissue."""

    def minify_adata(
        self,
        minified_data_type: str = "latent_posterior_parameters",
        use_latent_qzm_key: str = "X_latent_qzm",
        use_latent_qzv_key: str = "X_latent_qzv",
    ) -> None:
        """Replace the model's AnnData by a minified one (scvi-tools' recipe): the posterior of
        each cell, computed in its whole tissue, and CellPLM's library size (observed counts of
        its measured decoded genes) replace the counts.

        If ``adata.obsm[use_latent_qzm_key]``/``[use_latent_qzv_key]`` are missing they are
        computed with ``get_latent_representation(return_dist=True)`` and stored there. Then
        ``get_normalized_expression``, ``differential_expression`` and
        ``get_latent_representation`` work without counts; ``predict``, ``impute_genes``,
        ``get_elbo`` and friends raise.
        """
        from scvi.data._constants import ADATA_MINIFY_TYPE
        from scvi.model.utils import get_minified_adata_scrna

        if minified_data_type not in ADATA_MINIFY_TYPE:
            raise ValueError(f"minified_data_type must be one of {list(ADATA_MINIFY_TYPE)}.")
        if self.minified_data_type is not None:
            raise ValueError("The model's AnnData is already minified.")
        if use_latent_qzm_key not in self.adata.obsm or use_latent_qzv_key not in self.adata.obsm:
            qzm, qzv = self.get_latent_representation(return_dist=True)
            self.adata.obsm[use_latent_qzm_key], self.adata.obsm[use_latent_qzv_key] = qzm, qzv
        library = self.get_latent_library_size().reshape(-1)
        keep_counts = minified_data_type == ADATA_MINIFY_TYPE.LATENT_POSTERIOR_WITH_COUNTS
        mini = get_minified_adata_scrna(self.adata_manager, keep_count_data=keep_counts)
        mini.uns.pop("_scvi_uuid", None)
        mini.uns[_ADATA_MINIFY_TYPE_UNS_KEY] = minified_data_type
        mini.obsm[self._LATENT_QZM_KEY] = self.adata.obsm[use_latent_qzm_key]
        mini.obsm[self._LATENT_QZV_KEY] = self.adata.obsm[use_latent_qzv_key]
        mini.obs[self._OBSERVED_LIB_SIZE_KEY] = np.rint(library).astype(np.int64)  # as scvi-tools
        self._update_adata_and_manager_post_minification(mini, minified_data_type)
        self.module.minified_data_type = minified_data_type

    def _refuse_minified(self, method: str) -> None:
        """Raise for ``method``, which needs counts, on a minified AnnData."""
        if self.minified_data_type is not None:
            raise ValueError(
                f"{method} needs counts and the tissue context, which a minified AnnData has not. "
                "Load the model with the full AnnData: CellPLM.load(dir_path, adata=full_adata)."
            )
