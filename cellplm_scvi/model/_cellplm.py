"""CellPLM as an scvi-tools model: AnnData in, tissue minibatches, AnnData-ordered results out."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
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
from scvi.model._utils import get_max_epochs_heuristic, use_distributed_sampler
from scvi.model.base import BaseMinifiedModeModelClass, RNASeqMixin, VAEMixin
from scvi.train import TrainRunner
from scvi.train._config import merge_kwargs
from scvi.utils import setup_anndata_dsp

from .._constants import (
    BATCH_KEY,
    CAT_COVS_KEY,
    DEFAULT_TISSUE_OBS,
    INDICES_KEY,
    INDICES_OBS,
    LABELS_KEY,
    SIZE_FACTOR_KEY,
    SPATIAL_KEY,
    TISSUE_CODE_OBS,
    TISSUE_KEY,
    X_KEY,
)
from .._genes import align_genes
from .._quiet import quiet_setup, quiet_training
from .._validation import check_counts, check_obs_key, check_spatial
from ..data import TissueDataLoader, TissueDataSplitter
from ..module import CellPLMModule
from ..pp import assign_tissues
from . import _checkpoints, _query, _registry_data
from ._official import load_official
from ._save_load import read_model_file, write_model_file
from ._tissue_context import TissueContextMixin, _precision
from ._training_plan import CellPLMTrainingPlan

logger = logging.getLogger("cellplm_scvi")

# A from-scratch model on coordinates (benchmarks/README.md, "Niche context (issue 14)"):
# the fraction of its training tissues' cells hidden whole,
SPATIAL_HIDE_CELL_RATE = 0.3
# the anchors per side of the spatial kernel of its local heads (half of the heads),
SPATIAL_LOCAL_GRID = 7
# and its latent (the Gaussian mixture cost cell identity there)
SPATIAL_LATENT = "vae"


class CellPLM(TissueContextMixin, RNASeqMixin, VAEMixin, BaseMinifiedModeModelClass):
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
        ``"gmvae"`` (Gaussian mixture, ``n_clusters`` components) or ``"vae"``. ``None``:
        ``"vae"`` for a model that hides cells on coordinates (the default spatial model, see
        ``hide_cell_rate``), else ``"gmvae"`` (the official latent).
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
        the entries of a masked cell hidden from the encoder.
    hide_cell_rate
        Fraction of a tissue's cells, among the masked ones, hidden whole (all genes) at each
        training step and reconstructed from their tissue alone: the objective that makes the
        encoder read a cell's niche, and the model behind
        ``get_latent_representation(representation="niche")``. ``None``: ``0.3`` when
        coordinates are registered (a from-scratch spatial model), else ``0`` (the official
        objective; :meth:`load_official` always uses ``0``). A cell-hiding model on coordinates
        also attends locally: half of its heads (module argument ``n_local_heads``, ``0`` for
        none) weigh the other cells by a distance-decaying spatial kernel of width 1/6 of the
        tissue's side (``local_grid=7``; see :func:`cellplm_scvi.nn.spatial_kernel_features`).
    dae
        Add the NB loss of the hidden entries alone (official ``dae``).
    vocabulary
        Gene vocabulary of the embedding table and decoder (e.g. an official checkpoint's
        Ensembl IDs). ``None``: the AnnData's genes. Genes outside it are ignored.
    gene_key
        ``adata.var`` column with gene IDs or symbols to match ``vocabulary`` (default: the
        ``gene_key`` given to :meth:`setup_anndata`, else ``var_names``).
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
    _train_runner_cls = TrainRunner
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
        mask_cell_rate: float = 0.75,
        mask_gene_rate: float = 0.25,
        hide_cell_rate: float | None = None,
        dae: bool = True,
        vocabulary: Sequence[str] | None = None,
        gene_key: str | None = None,
        registry: dict | None = None,
        **module_kwargs,
    ):
        super().__init__(adata, registry)
        self.registry_built_ = adata is None  # saved: `load` rebuilds it without an AnnData
        fields = self.registry_["field_registries"]
        has_coords = SPATIAL_KEY in fields
        if hide_cell_rate is None:
            hide_cell_rate = SPATIAL_HIDE_CELL_RATE if has_coords else 0.0
        reads_niches = hide_cell_rate > 0 and has_coords
        if latent is None:
            latent = SPATIAL_LATENT if reads_niches else "gmvae"
        if reads_niches:  # half of the heads attend through the spatial kernel
            module_kwargs.setdefault("n_local_heads", n_heads // 2)
            module_kwargs.setdefault("local_grid", SPATIAL_LOCAL_GRID)
        # the encoding hurt the niche read-out of cell-hiding models (benchmarks/README.md)
        spatial_pe = has_coords and not hide_cell_rate if spatial_pe is None else spatial_pe
        if spatial_pe and not has_coords:
            raise ValueError(
                "spatial_pe=True needs coordinates: call setup_anndata(spatial_key=...)."
            )
        if vocabulary is not None:
            vocabulary = list(vocabulary)
        if adata is None:  # a data module's registry (e.g. TissueCorpus): vocabulary columns
            columns = [str(g) for g in fields[X_KEY]["state_registry"]["column_names"]]
            if vocabulary is not None and vocabulary != columns:
                raise ValueError("vocabulary must equal the registry's genes (its X columns).")
            vocabulary, gene_index, n_input = columns, None, len(columns)
        else:
            if self.adata.n_obs == 0:
                raise ValueError("adata has no cells.")
            if gene_key is None:  # the column named at setup_anndata(gene_key=...)
                gene_key = self.registry_["setup_args"].get("gene_key")
            gene_index = self._gene_index(self.adata, vocabulary, gene_key)
            n_input = self.adata.n_vars
        n_batch = self.summary_stats.n_batch
        covariates = self._categorical_covariates()
        derived = {  # from the registered data; explicit module_kwargs win
            "decoder_covariates": {"batch": n_batch} if n_batch > 1 else {},
            "n_labels": len(self._label_names()),
            "measured_genes": None if adata is None else self._measured_genes(self.adata),
        }
        if covariates:
            derived["decoder_covariates"].update(covariates)
            derived["categorical_covariates"] = tuple(covariates)
        self.module = self._module_cls(
            n_vocab=n_input if vocabulary is None else len(vocabulary),
            gene_index=gene_index,
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
            f"CellPLM: n_hidden={n_hidden}, n_layers={n_layers}, n_latent={n_latent}, "
            f"latent={latent!r}, spatial_pe={spatial_pe}, hide_cell_rate={hide_cell_rate}, "
            f"n_local_heads={self.module.n_local_heads}, "
            f"vocabulary={self.module.n_vocab} genes, {n_params:,} parameters"
        )
        self.init_params_ = self._get_init_params(locals())

    @staticmethod
    def _gene_index(
        adata: AnnData, vocabulary: list[str] | None, gene_key: str | None
    ) -> np.ndarray | None:
        """Vocabulary row of each AnnData column (-1 for genes outside the vocabulary)."""
        if vocabulary is None:
            return None
        if gene_key is not None and gene_key not in adata.var:
            raise KeyError(
                f"gene_key={gene_key!r} is not a column of adata.var "
                f"(available: {list(adata.var.columns)})."
            )
        genes = adata.var_names if gene_key is None else adata.var[gene_key].astype(str)
        alignment = align_genes(list(genes), vocabulary)
        index = np.full(adata.n_vars, -1, dtype=np.int64)
        index[alignment.input_index] = alignment.vocab_index
        return index

    def _label_names(self) -> list[str]:
        """Class names of the registered labels (without the unlabeled category)."""
        if self.registry_["setup_args"].get("labels_key") is None:
            return []
        state = self.registry_["field_registries"][LABELS_KEY]["state_registry"]
        unlabeled = state.get("unlabeled_category")
        return [c for c in state["categorical_mapping"] if c != unlabeled]

    def _categorical_covariates(self) -> dict[str, int]:
        """Decoder table name -> levels, one per ``categorical_covariate_keys`` column."""
        if CAT_COVS_KEY not in self.registry_["field_registries"]:
            return {}
        state = self.registry_["field_registries"][CAT_COVS_KEY]["state_registry"]
        return {
            f"cov_{key}".replace(".", "_"): len(state["mappings"][key])
            for key in state["field_keys"]
        }

    def _measured_genes(self, adata: AnnData) -> np.ndarray | None:
        """(n_batch, n_genes) bool from ``adata.varm[measured_genes_key]`` and the genes
        :meth:`prepare_query_anndata` padded (unmeasured in this AnnData's batches), or
        ``None`` when every batch measured every gene."""
        manager = self.get_anndata_manager(adata, required=True)
        key = manager.registry["setup_args"].get("measured_genes_key")
        padded = _query.padded_genes(adata)
        if key is None and padded is None:
            return None
        batches = list(manager.get_state_registry(BATCH_KEY).categorical_mapping)
        measured = np.ones((len(batches), adata.n_vars), dtype=bool)
        if key is not None:
            measured &= self._measured_table(adata, key, batches)
        if padded is not None:
            codes = manager.get_from_registry(BATCH_KEY)
            present = np.unique(np.asarray(codes).reshape(-1))
            measured[np.ix_(present, padded)] = False
        return measured

    @staticmethod
    def _measured_table(adata: AnnData, key: str, batches: list) -> np.ndarray:
        """(n_batch, n_genes) bool from ``adata.varm[key]`` (columns: batch categories)."""
        table = adata.varm[key]
        if not isinstance(table, pd.DataFrame):
            table = pd.DataFrame(np.asarray(table), index=adata.var_names, columns=batches)
        if len(table) != adata.n_vars:
            raise ValueError(f"adata.varm[{key!r}] must have one row per gene.")
        unknown = sorted(set(map(str, table.columns)) - set(map(str, batches)))
        if unknown:
            raise ValueError(
                f"adata.varm[{key!r}] has columns {unknown} that are not batch_key categories "
                f"({batches})."
            )
        measured = np.ones((len(batches), adata.n_vars), dtype=bool)
        columns = {str(c): c for c in table.columns}  # batch names may be ints or strings
        for i, batch in enumerate(batches):
            if str(batch) in columns:
                measured[i] = table[columns[str(batch)]].to_numpy(dtype=bool)
        empty = [b for b, row in zip(batches, measured) if not row.any()]
        if empty:
            raise ValueError(f"Batches {empty} measure no gene in adata.varm[{key!r}].")
        return measured

    @classmethod
    def load_official(
        cls,
        prefix: str | os.PathLike | Sequence[str],
        adata: AnnData,
        gene_key: str | None = None,
        spatial_pe: bool = False,
        trust_pickle: bool = False,
        **overrides,
    ) -> CellPLM:
        """Load an official pretrained CellPLM release (e.g. ``20231027_85M``).

        The config file gives the architecture (``"gmvae"`` or ``"vae"`` latent, widths,
        vocabulary); the weights are loaded strictly on the CPU with ``weights_only=True``. The
        model is ready for zero-shot embedding, and can be fine-tuned with :meth:`train`.

        Parameters
        ----------
        prefix
            ``"<dir>/<name>"`` for ``<name>.config.json`` + ``<name>.best.ckpt``, or a
            ``(config_path, checkpoint_path)`` pair.
        adata
            Raw counts registered with :meth:`setup_anndata`. Genes (``var_names`` or
            ``var[gene_key]``) may be human Ensembl IDs or symbols, in any order and any subset
            of the vocabulary; genes outside it are ignored.
        gene_key
            ``adata.var`` column holding the gene IDs or symbols (default: the ``gene_key``
            given to :meth:`setup_anndata`, else ``var_names``).
        spatial_pe
            Add the spatial encoding. The official code never does, so the pretrained weights
            were not trained with it: for experiments only.
        trust_pickle
            Allow a checkpoint that needs full unpickling (runs code from the file).
        **overrides
            Arguments that replace the config's, by our name, for fine-tuning: ``dropout``,
            ``mask_cell_rate``, ``mask_gene_rate``, ``dae``, ``latent`` (the other latent type
            is a fresh layer), ``n_clusters``, ``lamda``, ``w_li``, ``w_en``,
            ``kl_warmup_steps``, ``max_kl_weight``, ``classification_ratio``,
            ``classifier_dropout`` (details: :func:`cellplm_scvi.model._official.load_official`).
            None changes the pretrained weights; unknown names raise ``TypeError``.

        Returns
        -------
        CellPLM
            The model holding the pretrained weights. Decoder covariates of new data use the
            mean pretraining embedding.

        Examples
        --------
        >>> cp.CellPLM.setup_anndata(adata, layer="counts", batch_key="sample")
        >>> model = cp.CellPLM.load_official("ckpt/20231027_85M", adata)
        >>> adata.obsm["X_cellplm"] = model.get_latent_representation()
        """
        return load_official(cls, prefix, adata, gene_key, spatial_pe, trust_pickle, **overrides)

    def save_official(self, prefix: str | os.PathLike, overwrite: bool = False) -> None:
        """Export the model as an official CellPLM release, usable by the ``cellplm`` package.

        Writes ``<prefix>.config.json`` (the official ``OmicsFormer`` arguments, ``gene_list``
        = the model's vocabulary: the ``vocabulary`` it was built with, else the AnnData's
        ``var_names``) and ``<prefix>.best.ckpt`` (``{"model_state_dict": ...}``), each
        atomically. The official code builds the network with ``OmicsFormer(**config)``, loads
        the weights strictly and embeds the cells as this model does;
        :meth:`load_official` reads the files back.

        What the official network lacks is refused with a ``ValueError`` naming it: the
        spatial encoding (``spatial_pe=True``; the official embedder adds 0) and decoder
        tables other than ``batch``/``dataset``/``platform`` (``categorical_covariate_keys``).
        The cell-type head (``labels_key``) is left out with a warning (``OmicsFormer`` has
        none), as are training counters (the VAE's KL warm-up restarts at 0).

        Parameters
        ----------
        prefix
            Output path without the suffixes, e.g. ``"ckpt/my_cellplm"``.
        overwrite
            Replace existing files.

        Examples
        --------
        >>> model.train(max_epochs=10)
        >>> model.save_official("ckpt/my_cellplm")
        >>> from CellPLM.model import OmicsFormer  # the official package
        >>> config = json.load(open("ckpt/my_cellplm.config.json"))
        >>> official = OmicsFormer(**config)
        >>> state = torch.load("ckpt/my_cellplm.best.ckpt")["model_state_dict"]
        >>> official.load_state_dict(state)
        """
        from ._official import save_official

        save_official(self, prefix, overwrite)

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
        %(param_batch_key)s
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
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if adata.is_view:
            raise ValueError(
                "adata is a view; CellPLM writes bookkeeping columns into obs. Pass a copy: "
                "adata = adata.copy()."
            )
        if continuous_covariate_keys:
            raise ValueError(
                "continuous_covariate_keys is not supported: the CellPLM decoder conditions on "
                "categorical covariates only. Bin the covariate and pass it in "
                "categorical_covariate_keys, or leave it out."
            )
        if adata.n_obs == 0:
            raise ValueError("adata has no cells; nothing to set up.")
        if adata.n_vars == 0:
            raise ValueError("adata has no genes; nothing to set up.")
        check_counts(adata, layer)
        for key, argument in [
            (batch_key, "batch_key"),
            (labels_key, "labels_key"),
            (library_key, "library_key"),
            (size_factor_key, "size_factor_key"),
            *((k, "categorical_covariate_keys") for k in categorical_covariate_keys or []),
        ]:
            check_obs_key(adata, key, argument)
        if size_factor_key is not None:
            factors = pd.to_numeric(adata.obs[size_factor_key], errors="coerce").to_numpy()
            if not (np.isfinite(factors) & (factors > 0)).all():
                raise ValueError(
                    f"adata.obs[{size_factor_key!r}] (size_factor_key) must hold finite positive "
                    "numbers (library sizes)."
                )
        if spatial_key is not None:
            check_spatial(adata, spatial_key)
        if gene_key is not None and gene_key not in adata.var:
            raise KeyError(
                f"gene_key={gene_key!r} is not a column of adata.var "
                f"(available: {list(adata.var.columns)})."
            )
        if measured_genes_key is not None and measured_genes_key not in adata.varm:
            raise KeyError(
                f"measured_genes_key={measured_genes_key!r} is not in adata.varm "
                f"(available: {list(adata.varm)})."
            )
        fresh = "source_registry" not in kwargs and not _is_minified(adata)
        if fresh and tissue_key is None and DEFAULT_TISSUE_OBS in adata.obs:
            logger.warning(
                "adata.obs[%r] exists (an earlier setup_anndata or assign_tissues) and is "
                "recomputed now; pass tissue_key=%r to keep it instead.",
                DEFAULT_TISSUE_OBS,
                DEFAULT_TISSUE_OBS,
            )
        cls._write_tissue_columns(
            adata, spatial_key, tissue_key, library_key, batch_key, max_cells
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
        minify_type = adata.uns.get(_ADATA_MINIFY_TYPE_UNS_KEY)
        if minify_type is not None:
            fields += cls._get_fields_for_adata_minification(minify_type)
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with quiet_setup():  # scvi-tools' INFO line naming the coordinates' columns
            manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @staticmethod
    def _write_tissue_columns(
        adata: AnnData,
        spatial_key: str | None,
        tissue_key: str | None,
        library_key: str | None,
        batch_key: str | None,
        max_cells: int | None,
    ) -> None:
        """Write the tissue code and row-index bookkeeping columns."""
        if tissue_key is not None:
            check_obs_key(adata, tissue_key, "tissue_key")
            tissues = adata.obs[tissue_key]
        else:
            assign_tissues(
                adata,
                spatial_key=spatial_key,
                library_key=library_key,
                batch_key=batch_key,
                max_cells=max_cells,
                key_added=DEFAULT_TISSUE_OBS,
            )
            tissues = adata.obs[DEFAULT_TISSUE_OBS]
        codes = pd.Categorical(tissues.astype(str)).codes
        sizes = np.bincount(codes)
        if (sizes == 1).any():
            logger.warning(
                "%d tissue(s) have a single cell: those cells see no context.", (sizes == 1).sum()
            )
        adata.obs[TISSUE_CODE_OBS] = codes.astype(np.int64)
        adata.obs[INDICES_OBS] = np.arange(adata.n_obs, dtype=np.int64)

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        """Check a new AnnData and add its tissue columns before scvi-tools transfers the setup."""
        if self.adata is None:  # built from a registry: any AnnData set up with setup_anndata
            return _registry_data.validate(self, adata)
        if adata is not None and not adata.var_names.equals(self.adata.var_names):
            n_diff = (
                (adata.var_names != self.adata.var_names).sum()
                if adata.n_vars == self.adata.n_vars
                else abs(adata.n_vars - self.adata.n_vars)
            )
            raise ValueError(
                f"adata has other genes than the model's AnnData ({n_diff} differ; same names in "
                "the same order are required). Subset/reorder with adata[:, model.adata.var_names]"
                ", or for official checkpoints call CellPLM.load_official(prefix, adata)."
            )
        if adata is not None and self.get_anndata_manager(adata) is None:
            if adata.n_obs == 0:
                raise ValueError("adata has no cells.")
            args = self.adata_manager._registry["setup_args"]
            check_counts(adata, args["layer"])
            if args["spatial_key"] is not None:
                check_spatial(adata, args["spatial_key"])
            self._write_tissue_columns(
                adata,
                args["spatial_key"],
                args["tissue_key"],
                args["library_key"],
                args["batch_key"],
                args["max_cells"],
            )
        try:
            adata = super()._validate_anndata(adata, copy_if_view=copy_if_view)
        except ValueError as err:
            if "not found" in str(err) and "extend_categories" in str(err):
                raise ValueError(
                    f"{err}\nThis AnnData has a batch_key/labels_key category the model never "
                    "saw. Map it onto the model with CellPLM.load_query_data(adata, model), or "
                    "relabel it to a known category."
                ) from None
            raise
        rows = np.arange(adata.n_obs)  # copies/views of registered data keep a stale index
        if not np.array_equal(adata.obs[INDICES_OBS].to_numpy(), rows):
            adata.obs[INDICES_OBS] = rows
        return adata

    # ------------------------------------------------------------------ query mapping
    @classmethod
    def prepare_query_anndata(
        cls,
        adata: AnnData,
        reference_model: str | os.PathLike | CellPLM,
        return_reference_var_names: bool = False,
        inplace: bool = True,
    ) -> AnnData | list[str] | None:
        """Align a query's genes to a reference model (scvi-tools' ``ArchesMixin`` recipe).

        Genes are reordered as the reference's; reference genes the query lacks are added as
        zero counts and marked unmeasured (``adata.var["_cellplm_padded"]``), so they enter
        neither the loss nor the library size of the query's cells; query genes the reference
        lacks are dropped. The numbers of padded and dropped genes are logged.

        Parameters
        ----------
        adata
            Query AnnData (raw counts).
        reference_model
            A :class:`CellPLM`, or the directory it was saved to.
        return_reference_var_names
            Only return the reference's gene names.
        inplace
            Modify ``adata`` (default), or return the aligned copy.
        """
        reference = _query.reference_of(cls, reference_model)
        return _query.prepare_query_anndata(
            adata, reference.var_names, return_reference_var_names, inplace
        )

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: str | os.PathLike | CellPLM,
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device: int | str = "auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_classifier: bool = True,
        train_decoder: bool = False,
        **kwargs,
    ) -> CellPLM:
        """Map a query dataset onto a trained reference model (scArches-style).

        The query is set up with the reference's setup arguments; new ``batch_key`` categories
        get new rows in the decoder's batch-embedding table. Everything that shapes the
        embedding (gene embedder, Flowformer, pre-latent norm, latent layer, classifier) is
        frozen, so reference cells keep exactly their reference embedding and query cells are
        embedded by the reference encoder. Training then fits only the decoder's embeddings of
        the new batches (and the rest of the decoder with ``train_decoder=True``), which is what
        denoising and imputation of the query need.

        Parameters
        ----------
        adata
            Query AnnData with the reference's genes (see :meth:`prepare_query_anndata`).
        reference_model
            A trained :class:`CellPLM`, or the directory it was saved to.
        inplace_subset_query_vars
            Subset ``adata`` to the reference's genes in place when it has more/reordered genes.
        accelerator, device
            Where to put the query model.
        unfrozen
            Train every parameter.
        freeze_dropout
            Switch dropout off while the query trains.
        freeze_classifier
            Keep the classification head frozen (``False``: fine-tune it too).
        train_decoder
            Also fine-tune the decoder weights shared by all batches.
        **kwargs
            scVI's ``freeze_expression``, ``freeze_decoder_first_layer``,
            ``freeze_batchnorm_encoder``, ``freeze_batchnorm_decoder`` name layers CellPLM has
            not: passing one raises a ``ValueError`` saying what to use.

        Returns
        -------
        CellPLM
            A new model for the query; call :meth:`train` to fit the new batches.
        """
        reference = _query.reference_of(cls, reference_model)
        return _query.load_query_data(
            cls, adata, reference, inplace_subset_query_vars, accelerator, device, unfrozen,
            freeze_dropout, freeze_classifier, train_decoder, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to ``dir_path`` (``<prefix>model.pt``, optionally the AnnData).

        ``model.pt`` has scvi-tools' layout (``model_state_dict``, ``var_names``, ``attr_dict``
        with ``registry_``, ``init_params_``, ``history_``, ...), holding only tensors, lists,
        dicts, strings and numbers: it loads with ``torch.load(weights_only=True)`` and
        scvi-tools' readers (``CellPLM.view_setup_args``, ``CellPLM.load_registry``,
        :class:`scvi.hub.HubMetadata`) read it. The file is written atomically.

        Parameters
        ----------
        dir_path
            Output directory.
        prefix
            File name prefix.
        overwrite
            Overwrite an existing directory.
        save_anndata
            Also write the AnnData as ``<prefix>adata.h5ad``.
        save_kwargs
            Passed to :func:`torch.save`.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.
        """
        if anndata_write_kwargs and not save_anndata:
            raise ValueError(
                f"{sorted(anndata_write_kwargs)} would be passed to AnnData.write_h5ad, but "
                "save_anndata=False (scvi-tools' legacy_mudata_format/datamodule options do not "
                "apply to CellPLM)."
            )
        if save_anndata and self.adata is None:
            raise ValueError("This model has no AnnData to save (built from a registry).")
        dir_path = Path(dir_path)
        if dir_path.exists() and not overwrite:
            raise ValueError(f"{dir_path} already exists; pass overwrite=True to replace it.")
        dir_path.mkdir(parents=True, exist_ok=True)
        prefix = prefix or ""
        if save_anndata:
            self.adata.write_h5ad(dir_path / f"{prefix}adata.h5ad", **anndata_write_kwargs)
        attributes = {
            k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")
        }
        write_model_file(
            dir_path / f"{prefix}model.pt",
            self.module.state_dict(),
            self.registry_["field_registries"][X_KEY]["state_registry"]["column_names"],
            attributes,
            save_kwargs,
        )

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
    ) -> CellPLM:
        """Load a model saved with :meth:`save` (``weights_only=True``; pickles are refused).

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData with the same genes as the training data (default: the saved AnnData).
            A model built from a registry (e.g. trained on a
            :class:`~cellplm_scvi.data.TissueCorpus`) loads without one and reads any AnnData
            set up with :meth:`setup_anndata` (genes aligned to its vocabulary); a given
            ``adata`` is checked.
        accelerator, device
            Where to put the model (Lightning-style, as in scvi-tools).
        prefix
            File name prefix used when saving.
        backup_url
            Not supported (nothing is downloaded); raises if given.
        """
        from scvi.model._utils import parse_device_args
        from scvi.model.base._save_load import _initialize_model

        if backup_url is not None:
            raise ValueError("backup_url is not supported: copy the files to dir_path first.")
        dir_path, prefix = Path(dir_path), prefix or ""
        state, var_names, attributes = read_model_file(dir_path / f"{prefix}model.pt")
        registry = attributes.pop("registry_")
        if registry.get("model_name") != cls.__name__:
            raise ValueError(
                f"{dir_path} holds a {registry.get('model_name')!r} model, not a {cls.__name__}."
            )
        if attributes.get("registry_built_"):  # e.g. corpus-trained: reads any set-up AnnData
            model = _initialize_model(cls, None, registry, attributes, None)
        else:
            if adata is None:
                adata_path = dir_path / f"{prefix}adata.h5ad"
                if not adata_path.is_file():
                    raise ValueError(f"No saved AnnData in {dir_path}: pass `adata=`.")
                import anndata

                adata = anndata.read_h5ad(adata_path)
            if list(adata.var_names) != list(var_names):
                raise ValueError(
                    f"adata's genes differ from the saved model's ({adata.n_vars} vs "
                    f"{len(var_names)} genes, or another order): use adata[:, saved_var_names], "
                    "or CellPLM.prepare_query_anndata(adata, dir_path) to pad missing genes."
                )
            cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
            model = _initialize_model(cls, adata, registry, attributes, None)
        model.module.load_state_dict(state)
        _, _, torch_device = parse_device_args(
            accelerator, device, return_device="torch", validate_single_device=True
        )
        model.to_device(torch_device)
        model.module.eval()
        if model.adata is None and adata is not None:  # check it is set up and aligns
            model._validate_anndata(adata)
        return model

    # ------------------------------------------------------------------ training
    @quiet_training()  # Lightning's hints and two foreign warnings (see cellplm_scvi._quiet)
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int | None = 4000,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config=None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        trainer_config=None,
        lr: float = 5e-4,
        drop_node_rate: float = 0.3,
        gradient_clip_val: float | None = 2.0,
        max_cells_per_step: int | None = None,
        redraw_tissues: bool | int | None = None,
        pack_tissues: bool = False,
        checkpoint_every_n_steps: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        ckpt_path: str | os.PathLike | None = None,
        **trainer_kwargs,
    ):
        """Train on tissue minibatches with scvi-tools' Lightning trainer.

        The arguments are scvi-tools' (:meth:`scvi.model.SCVI.train`), with CellPLM's meaning
        where a minibatch is a tissue.

        Parameters
        ----------
        max_epochs
            Passes over the training tissues (default: scvi-tools' heuristic on ``n_obs``).
        accelerator, devices
            Lightning device selection (``"auto"`` uses one GPU when there is one).
        train_size, validation_size
            Fractions of *tissues* for training and validation.
        shuffle_set_split
            Shuffle tissues before splitting them (``False``: in tissue-code order).
        load_sparse_tensor
            Accepted for scvi-tools compatibility: CellPLM always loads counts as sparse CSR
            tensors.
        batch_size
            Cap on cells per training step: larger tissues are subsampled at each step
            (official ``max_batch_size``). ``None``: whole tissues.
        early_stopping
            Stop on the validation loss (needs validation tissues).
        datasplitter_kwargs
            Passed to :class:`~cellplm_scvi.data.TissueDataSplitter`.
        plan_config, plan_kwargs
            Passed (merged) to :class:`CellPLMTrainingPlan`, e.g. ``weight_decay``,
            ``n_steps_lr_warmup``, ``reduce_lr_on_plateau``.
        datamodule
            A Lightning data module yielding tissue minibatches, used instead of the AnnData's
            splitter.
        trainer_config
            Passed (merged) to :class:`scvi.train.Trainer`, like ``**trainer_kwargs``.
        lr
            AdamW learning rate (linear warm-up, see :class:`CellPLMTrainingPlan`).
        drop_node_rate
            Fraction of a tissue's cells dropped at each step (official node drop).
        gradient_clip_val
            Gradient norm clipping (official fine-tuning: 2.0).
        max_cells_per_step
            Alias of ``batch_size``.
        redraw_tissues
            Train on local tissues drawn anew every epoch (random Voronoi regions of the
            coordinates within each slide, of the registered tissues' mean size, or of this
            many cells for an int; see
            :class:`~cellplm_scvi.data.TissueBatchSampler`), so no cell always sits at a tissue
            border; validation and inference use the registered tissues. ``None``: on for a
            model that hides cells (``hide_cell_rate > 0``) on registered coordinates whose
            slides are known (``setup_anndata(library_key=...)``, or computed tissues without
            it: one slide); with ``tissue_key`` and no ``library_key``, off.
        pack_tissues
            Put several whole tissues in one training step, ``batch_size`` cells at most in all
            (each tissue capped at it), instead of one tissue per step: faster with small
            tissues. Attention stays within each tissue, each tissue is masked and spatially
            scaled alone, and the step's loss is the mean of the per-tissue losses (each with
            its own free-bits floors), so packing changes which tissues share an optimizer
            step, not what is computed for a tissue. Steps per epoch drop about
            ``batch_size / mean tissue size`` times (scale step-based schedules such as
            ``n_steps_lr_warmup`` accordingly). Validation reads one tissue per step. Keeps the
            registered tissues (``redraw_tissues=None`` means off; ``True`` raises). With
            ``datamodule=``, set it on the data module instead
            (:class:`~cellplm_scvi.data.TissueCorpus` ``pack_tissues``).
        checkpoint_every_n_steps
            Write a Lightning checkpoint every N optimiser steps (weights, AdamW moments,
            learning-rate schedulers, global step, the KL warm-up counter, random generators
            and, with a :class:`~cellplm_scvi.data.TissueCorpus`, the place in the epoch), as
            ``<checkpoint_dir>/last.ckpt``. scvi-tools' own ``enable_checkpointing`` saves
            weights only at validation; this is the one to resume from.
        checkpoint_dir
            Folder of those checkpoints (default: ``<scvi.settings.logging_dir>/
            cellplm_checkpoints``); under several nodes, on a shared file system.
        ckpt_path
            Resume from this Lightning checkpoint (scvi-tools' ``ckpt_path``, passed to
            ``Trainer.fit``), or ``"last"``: the newest ``last.ckpt`` in ``checkpoint_dir`` if
            there is one, else a fresh start (so the same command both starts and resumes a
            run). Call it on a model built as the crashed one was, with the same data and
            ``max_epochs``: the run continues at the saved step, and a corpus epoch continues
            with the tissues it had not reached (see ``docs/pretraining.md``).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``strategy="ddp"``,
            ``check_val_every_n_epoch``).
        """
        if max_cells_per_step is not None:
            if batch_size not in (None, 4000, max_cells_per_step):
                raise ValueError("Pass batch_size or its alias max_cells_per_step, not both.")
            batch_size = max_cells_per_step
        if pack_tissues:
            if datamodule is not None:
                raise ValueError(
                    "pack_tissues applies to the AnnData's tissue splitter; with datamodule= set "
                    "it on the data module (e.g. TissueCorpus(..., max_cells_per_step=8000, "
                    "pack_tissues=True))."
                )
            if batch_size is None:
                raise ValueError(
                    "pack_tissues=True needs a cell budget per step: pass batch_size (or "
                    "max_cells_per_step), e.g. 4000."
                )
            if redraw_tissues:
                raise ValueError(
                    "pack_tissues=True and redraw_tissues=True cannot be combined: redrawn "
                    "tissues change size every epoch, and so would the number of packed steps."
                )
            redraw_tissues = False
        if max_epochs is None:
            n_obs = getattr(datamodule, "n_obs", None) if datamodule is not None else None
            n_obs = self.adata.n_obs if datamodule is None else n_obs
            if n_obs is None:
                raise ValueError("Pass max_epochs with a datamodule that has no n_obs.")
            max_epochs = get_max_epochs_heuristic(n_obs)
        trainer_kwargs = merge_kwargs(trainer_config, trainer_kwargs, name="trainer")
        if ckpt_path is None:  # scvi-tools' spelling: inside the trainer arguments
            ckpt_path = trainer_kwargs.pop("ckpt_path", None)
        _checkpoints.check_resume_arguments(checkpoint_every_n_steps, checkpoint_dir, ckpt_path)
        if ckpt_path is not None:
            trainer_kwargs["ckpt_path"] = ckpt_path  # TrainRunner hands it to Trainer.fit
        distributed = use_distributed_sampler(trainer_kwargs.get("strategy"))
        if distributed:  # our tissue sampler shards across ranks itself
            trainer_kwargs.setdefault("use_distributed_sampler", False)
        if datamodule is None:
            datamodule = self._data_splitter_cls(
                self.adata_manager,
                train_size=train_size,
                validation_size=validation_size,
                shuffle_set_split=shuffle_set_split,
                max_cells_per_step=batch_size,
                drop_node_rate=drop_node_rate,
                distributed_sampler=distributed,
                redraw_tissues=self._redraw_default(redraw_tissues),
                **({"pack_tissues": True} if pack_tissues else {}),
                **(datasplitter_kwargs or {}),
            )
        plan_kwargs = {"lr": lr, **merge_kwargs(plan_config, plan_kwargs, name="plan")}
        plan = self._training_plan_cls(self.module, **plan_kwargs)
        if gradient_clip_val is not None:
            trainer_kwargs.setdefault("gradient_clip_val", gradient_clip_val)
        if early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        needs_validation = (
            early_stopping
            or trainer_kwargs.get("check_val_every_n_epoch")
            or plan_kwargs.get("reduce_lr_on_plateau")
        )
        if needs_validation and getattr(datamodule, "n_val", 1) == 0:
            raise ValueError(
                "Validation was requested (early_stopping, check_val_every_n_epoch or "
                "reduce_lr_on_plateau) but no tissue is left for validation: lower train_size, "
                "or use more/smaller tissues (setup_anndata(max_cells=...))."
            )
        if plan_kwargs.get("reduce_lr_on_plateau"):
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        self.module.train()  # inference calls leave the module in eval mode
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=datamodule,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            **trainer_kwargs,
        )
        if checkpoint_every_n_steps is not None:  # not scvi's SaveCheckpoint: see _checkpoints
            checkpoint = _checkpoints.step_checkpoint(checkpoint_every_n_steps, checkpoint_dir)
            runner.trainer.callbacks.append(checkpoint)
        # scvi-tools extends only the keys already in `history_`. A model trained elsewhere
        # (official weights, or a query built from them) has none yet: this run starts it.
        starts_history = self.is_trained_ and not self.history_
        if starts_history:
            self.is_trained_ = False
        try:
            with _registry_data.training_on(self, datamodule):  # a corpus: vocabulary columns
                return runner()
        finally:
            self.is_trained_ = self.is_trained_ or starts_history

    def _redraw_default(self, redraw_tissues: bool | int | None) -> bool | int:
        """``train(redraw_tissues=None)``: on for a cell-hiding model on coordinates."""
        has_coords = SPATIAL_KEY in self.adata_manager.data_registry
        if redraw_tissues is None:  # slides known: library_key, or computed tissues of one slide
            setup = self.adata_manager.registry["setup_args"]
            slides = setup.get("library_key") is not None or setup.get("tissue_key") is None
            redraw_tissues = has_coords and self.module.hide_cell_rate > 0 and slides
        if redraw_tissues and not has_coords:
            raise ValueError(
                "redraw_tissues=True needs coordinates: call setup_anndata(spatial_key=...)."
            )
        return redraw_tissues if redraw_tissues else False

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
        if not use_posterior_mean:
            raise ValueError(
                "use_posterior_mean=False has no meaning here: CellPLM's head classifies the "
                "deterministic pre-latent state, not a latent sample."
            )
        if ig_interpretability or ig_args:
            raise ValueError("Integrated-gradient interpretability is not available for CellPLM.")
        if dataloader is not None:
            raise ValueError("Pass adata/indices instead of a dataloader.")
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
        names = self._label_names()
        if soft:
            return pd.DataFrame(probs, index=index, columns=names)
        return np.asarray(names, dtype=object)[probs.argmax(1)]

    def _refuse_minified(self, method: str) -> None:
        if self.minified_data_type is not None:
            raise ValueError(
                f"{method} needs counts and the tissue context, which a minified AnnData has not. "
                "Load the model with the full AnnData: CellPLM.load(dir_path, adata=full_adata)."
            )

    @property
    def matched_genes(self) -> pd.Index:
        """The AnnData genes found in the model vocabulary (the others are ignored)."""
        return self._decoded_genes(self.adata)

    def _decoded_genes(self, adata: AnnData) -> pd.Index:
        """Names of the AnnData genes the decoder reconstructs (those in the vocabulary)."""
        columns = self.module.matched_columns
        return adata.var_names if columns is None else adata.var_names[columns.cpu().numpy()]

    def impute_genes(
        self,
        gene_list: Sequence[str],
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        library: Literal["measured", "all"] = "measured",
    ) -> pd.DataFrame:
        """Count-scale predictions of ``gene_list`` (e.g. genes a spatial panel did not measure).

        Each cell is decoded from its posterior mean; ``library`` chooses its size factor.

        Parameters
        ----------
        gene_list
            Genes to predict (``var_names`` in the model vocabulary).
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells (default: all).
        batch_size
            Maximum cells per forward pass (``None``: whole tissues).
        library
            ``"measured"`` (default): the decoded means of the genes the cell's batch measured
            (``measured_genes_key`` in :meth:`setup_anndata`) add up to its observed counts,
            the scale at which the imputation objective (official ``NBImputationLoss``) fits
            the model, so predictions of unmeasured genes are on the same scale as the
            measured counts. ``"all"``: the official pipeline's ``predict`` read-out, whose
            size factor spreads the observed counts over *all* decoded genes, unmeasured ones
            included; its predictions are smaller by each cell's share of the decoded mean on
            its measured genes (a factor that varies between cells).

        Returns
        -------
        pandas.DataFrame
            Cells x genes, on the count scale.
        """
        self._refuse_minified("impute_genes")
        if library not in ("measured", "all"):
            raise ValueError(f"library must be 'measured' or 'all', got {library!r}.")
        if library == "measured":
            return self.get_normalized_expression(
                adata, indices, gene_list=gene_list, library_size="observed", batch_size=batch_size
            )
        frequencies = self.get_normalized_expression(
            adata, indices, gene_list=gene_list, library_size=1, batch_size=batch_size
        )  # cells x genes, each cell's decoded genes summing to one
        adata = self._validate_anndata(adata)
        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        x = self.get_from_registry(adata, X_KEY)
        columns = self.module.matched_columns
        x = x[rows] if columns is None else x[rows][:, columns.cpu().numpy()]
        totals = np.asarray(x.sum(1)).reshape(-1, 1)  # observed counts over the decoded genes
        return frequencies * totals

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
        mini.obs[self._OBSERVED_LIB_SIZE_KEY] = library
        self._update_adata_and_manager_post_minification(mini, minified_data_type)
        self.module.minified_data_type = minified_data_type


# a registry-built model (TissueCorpus) reads any AnnData set up with setup_anndata
_registry_data.wrap_methods(CellPLM)


def _is_minified(adata: AnnData) -> bool:
    return adata.uns.get(_ADATA_MINIFY_TYPE_UNS_KEY) is not None
