"""The official fine-tuning and pretraining recipes: ``load_official`` overrides and
``train`` arguments of the authors' pipelines, and their gene selection."""

from __future__ import annotations

from typing import Any

from anndata import AnnData

from .._genes import official_config

# `load_official` overrides of the official pipelines' model configs
# (`CellTypeAnnotationDefaultModelConfig`, `ImputationDefaultModelConfig`)
ANNOTATION_OVERRIDES = {
    "objective": "annotation",
    "dropout": 0.5,
    "classifier_dropout": 0.5,
    "mask_cell_rate": 0.75,
    "mask_gene_rate": 0.25,
}
# `TissueCorpus` arguments of the official pretraining (config `max_batch_size`, `drop_node_rate`)
PRETRAINING_CORPUS_KWARGS = {"max_cells_per_step": 4000, "drop_node_rate": 0.3}
IMPUTATION_OVERRIDES = {
    "objective": "imputation",
    "mask_cell_rate": 0.95,
    "mask_gene_rate": 0.25,
    "dae": False,
}


def annotation_recipe(
    max_epochs: int = 2000,
    lr: float = 5e-3,
    weight_decay: float = 1e-7,
    early_stopping_patience: int = 200,
    split_key: str | None = "split",
    **train_kwargs,
) -> dict[str, Any]:
    """:meth:`CellPLM.train` arguments of the official ``CellTypeAnnotationPipeline.fit``.

    Use with a model loaded with :data:`ANNOTATION_OVERRIDES` on the genes of
    :func:`select_official_hvgs`::

        model = CellPLM.load_official(prefix, hvg_adata, **ANNOTATION_OVERRIDES)
        model.train(**annotation_recipe())

    AdamW in two groups (embedder: ``lr * 0.1``, weight decay 1e-10; encoder, latent and
    head: ``lr``, ``weight_decay``; the pre-latent norm and decoder are not optimised), the
    second group warmed up over 30 epochs, ``ReduceLROnPlateau(factor=0.95, patience=25)``
    stepped on every step's loss, gradient norm clipped at 2, node drop 0.3, validation every
    epoch, the state of the best validation macro-F1 restored at the end and early stopping
    after ``early_stopping_patience`` epochs without a better F1.

    Parameters
    ----------
    max_epochs, lr, weight_decay, early_stopping_patience
        Official ``epochs``, ``lr``, ``wd`` and ``es``.
    split_key
        ``adata.obs`` column with ``"train"``/``"validation"``/``"test"`` per cell (the
        official ``split_field``): validation cells stay in the forward pass, out of the loss.
        ``None``: a random cell split (``train_size``, ``validation_size``).
    **train_kwargs
        Replace or add :meth:`CellPLM.train` arguments.
    """
    plan_kwargs = {
        "weight_decay": weight_decay,
        "n_steps_lr_warmup": 0,
        "embedder_lr_factor": 0.1,
        "embedder_weight_decay": 1e-10,
        "optimized_modules": ("embedder", "encoder", "latent", "classifier"),
        "n_epochs_lr_warmup": 30,
        "lr_warmup_groups": "rest",
        "plateau": {"factor": 0.95, "patience": 25, "interval": "step"},
        "keep_best_state": "validation_f1",
    }
    kwargs = {
        "max_epochs": max_epochs,
        "lr": lr,
        "batch_size": 70_000,
        "drop_node_rate": 0.3,
        "gradient_clip_val": 2.0,
        "check_val_every_n_epoch": 1,
        "early_stopping": True,
        "early_stopping_monitor": "validation_f1",
        "early_stopping_mode": "max",
        "early_stopping_patience": early_stopping_patience,
        "datasplitter_kwargs": {"split_by": "cells", "split_key": split_key},
        "plan_kwargs": plan_kwargs,
    }
    return {**kwargs, **train_kwargs}


def imputation_recipe(
    max_epochs: int = 100,
    lr: float = 5e-4,
    weight_decay: float = 1e-6,
    split_key: str | None = None,
    **train_kwargs,
) -> dict[str, Any]:
    """:meth:`CellPLM.train` arguments of the official ``ImputationPipeline.fit``.

    Use with a model loaded with :data:`IMPUTATION_OVERRIDES` (NB loss of all cells on their
    measured genes, no DAE term, 95% of cells masked)::

        model = CellPLM.load_official(prefix, adata, **IMPUTATION_OVERRIDES)
        model.train(**imputation_recipe())
        model.impute_genes(targets, library="all")  # the official read-out

    AdamW over all parameters (``lr``, ``weight_decay``), every group warmed up over 5
    epochs, ``ReduceLROnPlateau(factor=0.9, patience=5)`` on each epoch's mean training loss,
    gradient norm clipped at 2, node drop 0.3, validation every epoch and the state of the
    lowest validation loss restored at the end.

    Parameters
    ----------
    max_epochs, lr, weight_decay
        Official ``epochs``, ``lr`` and ``wd``.
    split_key
        ``adata.obs`` column with each cell's split (cells of one tissue may differ); ``None``:
        the cells of every tissue are split (``train_size``, ``validation_size``).
    **train_kwargs
        Replace or add :meth:`CellPLM.train` arguments.
    """
    plan_kwargs = {
        "weight_decay": weight_decay,
        "n_steps_lr_warmup": 0,
        "n_epochs_lr_warmup": 5,
        "lr_warmup_groups": "all",
        "plateau": {"factor": 0.9, "patience": 5, "interval": "epoch"},
        "keep_best_state": "validation_loss",
    }
    kwargs = {
        "max_epochs": max_epochs,
        "lr": lr,
        "batch_size": 70_000,
        "drop_node_rate": 0.3,
        "gradient_clip_val": 2.0,
        "check_val_every_n_epoch": 1,
        "plan_kwargs": plan_kwargs,
    }
    if split_key is not None:
        kwargs["datasplitter_kwargs"] = {"split_key": split_key}
    return {**kwargs, **train_kwargs}


def pretraining_recipe(config: str = "20230926_85M", **train_kwargs) -> dict[str, Any]:
    """:meth:`CellPLM.train` arguments of the official pretraining, for (continued)
    pretraining on a :class:`~cellplm_scvi.data.TissueCorpus`.

    The optimiser settings of the official config (``lr`` 2e-4, ``wd`` 1e-8 for
    ``"20230926_85M"``): AdamW at ``lr`` with weight decay ``weight_decay``. Pair it with a
    corpus built with :data:`PRETRAINING_CORPUS_KWARGS` (the config's ``max_batch_size`` and
    ``drop_node_rate``)::

        dm = TissueCorpus(files, vocabulary="20230926_85M", **PRETRAINING_CORPUS_KWARGS)
        model = CellPLM.load_official(prefix, adata)  # or CellPLM(adata=None, registry=...)
        model.train(datamodule=dm, max_epochs=10, **pretraining_recipe())

    Parameters
    ----------
    config
        Name of a vendored official config (:func:`cellplm_scvi._genes.available_configs`).
    **train_kwargs
        Replace or add :meth:`CellPLM.train` arguments (e.g. ``max_epochs``; the official
        pretraining ran the config's ``epochs``, 200, over its corpus).
    """
    settings = official_config(config)
    kwargs = {"lr": settings["lr"], "plan_kwargs": {"weight_decay": settings["wd"]}}
    if "plan_kwargs" in train_kwargs:  # merge: a caller's plan_kwargs add to the recipe's
        kwargs["plan_kwargs"].update(train_kwargs.pop("plan_kwargs") or {})
    return {**kwargs, **train_kwargs}


def select_official_hvgs(
    adata: AnnData, n_top_genes: int = 3000, layer: str | None = None
) -> AnnData:
    """The official annotation pipeline's genes: ``n_top_genes`` seurat_v3 highly variable
    genes of the raw counts (``layer``, default ``X``). Returns a subset copy; ``adata`` is
    not modified. Select them before ``setup_anndata``: the model's genes are fixed there."""
    import scanpy as sc

    if n_top_genes >= adata.n_vars:
        return adata.copy()
    flags = sc.pp.highly_variable_genes(
        adata, n_top_genes=n_top_genes, flavor="seurat_v3", layer=layer, inplace=False
    )
    return adata[:, flags["highly_variable"].to_numpy()].copy()
