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
from scvi.data.fields import (
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
    NumericalObsField,
    ObsmField,
)
from scvi.model._utils import get_max_epochs_heuristic, use_distributed_sampler
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp
from tqdm import tqdm

from .. import _checkpoint
from .._constants import (
    BATCH_KEY,
    DEFAULT_TISSUE_OBS,
    INDICES_KEY,
    INDICES_OBS,
    LABELS_KEY,
    SPATIAL_KEY,
    TISSUE_CODE_OBS,
    TISSUE_KEY,
    X_KEY,
)
from .._genes import align_genes
from .._validation import check_counts, check_obs_key, check_spatial
from ..data import TissueDataLoader, TissueDataSplitter
from ..module import CellPLMModule
from ..pp import assign_tissues
from ._save_load import public_attributes, read_model_file, write_model_file
from ._training_plan import CellPLMTrainingPlan

logger = logging.getLogger("cellplm_scvi")

_AUTOCAST = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


class CellPLM(BaseModelClass):
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
        ``"gmvae"`` (Gaussian mixture, ``n_clusters`` components) or ``"vae"``.
    n_clusters
        GMVAE components.
    dropout
        Dropout throughout the network (official pretraining: 0.2).
    spatial_pe
        Add the 2-D sinusoidal encoding of coordinates (scaled to [0, 1] per tissue). ``None``:
        on when coordinates are registered.
    mask_cell_rate, mask_gene_rate
        Masking of the training objective: fraction of a tissue's cells masked, and fraction of
        the entries of a masked cell hidden from the encoder.
    dae
        Add the NB loss of the hidden entries alone (official ``dae``).
    vocabulary
        Gene vocabulary of the embedding table and decoder (e.g. an official checkpoint's
        Ensembl IDs). ``None``: the AnnData's genes. Genes outside it are ignored.
    gene_key
        ``adata.var`` column with gene IDs or symbols to match ``vocabulary`` (default:
        ``var_names``).
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

    def __init__(
        self,
        adata: AnnData | None = None,
        n_hidden: int = 256,
        n_layers: int = 2,
        n_heads: int = 8,
        n_latent: int = 32,
        latent: Literal["gmvae", "vae"] = "gmvae",
        n_clusters: int = 16,
        dropout: float = 0.1,
        spatial_pe: bool | None = None,
        mask_cell_rate: float = 0.75,
        mask_gene_rate: float = 0.25,
        dae: bool = True,
        vocabulary: Sequence[str] | None = None,
        gene_key: str | None = None,
        **module_kwargs,
    ):
        super().__init__(adata)
        if self.adata.n_obs == 0:
            raise ValueError("adata has no cells.")
        has_coords = SPATIAL_KEY in self.adata_manager.data_registry
        spatial_pe = has_coords if spatial_pe is None else spatial_pe
        if spatial_pe and not has_coords:
            raise ValueError(
                "spatial_pe=True needs coordinates: call setup_anndata(spatial_key=...)."
            )
        if vocabulary is not None:
            vocabulary = list(vocabulary)
        gene_index = self._gene_index(self.adata, vocabulary, gene_key)
        n_batch = self.summary_stats.n_batch
        derived = {  # from the registered data; explicit module_kwargs win
            "decoder_covariates": {"batch": n_batch} if n_batch > 1 else {},
            "n_labels": len(self._label_names()),
            "measured_genes": self._measured_genes(self.adata),
        }
        self.module = self._module_cls(
            n_vocab=self.adata.n_vars if vocabulary is None else len(vocabulary),
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
            dae=dae,
            **{**derived, **module_kwargs},
        )
        n_params = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"CellPLM: n_hidden={n_hidden}, n_layers={n_layers}, n_latent={n_latent}, "
            f"latent={latent!r}, spatial_pe={spatial_pe}, "
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
        args = self.adata_manager.registry["setup_args"]
        if args.get("labels_key") is None:
            return []
        state = self.adata_manager.get_state_registry(LABELS_KEY)
        return [c for c in state.categorical_mapping if c != state.unlabeled_category]

    def _measured_genes(self, adata: AnnData) -> np.ndarray | None:
        """(n_batch, n_genes) bool from ``adata.varm[measured_genes_key]``, or ``None``."""
        key = self.adata_manager.registry["setup_args"].get("measured_genes_key")
        if key is None:
            return None
        table = adata.varm[key]
        batches = list(self.adata_manager.get_state_registry(BATCH_KEY).categorical_mapping)
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
        prefix: str | Sequence[str],
        adata: AnnData,
        gene_key: str | None = None,
        spatial_pe: bool = False,
        trust_pickle: bool = False,
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
            ``adata.var`` column holding the gene IDs or symbols.
        spatial_pe
            Add the spatial encoding. The official code never does, so the pretrained weights
            were not trained with it: for experiments only.
        trust_pickle
            Allow a checkpoint that needs full unpickling (runs code from the file).

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
        config_path, ckpt_path = _checkpoint.official_paths(prefix)
        config = _checkpoint.read_config(config_path)
        state = _checkpoint.read_state_dict(ckpt_path, trust_pickle=trust_pickle)
        model = cls(
            adata, spatial_pe=spatial_pe, gene_key=gene_key, **_checkpoint.model_kwargs(config)
        )
        _checkpoint.load_strict(model.module, state, fresh_prefixes=("classifier.",))
        model.module.eval()
        model.is_trained_ = True
        model.history_ = {}  # pretrained elsewhere: the first `train` call starts the history
        model.official_config_ = {k: v for k, v in config.items() if k != "gene_list"}
        return model

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        spatial_key: str | None = None,
        tissue_key: str | None = None,
        library_key: str | None = None,
        max_cells: int = 1000,
        unlabeled_category: str = "Unknown",
        measured_genes_key: str | None = None,
        **kwargs,
    ) -> None:
        """%(summary)s.

        Counts must be raw (finite, non-negative integers). Cells are grouped into tissues, the
        sets of cells that attend to each other: ``tissue_key`` if given, else
        :func:`cellplm_scvi.pp.assign_tissues` (spatially contiguous groups from a squidpy graph
        when ``spatial_key`` is given, else chunks of each ``batch_key`` sample). This writes
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
        spatial_key
            ``adata.obsm`` key of (n_cells, 2) spatial coordinates, or ``None``.
        tissue_key
            ``adata.obs`` column assigning each cell to a tissue (e.g. a field of view). If
            ``None``, tissues are computed.
        library_key
            ``adata.obs`` column of slides; computed tissues never span two slides.
        max_cells
            Maximum cells per computed tissue.
        unlabeled_category
            Value of ``labels_key`` marking cells without a label (they still train the
            reconstruction objective and receive a prediction).
        measured_genes_key
            ``adata.varm`` key of a genes x batches boolean DataFrame (columns: ``batch_key``
            categories) saying which genes each batch measured, e.g. a spatial panel next to an
            scRNA-seq reference. The loss then ignores unmeasured genes. Batches without a
            column measured every gene.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if adata.n_obs == 0:
            raise ValueError("adata has no cells; nothing to set up.")
        if adata.n_vars == 0:
            raise ValueError("adata has no genes; nothing to set up.")
        check_counts(adata, layer)
        for key, argument in [
            (batch_key, "batch_key"),
            (labels_key, "labels_key"),
            (library_key, "library_key"),
        ]:
            check_obs_key(adata, key, argument)
        if spatial_key is not None:
            check_spatial(adata, spatial_key)
        if measured_genes_key is not None and measured_genes_key not in adata.varm:
            raise KeyError(
                f"measured_genes_key={measured_genes_key!r} is not in adata.varm "
                f"(available: {list(adata.varm)})."
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
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @staticmethod
    def _write_tissue_columns(
        adata: AnnData,
        spatial_key: str | None,
        tissue_key: str | None,
        library_key: str | None,
        batch_key: str | None,
        max_cells: int,
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

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: CellPLM,
        train_decoder: bool = False,
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
            Query AnnData with the reference's genes (raw counts in the same layer).
        reference_model
            A trained :class:`CellPLM`.
        train_decoder
            Also fine-tune the decoder weights shared by all batches.

        Returns
        -------
        CellPLM
            A new model for the query; call :meth:`train` to fit the new batches.
        """
        if not isinstance(reference_model, cls):
            raise ValueError(f"reference_model must be a {cls.__name__}.")
        registry = reference_model.adata_manager.registry
        setup_args = dict(registry["setup_args"])
        cls.setup_anndata(
            adata,
            source_registry=registry,
            extend_categories=True,
            allow_missing_labels=True,
            **setup_args,
        )
        params = reference_model.init_params_
        kwargs = {k: v for group in params["kwargs"].values() for k, v in group.items()}
        reference_state = reference_model.module.state_dict()
        query = cls(adata, **params["non_kwargs"], **kwargs)
        state = query.module.state_dict()
        unknown = sorted(set(state) - set(reference_state))
        if unknown:
            raise ValueError(
                "The reference model has no decoder batch table (it was trained on a single "
                f"batch; new parameters: {unknown[:3]}), so query batches cannot be added. Embed "
                "the query with reference_model.get_latent_representation(adata) instead."
            )
        grown = {}  # covariate tables with new rows: reference rows are copied and frozen
        for key, value in reference_state.items():
            if state[key].shape == value.shape:
                state[key] = value
            else:
                state[key][: value.shape[0]] = value
                grown[key] = value.shape[0]
        query.module.load_state_dict(state)
        query.module.requires_grad_(False)
        for name, param in query.module.named_parameters():
            if train_decoder and name.startswith("decoder."):
                param.requires_grad_(True)
            elif name in grown:
                param.requires_grad_(True)
                n_old = grown[name]
                param.register_hook(lambda g, n=n_old: torch.cat([torch.zeros_like(g[:n]), g[n:]]))
                param.no_weight_decay = True  # decoupled decay would still shrink frozen rows
        query.is_trained_ = reference_model.is_trained_
        query.history_ = {k: v.copy() for k, v in (reference_model.history_ or {}).items()}
        return query

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to ``dir_path`` (``<prefix>model.pt``, optionally the AnnData).

        The file holds tensors, the gene names and a JSON description (setup, init arguments
        incl. the vocabulary, history), so it loads with ``torch.load(weights_only=True)``.

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
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.
        """
        dir_path = Path(dir_path)
        if dir_path.exists() and not overwrite:
            raise ValueError(f"{dir_path} already exists; pass overwrite=True to replace it.")
        dir_path.mkdir(parents=True, exist_ok=True)
        prefix = prefix or ""
        if save_anndata:
            self.adata.write_h5ad(dir_path / f"{prefix}adata.h5ad", **anndata_write_kwargs)
        write_model_file(
            dir_path / f"{prefix}model.pt",
            self.module.state_dict(),
            self.adata.var_names,
            public_attributes(self),
        )

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
    ) -> CellPLM:
        """Load a model saved with :meth:`save` (``weights_only=True``; pickles are refused).

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData with the same genes as the training data (default: the saved AnnData).
        accelerator, device
            Where to put the model (Lightning-style, as in scvi-tools).
        prefix
            File name prefix used when saving.
        """
        from scvi.model._utils import parse_device_args
        from scvi.model.base._save_load import _initialize_model

        dir_path, prefix = Path(dir_path), prefix or ""
        state, var_names, attributes = read_model_file(dir_path / f"{prefix}model.pt")
        registry = attributes.pop("registry_")
        if registry.get("model_name") != cls.__name__:
            raise ValueError(
                f"{dir_path} holds a {registry.get('model_name')!r} model, not a {cls.__name__}."
            )
        if adata is None:
            adata_path = dir_path / f"{prefix}adata.h5ad"
            if not adata_path.is_file():
                raise ValueError(f"No saved AnnData in {dir_path}: pass `adata=`.")
            import anndata

            adata = anndata.read_h5ad(adata_path)
        if list(adata.var_names) != list(var_names):
            raise ValueError(
                f"adata's genes differ from the saved model's ({adata.n_vars} vs "
                f"{len(var_names)} genes, or another order): use adata[:, saved_var_names]."
            )
        cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
        model = _initialize_model(cls, adata, registry, attributes, None)
        model.module.load_state_dict(state)
        _, _, torch_device = parse_device_args(
            accelerator, device, return_device="torch", validate_single_device=True
        )
        model.to_device(torch_device)
        model.module.eval()
        return model

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 5e-4,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        max_cells_per_step: int | None = 4000,
        drop_node_rate: float = 0.3,
        early_stopping: bool = False,
        gradient_clip_val: float | None = 2.0,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train on tissue minibatches with scvi-tools' Lightning trainer.

        Parameters
        ----------
        max_epochs
            Passes over the training tissues (default: scvi-tools' heuristic on ``n_obs``).
        lr
            AdamW learning rate (linear warm-up, see :class:`CellPLMTrainingPlan`).
        accelerator, devices
            Lightning device selection (``"auto"`` uses one GPU when there is one).
        train_size, validation_size
            Fractions of *tissues* for training and validation.
        max_cells_per_step
            Tissues larger than this are subsampled at each step (official ``max_batch_size``).
        drop_node_rate
            Fraction of a tissue's cells dropped at each step (official node drop).
        early_stopping
            Stop on the validation loss (needs validation tissues).
        gradient_clip_val
            Gradient norm clipping (official fine-tuning: 2.0).
        plan_kwargs
            Passed to :class:`CellPLMTrainingPlan` (e.g. ``weight_decay``, ``n_steps_lr_warmup``).
        datasplitter_kwargs
            Passed to :class:`~cellplm_scvi.data.TissueDataSplitter`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``strategy="ddp"``,
            ``check_val_every_n_epoch``).
        """
        if max_epochs is None:
            max_epochs = get_max_epochs_heuristic(self.adata.n_obs)
        distributed = use_distributed_sampler(trainer_kwargs.get("strategy"))
        if distributed:  # our tissue sampler shards across ranks itself
            trainer_kwargs.setdefault("use_distributed_sampler", False)
        splitter = self._data_splitter_cls(
            self.adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            max_cells_per_step=max_cells_per_step,
            drop_node_rate=drop_node_rate,
            distributed_sampler=distributed,
            **(datasplitter_kwargs or {}),
        )
        plan_kwargs = {"lr": lr, **(plan_kwargs or {})}
        plan = self._training_plan_cls(self.module, **plan_kwargs)
        if gradient_clip_val is not None:
            trainer_kwargs.setdefault("gradient_clip_val", gradient_clip_val)
        if early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        wants_validation = early_stopping or trainer_kwargs.get("check_val_every_n_epoch")
        if wants_validation and splitter.n_val == 0:
            raise ValueError(
                "Validation was requested (early_stopping or check_val_every_n_epoch) but no "
                "tissue is left for validation: lower train_size, or use more/smaller tissues "
                "(setup_anndata(max_cells=...))."
            )
        self.module.train()  # inference calls leave the module in eval mode
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            **trainer_kwargs,
        )
        # scvi-tools extends only the keys already in `history_`. A model trained elsewhere
        # (official weights, or a query built from them) has none yet: this run starts it.
        starts_history = self.is_trained_ and not self.history_
        if starts_history:
            self.is_trained_ = False
        try:
            return runner()
        finally:
            self.is_trained_ = self.is_trained_ or starts_history

    # ------------------------------------------------------------------ inference
    def _tissue_loader(
        self, adata: AnnData | None, indices: Sequence[int] | None, batch_size: int | None
    ) -> tuple[AnnData, np.ndarray, TissueDataLoader]:
        adata = self._validate_anndata(adata)
        indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        if len(np.unique(indices)) != len(indices):
            raise ValueError("indices contains duplicates; pass each cell once.")
        loader = TissueDataLoader(
            self.get_anndata_manager(adata, required=True),
            indices=indices,
            batch_size=batch_size,
            shuffle=False,
        )
        return adata, indices, loader

    @torch.inference_mode()
    def _collect(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        batch_size: int | None,
        step,
        progress_bar: bool = False,
        precision: Literal["32", "bf16", "16"] = "32",
    ) -> dict[str, np.ndarray]:
        """Run ``step(tensors) -> dict of (n, ...) arrays`` per tissue, in ``indices`` order."""
        if precision not in _AUTOCAST:
            raise ValueError(f"precision must be one of {list(_AUTOCAST)}, got {precision!r}.")
        adata, indices, loader = self._tissue_loader(adata, indices, batch_size)
        self.module.eval()
        autocast = torch.autocast(
            self.device.type, dtype=_AUTOCAST[precision], enabled=precision != "32"
        )
        position = np.full(adata.n_obs, -1, dtype=np.int64)
        position[indices] = np.arange(len(indices))
        results: dict[str, np.ndarray] = {}
        for tensors in tqdm(loader, desc="tissues", disable=not progress_bar):
            rows = position[tensors[INDICES_KEY].view(-1).numpy()]
            with autocast:
                out = step(tensors)
            for key, value in out.items():
                value = value.float().cpu().numpy() if torch.is_tensor(value) else value
                if key not in results:
                    results[key] = np.zeros((len(indices), *value.shape[1:]), dtype=value.dtype)
                results[key][rows] = value
        return results

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        give_mean: bool = True,
        return_dist: bool = False,
        progress_bar: bool = False,
        precision: Literal["32", "bf16", "16"] = "32",
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Cell embeddings, (n_cells, n_latent), in the order of ``adata`` (or ``indices``).

        Every tissue is encoded as one set, so a cell's embedding depends on the other cells of
        its tissue but not on the row order of ``adata``. For ``"gmvae"`` the cluster is
        ``argmax q(y|h)`` and the embedding is the posterior mean of ``q(z|h, y)``
        (deterministic, unlike the official code's Gumbel sample).

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells to embed (default: all). Tissues are formed from these cells only.
        batch_size
            Maximum cells per forward pass; larger tissues are cut into random chunks (which
            changes their context). ``None``: whole tissues.
        give_mean
            Return the posterior mean (``False``: one sample).
        return_dist
            Return the posterior mean and variance instead.
        progress_bar
            Show a progress bar over tissues.
        precision
            ``"bf16"`` or ``"16"`` runs the network under :func:`torch.autocast` (GPU speed-up;
            the sparse gene-embedding product stays in float32). Results are returned as
            float32; expect differences of about 1e-2 relative to ``"32"``.
        """

        def step(tensors):
            out = self.module.inference(**self.module._get_inference_input(tensors))
            if return_dist:
                return {"qz_m": out["qz_m"], "qz_v": out["qz_v"]}
            z = out["qz_m"]
            if not give_mean:
                z = z + out["qz_v"].sqrt() * torch.randn_like(z)
            return {"z": z}  # collect only what is returned (1M cells x 512 = 2 GB each)

        res = self._collect(adata, indices, batch_size, step, progress_bar, precision)
        if return_dist:
            return res["qz_m"], res["qz_v"]
        return res["z"]

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predict cell types with the classification head (like ``SCANVI.predict``).

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells to predict (default: all).
        soft
            Return a DataFrame of class probabilities (rows sum to one) instead of names.
        batch_size
            Maximum cells per forward pass (``None``: whole tissues).

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

        def step(tensors):
            out = self.module.inference(**self.module._get_inference_input(tensors))
            return {"probs": out["logits"].softmax(-1)}

        probs = self._collect(adata, indices, batch_size, step)["probs"]
        names = self._label_names()
        adata = self._validate_anndata(adata)
        index = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
        if soft:
            return pd.DataFrame(probs, index=index, columns=names)
        return np.asarray(names, dtype=object)[probs.argmax(1)]

    @property
    def matched_genes(self) -> pd.Index:
        """The AnnData genes found in the model vocabulary (the others are ignored)."""
        return self._decoded_genes(self.adata)

    def _decoded_genes(self, adata: AnnData) -> pd.Index:
        """Names of the AnnData genes the decoder reconstructs (those in the vocabulary)."""
        columns = self.module.matched_columns
        return adata.var_names if columns is None else adata.var_names[columns.cpu().numpy()]

    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["observed"] = 1.0,
        batch_size: int | None = None,
        return_numpy: bool = False,
    ) -> pd.DataFrame | np.ndarray:
        """Decoder's expected expression of each cell (denoised; also unmeasured genes).

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells (default: all).
        gene_list
            Genes to return (``var_names``; default: all genes the decoder knows).
        library_size
            A number: expression frequencies scaled to this total per cell (scvi-tools
            semantics). ``"observed"``: the count scale, the mean rescaled so that each cell's
            *measured* genes add up to its observed counts (official imputation).
        batch_size
            Maximum cells per forward pass (``None``: whole tissues).
        return_numpy
            Return an array instead of a DataFrame.
        """
        adata = self._validate_anndata(adata)
        genes = self._decoded_genes(adata)
        gene_list = genes if gene_list is None else pd.Index(gene_list)
        missing = gene_list.difference(genes)
        if len(missing):
            raise KeyError(
                f"gene_list has genes the model cannot decode: {list(missing)[:10]} (they must "
                "be var_names of adata and in the model vocabulary)."
            )
        columns = torch.as_tensor(genes.get_indexer(gene_list))
        module = self.module

        def step(tensors):
            inf = module.inference(**module._get_inference_input(tensors))
            mean = module.generative(**module._get_generative_input(tensors, inf))["px_mean"]
            if library_size == "observed":
                x = module.observed_counts(tensors[X_KEY].to(mean.device))
                w = module.measured_weights(tensors)
                w = torch.ones_like(mean) if w is None else w.to(mean.device, mean.dtype)
                scale = (x * w).sum(1, keepdim=True) / (mean * w).sum(1, keepdim=True)
            else:
                scale = float(library_size) / mean.sum(1, keepdim=True)
            return {"expr": (mean * scale)[:, columns.to(mean.device)]}

        expr = self._collect(adata, indices, batch_size, step)["expr"]
        if return_numpy:
            return expr
        index = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
        return pd.DataFrame(expr, index=index, columns=gene_list)

    def impute_genes(
        self,
        gene_list: Sequence[str],
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Count-scale predictions of ``gene_list`` (e.g. genes a spatial panel did not measure).

        The size factor of each cell comes from the genes its batch measured (see
        ``measured_genes_key`` in :meth:`setup_anndata`), as in the official imputation
        pipeline.

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

        Returns
        -------
        pandas.DataFrame
            Cells x genes, on the count scale.
        """
        return self.get_normalized_expression(
            adata, indices, gene_list, library_size="observed", batch_size=batch_size
        )
