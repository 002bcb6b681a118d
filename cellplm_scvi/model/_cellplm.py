"""CellPLM as an scvi-tools model: AnnData in, tissue minibatches, AnnData-ordered results out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data._constants import _ADATA_MINIFY_TYPE_UNS_KEY
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
    NumericalObsField,
    ObsmField,
)
from scvi.model.base import BaseMinifiedModeModelClass, RNASeqMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from .. import _vocabulary
from .._constants import (
    BATCH_KEY,
    CAT_COVS_KEY,
    INDICES_KEY,
    INDICES_OBS,
    LABELS_KEY,
    PERTURBATION_KEY,
    SIZE_FACTOR_KEY,
    SPATIAL_KEY,
    TISSUE_CODE_OBS,
    TISSUE_KEY,
    X_KEY,
)
from .._quiet import quiet_setup
from .._validation import check_predict_options
from ..data import TissueDataLoader, TissueDataSplitter
from ..module import CellPLMModule
from ..official import OfficialMixin
from ._genes_mixin import GeneEmbeddingMixin
from ._imputation import ImputationMixin
from ._minify import MinifyMixin, is_minified
from ._perturbation import PerturbationMixin, perturbation_fields
from ._presets import module_defaults, resolve_preset, resolve_spatial_pe
from ._query import QueryMixin
from ._save_load import SaveLoadMixin
from ._setup import (
    TissueSetupMixin,
    categorical_covariates,
    check_setup_arguments,
    label_names,
    record_tissue_codes,
    write_tissue_columns,
)
from ._tissue_context import TissueContextMixin, _precision
from ._training import TissueTrainRunner, TrainingMixin
from ._training_plan import CellPLMTrainingPlan

logger = logging.getLogger("cellplm_scvi")


class CellPLM(
    PerturbationMixin,
    OfficialMixin,
    GeneEmbeddingMixin,
    ImputationMixin,
    QueryMixin,
    TrainingMixin,
    MinifyMixin,
    TissueSetupMixin,
    TissueContextMixin,
    RNASeqMixin,
    VAEMixin,
    SaveLoadMixin,
    BaseMinifiedModeModelClass,
):
    """CellPLM: cells are tokens, tissues are sentences (:cite:p:`Wen2024`).

    Each cell's token is the sum of learned gene embeddings weighted by ``log1p`` of its raw
    counts. A Flowformer (linear attention) lets the cells of one tissue attend to each other; a
    Gaussian-mixture (``"gmvae"``) or Gaussian (``"vae"``) latent gives the embedding, and an
    MLP decoder reconstructs masked genes of masked cells with a negative-binomial likelihood.
    A training minibatch is one tissue (see :func:`cellplm_scvi.pp.assign_tissues`).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_hidden
        Token width (official: 1024).
    n_layers
        Flowformer layers (official: 4).
    n_heads
        Attention heads (official: 8).
    n_latent
        Embedding width (official: 512).
    latent
        ``"gmvae"`` (Gaussian mixture, ``n_clusters`` components) or ``"vae"``. ``None``: the
        preset's (``"gmvae"``, the official latent, for ``"official"``, else ``"vae"``).
    n_clusters
        GMVAE components.
    dropout
        Dropout throughout the network (official pretraining: 0.2).
    spatial_pe
        Add the 2-D sinusoidal encoding of coordinates (scaled to [0, 1] per tissue). ``None``:
        on when coordinates are registered and no cell is hidden (``hide_cell_rate=0``); off
        for the default spatial model, whose niche read-out it degraded.
    mask_cell_rate, mask_gene_rate
        Masking of the training objective: fraction of a tissue's cells masked, and fraction of
        the entries of a masked cell hidden from the encoder. ``mask_cell_rate=None``: the
        preset's (``1.0`` from scratch: every cell enters the loss; ``0.75``, the official rate,
        for ``"official"``).
    hide_cell_rate
        Fraction of a tissue's cells, among the masked ones, hidden whole (all genes) at each
        training step and reconstructed from their tissue alone: the objective that makes the
        encoder read a cell's niche, and the model behind
        ``get_latent_representation(representation="niche")``. ``None``: the preset's (``0.3``
        for ``"spatial"``, else ``0``, the official objective).
    dae
        Add the NB loss of the hidden entries alone (official ``dae``).
    vocabulary
        Gene vocabulary of the embedding table and decoder (e.g. an official checkpoint's
        Ensembl IDs). ``None``: the AnnData's genes. Genes outside it are ignored.
    gene_key
        ``adata.var`` column with gene IDs or symbols to match ``vocabulary`` (default: the
        ``gene_key`` given to :meth:`setup_anndata`, else ``var_names``).
    preset
        The defaults that depend on the data (:mod:`cellplm_scvi.model._presets`):
        ``"official"`` (the authors' objective: ``"gmvae"`` latent, no cell hidden, no local
        heads; :meth:`load_official` uses it), ``"dissociated"`` (from scratch without
        coordinates: every cell masked, ``"vae"`` latent, ``train(lr=2e-3)``) or ``"spatial"``
        (from scratch, reads niches: the same, and ``hide_cell_rate=0.3``, half of the heads
        (module argument ``n_local_heads``) weighing the other cells by a spatial kernel of width
        1/6 of the tissue's side (``local_grid=7``), training tissues redrawn every epoch).
        ``None``:
        ``"spatial"`` on registered coordinates (``"official"`` with ``hide_cell_rate=0``), else
        ``"dissociated"``. Explicit arguments win; the resolved name is recorded in
        ``init_params_`` and shown in the model summary.
    **module_kwargs
        Passed to :class:`~cellplm_scvi.module.CellPLMModule`.

    Examples
    --------
    >>> import cellplm_scvi as cp
    >>> adata = cp.datasets.simulate_tissue()
    >>> cp.CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial", library_key="slide")
    >>> model = cp.CellPLM(adata)
    >>> model.train(max_epochs=10)
    >>> adata.obsm["X_cellplm"] = model.get_latent_representation()
    """

    _module_cls = CellPLMModule
    _data_loader_cls = TissueDataLoader
    _data_splitter_cls = TissueDataSplitter
    _training_plan_cls = CellPLMTrainingPlan
    _train_runner_cls = TissueTrainRunner
    _LATENT_QZM_KEY = "cellplm_latent_qzm"
    _LATENT_QZV_KEY = "cellplm_latent_qzv"

    def __init__(
        self,
        adata: AnnData | None = None,
        n_hidden: int = 256,
        n_layers: int = 2,
        n_heads: int = 8,
        n_latent: int = 32,
        latent: Literal["gmvae", "vae"] | None = None,
        n_clusters: int = 16,
        dropout: float = 0.1,
        spatial_pe: bool | None = None,
        mask_cell_rate: float | None = None,
        mask_gene_rate: float = 0.25,
        hide_cell_rate: float | None = None,
        dae: bool = True,
        vocabulary: Sequence[str] | None = None,
        gene_key: str | None = None,
        preset: Literal["official", "dissociated", "spatial"] | None = None,
        registry: dict | None = None,
        **module_kwargs,
    ):
        super().__init__(adata, registry)
        self.registry_built_ = adata is None  # saved: `load` rebuilds it without an AnnData
        fields = self.registry_["field_registries"]
        has_coords = SPATIAL_KEY in fields
        self._preset = resolve_preset(preset, has_coords, hide_cell_rate)
        preset = self._preset.name  # recorded in init_params_
        hide_cell_rate = self._preset.hide_cell_rate if hide_cell_rate is None else hide_cell_rate
        mask_cell_rate = self._preset.mask_cell_rate if mask_cell_rate is None else mask_cell_rate
        latent = self._preset.latent if latent is None else latent
        module_defaults(self._preset, n_heads, module_kwargs, latent)
        spatial_pe = resolve_spatial_pe(spatial_pe, has_coords, hide_cell_rate)
        if vocabulary is not None:
            vocabulary = list(vocabulary)
        if adata is None:  # a data module's registry (e.g. TissueCorpus): vocabulary columns
            columns = [str(g) for g in fields[X_KEY]["state_registry"]["column_names"]]
            if vocabulary is not None and vocabulary != columns:
                raise ValueError("vocabulary must equal the registry's genes (its X columns).")
            vocabulary, n_input = columns, len(columns)
            self._gene_layout = None  # each AnnData it reads has its own (_registry_data)
        else:
            if self.adata.n_obs == 0:
                raise ValueError("adata has no cells.")
            if gene_key is None:  # the column named at setup_anndata(gene_key=...)
                gene_key = self.registry_["setup_args"].get("gene_key")
            # every AnnData this model reads has these genes (`_validate_anndata`)
            self._gene_layout = _vocabulary.GeneLayout.of(
                self.adata, self.adata_manager, vocabulary, gene_key
            )
            n_input = self.adata.n_vars
        n_batch = self.summary_stats.n_batch
        covariates = categorical_covariates(self.registry_)
        derived = {  # from the registered data; explicit module_kwargs win
            "decoder_covariates": {"batch": n_batch} if n_batch > 1 else {},
            "n_labels": len(label_names(self.registry_)),
        }
        if covariates:
            derived["decoder_covariates"].update(covariates)
            derived["categorical_covariates"] = tuple(covariates)
        if PERTURBATION_KEY in fields:  # setup_anndata(perturbation_key=...)
            derived["perturbation"] = True
        self.module = self._module_cls(
            n_vocab=n_input if vocabulary is None else len(vocabulary),
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_latent=n_latent,
            latent=latent,
            n_clusters=n_clusters,
            dropout=dropout,
            use_spatial_pe=spatial_pe,
            mask_cell_rate=mask_cell_rate,
            mask_gene_rate=mask_gene_rate,
            hide_cell_rate=hide_cell_rate,
            dae=dae,
            **{**derived, **module_kwargs},
        )
        self.module.minified_data_type = self.minified_data_type
        n_params = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"CellPLM: preset={preset!r}, n_hidden={n_hidden}, n_layers={n_layers}, "
            f"n_latent={n_latent}, "
            f"latent={latent!r}, spatial_pe={spatial_pe}, mask_cell_rate={mask_cell_rate}, "
            f"hide_cell_rate={hide_cell_rate}, "
            f"n_local_heads={self.module.n_local_heads}, "
            f"vocabulary={self.module.n_vocab} genes, {n_params:,} parameters"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        spatial_key: str | None = None,
        tissue_key: str | None = None,
        library_key: str | None = None,
        max_cells: int | None = None,
        unlabeled_category: str = "Unknown",
        measured_genes_key: str | None = None,
        gene_key: str | None = None,
        perturbation_key: str | None = None,
        control_category: str = "ctrl",
        **kwargs,
    ) -> None:
        """%(summary)s.

        Counts must be raw (finite, non-negative integers). Cells are grouped into tissues, the
        sets of cells that attend to each other: ``tissue_key`` if given, else
        :func:`cellplm_scvi.pp.assign_tissues` (spatially contiguous groups from a squidpy graph
        when ``spatial_key`` is given, else whole samples: one tissue per ``batch_key`` /
        ``library_key`` value, or chunks of at most ``max_cells``). This writes
        ``obs["cellplm_tissue"]`` (and ``uns["cellplm_tissue"]``), two bookkeeping columns,
        ``obs["_cellplm_tissue_code"]`` and ``obs["_cellplm_indices"]``, and scvi-tools' own
        ``obs["_scvi_batch"]``, ``obs["_scvi_labels"]`` and ``uns`` ids; counts, ``obsm`` and
        ``var`` are never modified.

        Parameters
        ----------
        %(param_adata)s
        %(param_layer)s
        batch_key
            ``adata.obs`` column of the batch (sample) of each cell. It has two roles. (1) As in
            scVI, it is a decoder covariate: each batch gets a decoder embedding row; the encoder
            never sees it. (2) It groups cells into tissues: a computed tissue never spans two
            batches, and **without coordinates** (no ``spatial_key``, no ``tissue_key``) each
            batch (within each ``library_key`` value) is one tissue, or is cut into chunks of
            ``max_cells``, so a cell attends only to the cells of its own batch. ``None``: one
            batch (and, without coordinates, all cells one tissue).
        %(param_labels_key)s
        size_factor_key
            ``adata.obs`` column of positive library sizes: the NB mean of each cell is rescaled
            to it instead of to the cell's observed count total.
        categorical_covariate_keys
            ``adata.obs`` columns of extra categorical covariates: each gets a decoder embedding
            table (like the official model's ``dataset`` table). The encoder never sees them.
        continuous_covariate_keys
            Not supported (the CellPLM decoder has no continuous covariates); raises.
        spatial_key
            ``adata.obsm`` key of (n_cells, 2) spatial coordinates, or ``None``.
        tissue_key
            ``adata.obs`` column assigning each cell to a tissue (e.g. a field of view). If
            ``None``, tissues are computed.
        library_key
            ``adata.obs`` column of slides; computed tissues never span two slides.
        max_cells
            Maximum cells per computed tissue. ``None``: 1000 for spatial data; whole samples
            (one tissue per ``batch_key`` value, or all cells) without coordinates, as the
            official zero-shot pipeline (see :func:`cellplm_scvi.pp.assign_tissues`).
        unlabeled_category
            Value of ``labels_key`` marking cells without a label (they still train the
            reconstruction objective and receive a prediction).
        measured_genes_key
            ``adata.varm`` key of a genes x batches boolean DataFrame (columns: ``batch_key``
            categories) saying which genes each batch measured, e.g. a spatial panel next to an
            scRNA-seq reference. The loss then ignores unmeasured genes. Batches without a
            column measured every gene.
        gene_key
            ``adata.var`` column with the gene IDs or symbols (default: ``var_names``) that are
            matched to a model vocabulary: by a model built from a registry (a
            :class:`~cellplm_scvi.data.TissueCorpus`) reading this AnnData, and by default by
            ``CellPLM(adata, vocabulary=...)`` and :meth:`load_official`.
        perturbation_key
            ``adata.obs`` column of genetic perturbation conditions in GEARS naming
            (``control_category``, ``"A"`` or ``"A+ctrl"``, ``"A+B"``); every named gene must be
            in ``var_names``. :meth:`train` then fits the perturbation objective and
            :meth:`predict_perturbation` predicts conditions (see
            :mod:`cellplm_scvi.model._perturbation`).
        control_category
            Value of ``perturbation_key`` marking the unperturbed (control) cells.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_setup_arguments(
            adata,
            layer,
            batch_key=batch_key,
            labels_key=labels_key,
            library_key=library_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            spatial_key=spatial_key,
            gene_key=gene_key,
            measured_genes_key=measured_genes_key,
        )
        fresh = "source_registry" not in kwargs and not is_minified(adata)
        write_tissue_columns(
            adata, spatial_key, tissue_key, library_key, batch_key, max_cells, recomputed=fresh
        )
        fields = [
            LayerField(X_KEY, layer, is_count_data=False),  # check_counts checks (stricter)
            CategoricalObsField(BATCH_KEY, batch_key),
            CategoricalObsField(LABELS_KEY, None)
            if labels_key is None
            else LabelsWithUnlabeledObsField(LABELS_KEY, labels_key, unlabeled_category),
            NumericalObsField(TISSUE_KEY, TISSUE_CODE_OBS),
            NumericalObsField(INDICES_KEY, INDICES_OBS),
        ]
        if spatial_key is not None:
            fields.append(ObsmField(SPATIAL_KEY, spatial_key))
        if size_factor_key is not None:
            fields.append(NumericalObsField(SIZE_FACTOR_KEY, size_factor_key))
        if categorical_covariate_keys:
            fields.append(CategoricalJointObsField(CAT_COVS_KEY, categorical_covariate_keys))
        fields += perturbation_fields(adata, perturbation_key, control_category)
        minify_type = adata.uns.get(_ADATA_MINIFY_TYPE_UNS_KEY)
        if minify_type is not None:
            fields += cls._get_fields_for_adata_minification(minify_type)
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with quiet_setup():  # scvi-tools' INFO line naming the coordinates' columns
            manager.register_fields(adata, **kwargs)
        record_tissue_codes(manager)  # a later setup with other tissues is caught
        cls.register_manager(manager)

    # ------------------------------------------------------------------ CellPLM-specific
    @torch.inference_mode()
    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        use_posterior_mean: bool = True,
        ig_interpretability: bool = False,
        ig_args: dict | None = None,
        dataloader=None,
        precision: Literal["32", "bf16", "16", "int8"] = "32",
    ) -> np.ndarray | pd.DataFrame:
        """Predict cell types with the classification head (``SCANVI.predict``'s signature).

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells to predict (default: all); each is computed in its whole tissue.
        soft
            Return a DataFrame of class probabilities (rows sum to one) instead of names.
        batch_size
            Maximum cells per forward pass (``None``: whole tissues).
        use_posterior_mean
            The head reads the deterministic pre-latent state, so ``True`` is what it does;
            ``False`` raises.
        ig_interpretability, ig_args
            Integrated gradients are not available for CellPLM; ``True`` raises.
        dataloader
            Not supported (predictions are put back in AnnData order per tissue); raises.
        precision
            As in :meth:`get_latent_representation`.

        Returns
        -------
        numpy.ndarray or pandas.DataFrame
            Label names (``soft=False``) or probabilities, in the order of ``adata`` /
            ``indices``.
        """
        if self.module.classifier is None:
            raise ValueError(
                "This model has no classification head: call setup_anndata(labels_key=...) with "
                "at least two cell types before creating the model."
            )
        check_predict_options(use_posterior_mean, ig_interpretability or ig_args, dataloader)
        self._refuse_minified("predict")
        adata, emitted, back = self._tissue_order(adata, indices, batch_size)
        self.module.eval()
        probs = []
        with _precision(self.module, precision):
            for tensors in self._make_data_loader(adata, emitted, batch_size):
                out = self.module.inference(**self.module._get_inference_input(tensors))
                probs.append(out["logits"].float().softmax(-1).cpu())
        probs = torch.cat(probs).numpy()[back]
        index = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
        names = label_names(self.registry_)
        if soft:
            return pd.DataFrame(probs, index=index, columns=names)
        return np.asarray(names, dtype=object)[probs.argmax(1)]

    @property
    def preset(self) -> str:
        """Name of the preset the model was built with (see ``preset``)."""
        return self._preset.name
