"""Where scvi-tools' mixin methods meet tissues.

scvi-tools' ``RNASeqMixin`` and ``VAEMixin`` iterate a data loader, concatenate the per-minibatch
results and label them ``obs_names[indices]``. For CellPLM a minibatch is a whole tissue, so:

- :meth:`TissueContextMixin._make_data_loader` reads every tissue that holds a requested cell
  *whole* (the context is the tissue as registered, never the subset asked for) and marks the
  requested rows; the module returns those rows only;
- each thin override below calls the mixin with ``indices`` in the loader's emission order and
  puts the result back in the caller's order;
- every loader carries the AnnData's :class:`~cellplm_scvi._vocabulary.GeneLayout` (how its
  columns meet the model's vocabulary) in each minibatch, so any method that reads through
  :meth:`TissueContextMixin._make_data_loader` reads the columns right.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._validation import check_batch_size, check_indices
from .._vocabulary import GeneLayout
from ..data import TissueDataLoader
from . import _registry_data

_AUTOCAST = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


def _autocast(device: torch.device, precision: str):
    if precision not in _AUTOCAST:
        raise ValueError(f"precision must be one of {list(_AUTOCAST)}, got {precision!r}.")
    if precision == "32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


def _precision(module, precision: str):
    """Context of an inference ``precision``: ``"int8"`` (CPU: the encoder's Linear layers as
    int8, see :mod:`cellplm_scvi.nn._int8`), else :func:`torch.autocast` (``"32"``: none)."""
    if precision == "int8":
        return module.int8_inference()
    if precision not in _AUTOCAST:
        raise ValueError(f"precision must be one of {[*_AUTOCAST, 'int8']}, got {precision!r}.")
    return _autocast(next(module.parameters()).device, precision)


class TissueContextMixin:
    """Tissue-context data loading and caller-order results for scvi-tools' mixin methods."""

    # ------------------------------------------------------------------ loading
    def _make_data_loader(
        self,
        adata: AnnData,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        shuffle: bool = False,
        data_loader_class=None,
        **data_loader_kwargs,
    ) -> TissueDataLoader:
        """Inference loader: whole registered tissues, requested rows marked.

        ``batch_size`` is a cap on cells per forward pass (``None``, the default: whole
        tissues). A cap cuts larger tissues into random chunks, which changes their context.
        """
        if shuffle:
            raise ValueError("Inference loaders keep tissue order (shuffle=False).")
        if data_loader_class not in (None, TissueDataLoader):
            raise ValueError("CellPLM reads tissues with its TissueDataLoader only.")
        self.module.eval()  # inference: no masking, no dropout (`train` switches back)
        data_loader_kwargs.pop("iter_ndarray", None)  # scvi-tools' option; the loader refuses
        # the options it cannot honour (drop_last, load_sparse_tensor=False, data_and_attributes)
        return TissueDataLoader(
            self.get_anndata_manager(adata, required=True),
            indices=check_indices(indices, adata.n_obs),
            batch_size=check_batch_size(batch_size),
            context=True,
            gene_layout=self._layout_of(adata),
            **data_loader_kwargs,
        )

    def _layout_of(self, adata: AnnData) -> GeneLayout:
        """How ``adata``'s columns meet the model's vocabulary: the layout of the model's own
        AnnData (any AnnData it reads has the same genes), or for a model built from a registry
        (no AnnData), ``adata``'s own (see :mod:`cellplm_scvi.model._registry_data`), built
        once per registered AnnData: validation and every loader of a call read the same one."""
        if self.adata is not None:
            return self._gene_layout
        manager = self.get_anndata_manager(adata, required=True)
        layouts = vars(self).setdefault("_registry_layouts", {})  # AnnData id -> (manager, layout)
        manager_and_layout = layouts.get(manager.adata_uuid)
        if manager_and_layout is None or manager_and_layout[0] is not manager:  # a new setup
            manager_and_layout = layouts[manager.adata_uuid] = (
                manager,
                _registry_data.gene_layout(self, adata),
            )
        return manager_and_layout[1]

    def _tissue_order(
        self, adata: AnnData | None, indices: Sequence[int] | None, batch_size: int | None
    ) -> tuple[AnnData, np.ndarray, np.ndarray]:
        """(validated adata, requested rows in emission order, caller position -> emission)."""
        adata = self._validate_anndata(adata)
        indices = check_indices(indices, adata.n_obs)
        batch_size = check_batch_size(batch_size)
        emitted = self._make_data_loader(adata, indices, batch_size).emission_order()
        return adata, emitted, _positions(emitted, indices, adata.n_obs)

    @staticmethod
    def _loader_order(dataloader) -> np.ndarray | None:
        """For one of our loaders passed as ``dataloader``: emission -> its indices' order."""
        if not isinstance(dataloader, TissueDataLoader) or dataloader.sampler.requested is None:
            return None
        requested = dataloader.sampler.requested
        emitted = dataloader.emission_order()
        return _positions(emitted, dataloader.requested_indices, len(requested))

    # ------------------------------------------------------------------ VAEMixin
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        dataloader=None,
        precision: Literal["32", "bf16", "16", "int8"] = "32",
        representation: Literal["cell", "niche", "both"] = "cell",
        seed: int = 0,
        **data_loader_kwargs,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Cell embeddings, (n_cells, n_latent), in the order of ``adata`` (or ``indices``).

        scvi-tools' :meth:`~scvi.model.base.VAEMixin.get_latent_representation`, computed in
        tissue context: each cell is encoded with all cells of its registered tissue, whichever
        cells are requested, so a subset's embeddings equal the same rows of the full call. For
        ``"gmvae"`` the posterior is the Gaussian of the most likely cluster.

        Parameters
        ----------
        adata, indices, give_mean, mc_samples, return_dist, dataloader, **data_loader_kwargs
            As in scvi-tools (``give_mean=False``: one posterior sample).
        batch_size
            Maximum cells per forward pass; larger tissues are cut into random chunks (which
            changes their context). ``None``: whole tissues.
        precision
            ``"bf16"`` or ``"16"`` runs the network under :func:`torch.autocast` (GPU speed-up;
            the sparse gene-embedding product stays in float32). Results are float32; expect
            differences of about 1e-2 relative to ``"32"``. ``"int8"`` (CPU only): the
            encoder's Linear layers run with int8 weights and dynamically quantized int8
            activations (fbgemm; see the user guide's speed table), quantized once and cached
            on the model, the float weights untouched; per-cell cosine to ``"32"`` about 0.9999
            (a GMVAE cell whose two best clusters nearly tie can pick the other one).
        representation
            ``"cell"``: the cell's own latent (above). ``"niche"``: the latent of the cell with
            its own counts hidden, read from the rest of its registered tissue through the
            encoder's attention (:meth:`~cellplm_scvi.module.CellPLMModule.niche_inference`;
            a few encoder passes per tissue, each hiding a disjoint random group; always the
            posterior mean, so ``give_mean=False`` raises). ``"both"``: ``[cell, niche]``,
            (n_cells, 2 * n_latent), ``give_mean`` and ``mc_samples`` applying to the cell half.
            The niche read-out needs a model trained with hidden cells (``hide_cell_rate > 0``, the
            default for a from-scratch model on spatial data).
        seed
            Seed of the niche read-out's groups (with the tissue code): the result is
            deterministic and the same for any subset of ``indices``.
        """
        if representation not in ("cell", "niche", "both"):
            raise ValueError(
                f"representation must be 'cell', 'niche' or 'both', got {representation!r}."
            )
        if representation != "cell":
            return self._niche_representation(
                adata, indices, give_mean, mc_samples, batch_size, return_dist, dataloader,
                precision, representation, seed, **data_loader_kwargs,
            )  # fmt: skip
        sampling = self.module.sampling_posterior() if not give_mean else nullcontext()
        with _precision(self.module, precision), sampling:
            if dataloader is not None:
                out = super().get_latent_representation(
                    give_mean=give_mean, mc_samples=mc_samples, return_dist=return_dist,
                    dataloader=dataloader,
                )  # fmt: skip
                back = self._loader_order(dataloader)
            else:
                adata, emitted, back = self._tissue_order(adata, indices, batch_size)
                out = super().get_latent_representation(
                    adata, emitted, give_mean, mc_samples, batch_size, return_dist,
                    **data_loader_kwargs,
                )  # fmt: skip
        if back is None:
            return out
        if return_dist:
            return tuple(np.asarray(a, dtype=np.float32)[back] for a in out)
        return np.asarray(out, dtype=np.float32)[back]

    def _niche_representation(
        self, adata, indices, give_mean, mc_samples, batch_size, return_dist, dataloader,
        precision, representation, seed, **data_loader_kwargs,
    ) -> np.ndarray:  # fmt: skip
        """``representation="niche"`` or ``"both"`` of :meth:`get_latent_representation`."""
        if return_dist or dataloader is not None:
            raise ValueError(
                f"representation={representation!r} returns embeddings of adata/indices: "
                "return_dist=True and dataloader= are for representation='cell' only."
            )
        if representation == "niche" and not give_mean:
            raise ValueError(
                "The niche read-out is a posterior mean: give_mean=False (a posterior sample) "
                "is for representation='cell' (with 'both' it applies to the cell half)."
            )
        if self.module.hide_cell_rate == 0:
            raise ValueError(
                f"representation={representation!r} needs a model trained to reconstruct "
                "hidden cells from their tissue (CellPLM(..., hide_cell_rate > 0), the default "
                "with setup_anndata(spatial_key=...)); this model has hide_cell_rate=0."
            )
        if self.module.minified_data_type is not None:
            raise ValueError("The niche read-out needs the counts; this AnnData is minified.")
        adata, emitted, back = self._tissue_order(adata, indices, batch_size)
        with _precision(self.module, precision):
            niche = [
                self.module.niche_inference(tensors, seed).cpu()
                for tensors in self._make_data_loader(
                    adata, emitted, batch_size, **data_loader_kwargs
                )
            ]
        niche = torch.cat(niche).numpy().astype(np.float32)[back]
        if representation == "niche":
            return niche
        cell = self.get_latent_representation(
            adata, indices, give_mean, mc_samples, batch_size, precision=precision,
            **data_loader_kwargs,
        )  # fmt: skip
        return np.hstack([cell, niche])

    @torch.inference_mode()
    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        dataloader=None,
        return_mean: bool = True,
        data_loader_kwargs: dict | None = None,
        **kwargs,
    ):
        """ELBO of the cells (higher is better), computed in tissue context (see
        :meth:`~scvi.model.base.VAEMixin.get_elbo`). The KL term is a one-sample estimate of
        ``KL(q(z|x) || p(z))`` with the model's prior (Gaussian mixture for ``"gmvae"``)."""
        return self._per_cell(
            super().get_elbo, adata, indices, batch_size, dataloader, return_mean,
            data_loader_kwargs=data_loader_kwargs, **kwargs,
        )  # fmt: skip

    @torch.inference_mode()
    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        dataloader=None,
        return_mean: bool = True,
        data_loader_kwargs: dict | None = None,
        **kwargs,
    ):
        """NB reconstruction error of every cell from its posterior mean, in tissue context
        (see :meth:`~scvi.model.base.VAEMixin.get_reconstruction_error`)."""
        return self._per_cell(
            super().get_reconstruction_error, adata, indices, batch_size, dataloader,
            return_mean, data_loader_kwargs=data_loader_kwargs, **kwargs,
        )  # fmt: skip

    @torch.inference_mode()
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
        dataloader=None,
        data_loader_kwargs: dict | None = None,
        **kwargs,
    ):
        """Importance-sampled ``log p(x)`` in tissue context (see
        :meth:`~scvi.model.base.VAEMixin.get_marginal_ll` and
        :meth:`~cellplm_scvi.module.CellPLMModule.marginal_ll`)."""
        return self._per_cell(
            super().get_marginal_ll, adata, indices, batch_size, dataloader, return_mean,
            n_mc_samples=n_mc_samples, data_loader_kwargs=data_loader_kwargs, **kwargs,
        )  # fmt: skip

    def _per_cell(self, method, adata, indices, batch_size, dataloader, return_mean, **kwargs):
        """Run a per-cell metric in emission order; reorder when not averaged."""
        if dataloader is not None:
            out = method(dataloader=dataloader, return_mean=return_mean, **kwargs)
            back = None if return_mean else self._loader_order(dataloader)
        else:
            adata, emitted, back = self._tissue_order(adata, indices, batch_size)
            out = method(
                adata=adata, indices=emitted, batch_size=batch_size, return_mean=return_mean,
                **kwargs,
            )  # fmt: skip
        if return_mean or back is None:
            return out
        if isinstance(out, dict):
            return {k: v[torch.as_tensor(back)] for k, v in out.items()}
        return out[torch.as_tensor(back)]

    # ------------------------------------------------------------------ RNASeqMixin
    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[int | str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent", "observed"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: Literal["uniform"] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        dataloader=None,
        data_loader_kwargs: dict | None = None,
        **importance_weighting_kwargs,
    ) -> np.ndarray | pd.DataFrame:
        """Decoded (denoised) expression, in tissue context and in the caller's order.

        scvi-tools' :meth:`~scvi.model.base.RNASeqMixin.get_normalized_expression`. With
        ``n_samples=1`` CellPLM decodes the posterior mean (its official read-out); with
        ``n_samples > 1`` it averages (or returns) posterior samples, and with
        ``n_samples_overall`` (``differential_expression``) every draw is a posterior sample,
        whatever the number of cells (scvi-tools asks a group of more cells than draws for one
        sample a cell). The default ``gene_list``
        is every gene of ``adata`` (scvi-tools' shape, which ``differential_expression`` and
        ``adata.layers[...] = ...`` need): a gene outside the model vocabulary cannot be
        decoded and gets 0 (see :attr:`~cellplm_scvi.CellPLM.matched_genes`). A ``gene_list``
        you pass must name decoded genes (``KeyError`` otherwise); columns come in its order.

        Parameters
        ----------
        library_size
            A number: frequencies scaled to this total per cell. ``"latent"`` (scvi-tools'
            name) or ``"observed"``: the count scale, each cell's *measured* genes adding up to
            its observed counts (or to ``size_factor_key``), as in the official imputation.
        weights
            ``"uniform"`` or ``None``; importance weights need scVI's Gaussian prior and
            single-cell minibatches and are not available.
        batch_size
            Maximum cells per forward pass (``None``: whole tissues).
        adata, indices, transform_batch, gene_list, n_samples, n_samples_overall, return_mean, return_numpy, silent, dataloader, data_loader_kwargs
            As in scvi-tools.
        """  # noqa: E501
        if weights not in (None, "uniform"):
            raise ValueError(
                "weights='importance' is not available for CellPLM (it assumes scVI's N(0, I) "
                "prior and one-cell minibatches); use weights='uniform'."
            )
        if library_size == "observed":
            library_size = "latent"
        kwargs = {
            "transform_batch": transform_batch, "library_size": library_size,
            "n_samples": n_samples, "n_samples_overall": n_samples_overall,
            "weights": weights, "return_mean": return_mean, "silent": silent,
            **importance_weighting_kwargs,
        }  # fmt: skip
        sampling = nullcontext() if n_samples_overall is None else self.module.sampling_posterior()
        if dataloader is not None:
            with sampling:
                return super().get_normalized_expression(dataloader=dataloader, **kwargs)
        adata, emitted, back = self._tissue_order(adata, indices, batch_size)
        if gene_list is None:  # every var_name, 0 outside the vocabulary (as the module's px)
            gene_list = list(adata.var_names)
        else:
            gene_list = self._check_decoded(adata, gene_list)
        with sampling:
            out = super().get_normalized_expression(
                adata, emitted, gene_list=gene_list, batch_size=batch_size, return_numpy=True,
                data_loader_kwargs=data_loader_kwargs, **kwargs,
            )  # fmt: skip
        columns = adata.var_names[adata.var_names.isin(gene_list)]  # scvi-tools: var order
        order = columns.get_indexer(gene_list)  # -> the order of gene_list
        if n_samples_overall is not None:
            return out[..., order]  # draws from all cells: no cell axis
        out = (out[:, back] if out.ndim == 3 else out[back])[..., order]
        if return_numpy or out.ndim == 3:
            return out
        names = adata.obs_names[check_indices(indices, adata.n_obs)]
        return pd.DataFrame(out, index=names, columns=pd.Index(gene_list))

    def _check_decoded(self, adata: AnnData, gene_list: Sequence[str] | None) -> list[str]:
        decoded = self._decoded_genes(adata)
        if gene_list is None:
            return list(decoded)
        gene_list = pd.Index(gene_list)
        missing = gene_list.difference(decoded)
        if len(missing):
            raise KeyError(
                f"gene_list has genes the model cannot decode: {list(missing)[:10]} (they must "
                "be var_names of adata and in the model vocabulary)."
            )
        return list(gene_list)

    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[int | str] | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        dataloader=None,
        silent: bool = True,
        **data_loader_kwargs,
    ):
        """Counts drawn from the posterior predictive NB (library-rescaled mean), in tissue
        context: a ``sparse.GCXS`` of shape (n_cells, n_genes[, n_samples]) in the caller's
        order, as scvi-tools' :meth:`~scvi.model.base.RNASeqMixin.posterior_predictive_sample`.
        ``gene_list`` must be genes the model decodes."""
        import sparse

        kwargs = {"transform_batch": transform_batch, "n_samples": n_samples, "silent": silent}
        if dataloader is not None:
            return super().posterior_predictive_sample(dataloader=dataloader, **kwargs)
        adata, emitted, back = self._tissue_order(adata, indices, batch_size)
        if gene_list is not None:
            gene_list = self._check_decoded(adata, gene_list)
        out = super().posterior_predictive_sample(
            adata, emitted, gene_list=gene_list, batch_size=batch_size, **kwargs,
            **data_loader_kwargs,
        )  # fmt: skip
        return sparse.GCXS(out.tocoo()[back])

    @torch.inference_mode()
    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int | None = 1,
        give_mean: bool | None = False,
        batch_size: int | None = None,
        dataloader=None,
        **data_loader_kwargs,
    ) -> dict[str, np.ndarray]:
        """NB ``mean`` (count scale) and ``dispersions`` of every cell and input gene, in tissue
        context and the caller's order (see
        :meth:`~scvi.model.base.RNASeqMixin.get_likelihood_parameters`; genes outside the
        vocabulary have mean 0)."""
        kwargs = {"n_samples": n_samples, "give_mean": give_mean}
        if dataloader is not None:
            return super().get_likelihood_parameters(dataloader=dataloader, **kwargs)
        adata, emitted, back = self._tissue_order(adata, indices, batch_size)
        out = super().get_likelihood_parameters(
            adata, emitted, batch_size=batch_size, **kwargs, **data_loader_kwargs
        )
        return {k: np.take(v, back, axis=-2) for k, v in out.items()}

    @torch.inference_mode()
    def get_feature_correlation_matrix(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 10,
        batch_size: int | None = None,
        rna_size_factor: int = 1000,
        transform_batch: Sequence[int | str] | None = None,
        correlation_type: Literal["spearman", "pearson"] = "spearman",
        silent: bool = True,
    ) -> pd.DataFrame:
        """Gene-gene correlation of denoised samples (see
        :meth:`~scvi.model.base.RNASeqMixin.get_feature_correlation_matrix`); ``batch_size``
        ``None`` (whole tissues) by default. Genes outside the vocabulary give NaN."""
        return super().get_feature_correlation_matrix(
            adata, indices, n_samples, batch_size, rna_size_factor, transform_batch,
            correlation_type, silent,
        )  # fmt: skip

    @torch.inference_mode()
    def _get_denoised_samples(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 25,
        batch_size: int | None = None,
        rna_size_factor: int = 1000,
        transform_batch: int | None = None,
        **data_loader_kwargs,
    ) -> np.ndarray:
        """Gamma draws at ``rna_size_factor * scale`` with the NB dispersion (scvi-tools'
        recipe), one tissue at a time: (n_cells, n_genes[, n_samples])."""
        adata = self._validate_anndata(adata)
        samples = []
        for tensors in self._make_data_loader(adata, indices, batch_size):
            _, gen = self.module.forward(
                tensors,
                inference_kwargs={"n_samples": n_samples},
                generative_kwargs={"transform_batch": transform_batch},
                compute_loss=False,
            )
            px = gen["px"]
            rate = rna_size_factor * px.scale
            p = rate / (rate + px.theta)
            draw = torch.distributions.Gamma(px.theta, (1 - p) / p).sample().cpu().numpy()
            samples.append(np.transpose(draw, (1, 2, 0)) if n_samples > 1 else draw)
        return np.concatenate(samples, axis=0)

    @torch.inference_mode()
    def get_latent_library_size(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        dataloader=None,
        **data_loader_kwargs,
    ) -> np.ndarray:
        """CellPLM has no latent library size: the NB mean is rescaled to each cell's observed
        count total over its measured genes. This returns that library size, (n_cells, 1)."""
        if not give_mean:
            raise ValueError("CellPLM's library size is observed, not sampled: use give_mean.")
        if dataloader is not None:
            raise ValueError("Pass adata/indices; the library size is read per tissue.")
        adata, emitted, back = self._tissue_order(adata, indices, batch_size)
        libraries = [
            self.module.library_counts(tensors).cpu()
            for tensors in self._make_data_loader(adata, emitted, batch_size)
        ]
        return torch.cat(libraries).numpy()[back]


def _positions(emitted: np.ndarray, indices: np.ndarray, n_obs: int) -> np.ndarray:
    """Position in ``emitted`` of each of ``indices``."""
    position = np.full(n_obs, -1, dtype=np.int64)
    position[emitted] = np.arange(len(emitted))
    return position[indices]
