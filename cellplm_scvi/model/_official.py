"""The authors' released weights: loading an official checkpoint into a :class:`CellPLM`."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from anndata import AnnData

from .. import _checkpoint
from .._genes import official_config
from ..official._download import official_files

if TYPE_CHECKING:
    from ._cellplm import CellPLM

logger = logging.getLogger("cellplm_scvi")

LATENTS = ("gmvae", "vae")  # latent layers of our module
# loss options of each latent layer (its constructor arguments besides the widths)
_LATENT_OPTIONS = {
    "gmvae": ("lamda", "w_li", "w_en"),
    "vae": ("lamda", "kl_warmup_steps", "max_kl_weight"),
}

# overrides accepted by `load_official`: they change training or a fresh layer, never the shapes
# of the pretrained weights
OVERRIDES = (
    "dropout",
    "mask_cell_rate",
    "mask_gene_rate",
    "dae",
    "latent",
    "n_clusters",
    "lamda",
    "w_li",
    "w_en",
    "kl_warmup_steps",
    "max_kl_weight",
    "classification_ratio",
    "classifier_dropout",
    "objective",
)

# ---------------------------------------------------------------- official fine-tuning recipes
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
        whole tissues are split (``train_size``, ``validation_size``).
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


# official config names -> ours (the official pipelines' `overwrite_config`)
_OFFICIAL_NAMES = {
    "model_dropout": "dropout",
    "mask_node_rate": "mask_cell_rate",
    "mask_feature_rate": "mask_gene_rate",
    "latent_mod": "latent",
    "num_clusters": "n_clusters",
}
# official config names that are arguments of `CellPLM.train` here
_TRAIN_ARGUMENTS = {"drop_node_rate": "drop_node_rate", "max_batch_size": "max_cells_per_step"}
# arguments that the checkpoint's weights or the registered AnnData fix
_FIXED = {
    "n_hidden": "the checkpoint's weights fix it",
    "n_layers": "the checkpoint's weights fix it",
    "n_heads": "the checkpoint's config fixes it",
    "n_latent": "the checkpoint's decoder fixes it",
    "n_dec_hidden": "the checkpoint's weights fix it",
    "n_dec_layers": "the checkpoint's weights fix it",
    "vocabulary": "the checkpoint's gene list fixes it",
    "n_vocab": "the checkpoint's gene list fixes it",
    "gene_index": "it is computed from the AnnData's genes",
    "decoder_covariates": "the checkpoint's decoder tables fix it",
    "use_batch_covariate": (
        "the checkpoint's batch table indexes pretraining samples, not this AnnData's batches"
    ),
    "n_labels": "it comes from setup_anndata(labels_key=...)",
    "measured_genes": "it comes from setup_anndata(measured_genes_key=...)",
    "latent_kwargs": "pass lamda, w_li or w_en by name",
    "use_spatial_pe": "pass spatial_pe",
}


def _check_fraction(name: str, value: Any, closed_right: bool) -> float:
    ok_type = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok_type and (0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")
    return float(value)


def _check_non_negative(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
    return float(value)


def check_overrides(overrides: dict[str, Any], config: dict) -> tuple[dict[str, Any], str]:
    """Validate ``load_official`` overrides against an official config.

    Parameters
    ----------
    overrides
        The keyword arguments given to ``load_official`` beyond its named parameters.
    config
        The official config (as read by :func:`cellplm_scvi._checkpoint.read_config`).

    Returns
    -------
    The :class:`CellPLM` constructor arguments replacing those of
    :func:`~cellplm_scvi._checkpoint.model_kwargs`, and the latent type of the model (a latent
    other than the config's is a fresh layer).

    Raises
    ------
    TypeError
        For an unknown name, or one that the checkpoint or the AnnData fixes.
    ValueError
        For a value out of range or a combination that has no meaning.
    """
    for name in overrides:
        if name in OVERRIDES:
            continue
        allowed = ", ".join(OVERRIDES)
        if name in _OFFICIAL_NAMES:
            hint = f"use the name `{_OFFICIAL_NAMES[name]}` (the official config's `{name}`)"
        elif name in _TRAIN_ARGUMENTS:
            hint = f"pass `{_TRAIN_ARGUMENTS[name]}` to `model.train()` instead"
        elif name in _FIXED:
            hint = f"it cannot be overridden: {_FIXED[name]}"
        else:
            hint = "it is not an argument that can replace the checkpoint's"
        raise TypeError(
            f"load_official() got an unexpected argument `{name}`: {hint}. Allowed overrides: "
            f"{allowed}."
        )

    config_latent = config.get("latent_mod", "vae")
    latent = overrides.get("latent", config_latent)
    if latent not in LATENTS:
        extra = (
            " The official annotation pipeline's deterministic 'ae' latent is not implemented."
            if latent == "ae"
            else ""
        )
        raise ValueError(f"`latent` must be one of {list(LATENTS)}, got {latent!r}.{extra}")
    fresh_latent = latent != config_latent
    kwargs: dict[str, Any] = {}
    if fresh_latent:  # the constructor arguments of the official model with that latent_mod
        fresh = _checkpoint.model_kwargs({**config, "latent_mod": latent})
        kwargs.update(latent=latent, latent_kwargs=fresh["latent_kwargs"])

    if "dropout" in overrides:
        kwargs["dropout"] = _check_fraction("dropout", overrides["dropout"], closed_right=False)
    for name in ("mask_cell_rate", "mask_gene_rate"):
        if name in overrides:
            kwargs[name] = _check_fraction(name, overrides[name], closed_right=True)
    if "classifier_dropout" in overrides:
        kwargs["classifier_dropout"] = _check_fraction(
            "classifier_dropout", overrides["classifier_dropout"], closed_right=False
        )
    if "classification_ratio" in overrides:
        kwargs["classification_ratio"] = _check_non_negative(
            "classification_ratio", overrides["classification_ratio"]
        )
    if "objective" in overrides:
        objectives = ("pretrain", "imputation", "annotation")
        if overrides["objective"] not in objectives:
            raise ValueError(
                f"`objective` must be one of {list(objectives)}, got {overrides['objective']!r}."
            )
        kwargs["objective"] = overrides["objective"]
    if "dae" in overrides:
        if not isinstance(overrides["dae"], bool):
            raise ValueError(f"`dae` must be True or False, got {overrides['dae']!r}.")
        kwargs["dae"] = overrides["dae"]

    if "n_clusters" in overrides:
        n_clusters = overrides["n_clusters"]
        if latent != "gmvae":
            raise ValueError("`n_clusters` applies to the 'gmvae' latent only.")
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral):
            raise ValueError(f"`n_clusters` must be an integer >= 2, got {n_clusters!r}.")
        if n_clusters < 2:
            raise ValueError(f"`n_clusters` must be an integer >= 2, got {n_clusters!r}.")
        pretrained = config.get("num_clusters", 16)
        if not fresh_latent and n_clusters != pretrained:
            raise ValueError(
                f"`n_clusters={n_clusters}` differs from the checkpoint's {pretrained} clusters, "
                "whose weights it would not fit. Only a fresh latent layer (`latent` other than "
                f"the checkpoint's {config_latent!r}) can have another number of clusters."
            )
        kwargs["n_clusters"] = int(n_clusters)

    all_options = {name for names in _LATENT_OPTIONS.values() for name in names}
    options = {k: v for k, v in overrides.items() if k in all_options}
    foreign = sorted(set(options) - set(_LATENT_OPTIONS[latent]))
    if foreign:
        raise ValueError(
            f"{foreign} do not apply to the {latent!r} latent (its options: "
            f"{list(_LATENT_OPTIONS[latent])})."
        )
    if "kl_warmup_steps" in options:
        steps = options["kl_warmup_steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"`kl_warmup_steps` must be an integer >= 0, got {steps!r}.")
        options["kl_warmup_steps"] = int(steps)
    for name in set(options) - {"kl_warmup_steps"}:
        options[name] = _check_non_negative(name, options[name])
    if options:
        base = kwargs.get("latent_kwargs") or _checkpoint.model_kwargs(config)["latent_kwargs"]
        kwargs["latent_kwargs"] = {**base, **options}
    return kwargs, latent


def load_official(
    cls: type[CellPLM],
    prefix: str | os.PathLike | Sequence[str],
    adata: AnnData,
    gene_key: str | None = None,
    spatial_pe: bool = False,
    trust_pickle: bool = False,
    **overrides,
) -> CellPLM:
    """Build ``cls`` from an official config + checkpoint (see :meth:`CellPLM.load_official`).

    Parameters
    ----------
    cls
        The model class (:class:`~cellplm_scvi.CellPLM` or a subclass).
    prefix
        ``"<dir>/<name>"`` for ``<name>.config.json`` + ``<name>.best.ckpt``, or a
        ``(config_path, checkpoint_path)`` pair.
    adata
        Raw counts registered with :meth:`CellPLM.setup_anndata`.
    gene_key
        ``adata.var`` column holding the gene IDs or symbols.
    spatial_pe
        Add the spatial encoding (the pretrained weights were trained without it).
    trust_pickle
        Allow a checkpoint that needs full unpickling (runs code from the file).
    **overrides
        Arguments that replace the config's, by our name (an official config name, e.g.
        ``model_dropout``, is refused with the name to use). None of them changes the
        pretrained weights or the zero-shot embedding of a kept latent; they act on training
        (fine-tuning) or on a fresh layer:

        - ``dropout``: dropout of the embedder, encoder and decoder, in [0, 1) (config:
          ``model_dropout``; the official annotation pipeline uses 0.5). The attention output
          keeps the official model's fixed 0.01.
        - ``mask_cell_rate``: fraction of a tissue's cells masked per training step, in
          [0, 1] (config: ``mask_node_rate``). The official code masks
          ``int(rate * n_cells)`` cells; ours masks ``max(1, int(rate * n_cells))`` so that a
          small tissue still has a reconstruction target. 0 (or ``mask_gene_rate=0``) turns
          masking off, as the official ``NullMaskBuilder``.
        - ``mask_gene_rate``: probability that an entry of a masked cell is hidden, in [0, 1]
          (config: ``mask_feature_rate``).
        - ``dae``: add the NB term of the hidden entries alone.
        - ``latent``: ``"gmvae"`` or ``"vae"``. The checkpoint's own latent keeps its
          pretrained weights; the other one is a **fresh, randomly initialised** latent layer
          (the checkpoint's latent weights are dropped), built as the official model with
          that ``latent_mod`` (a fresh ``"vae"`` has KL threshold 1, a fresh ``"gmvae"`` the
          config's ``lamda``, ``w_li``, ``w_en`` and ``num_clusters``). The encoder and the
          decoder keep their weights, so the model needs fine-tuning before its embedding
          means anything. The official annotation pipeline's deterministic ``"ae"`` latent is
          not implemented.
        - ``n_clusters``: number of GMVAE components; only for a fresh ``"gmvae"`` latent (or
          equal to the checkpoint's).
        - ``lamda``: KL free-bits floor of the latent loss (``"gmvae"``: of both terms;
          ``"vae"``: the weighted KL counts only above it).
        - ``w_li``, ``w_en``: weights of the Gaussian and categorical KL terms (``"gmvae"``
          only).
        - ``kl_warmup_steps``, ``max_kl_weight``: the official linear KL warm-up of the
          ``"vae"`` latent (steps, 0 for none; final weight), which restarts at 0 for a
          loaded checkpoint as in the official fine-tuning (``"vae"`` only).
        - ``classification_ratio``, ``classifier_dropout``: weight of the cross-entropy and
          dropout inside the fresh cell-type head (with ``setup_anndata(labels_key=...)``).
        - ``objective``: ``"pretrain"``, ``"imputation"`` or ``"annotation"``, the training
          loss (see :class:`~cellplm_scvi.module.CellPLMModule`; :data:`ANNOTATION_OVERRIDES`
          and :data:`IMPUTATION_OVERRIDES` hold the official pipelines' settings).

        Unknown names raise :class:`TypeError` listing the allowed ones; bad values raise
        :class:`ValueError`.

    Returns
    -------
    The model holding the pretrained weights, in evaluation mode.
    """
    config_path, ckpt_path = official_files(prefix)  # a name: the cache, else a download
    config = _checkpoint.read_config(config_path)
    replaced, latent = check_overrides(overrides, config)  # before reading a large checkpoint
    state = _checkpoint.read_state_dict(ckpt_path, trust_pickle=trust_pickle)
    kwargs = {**_checkpoint.model_kwargs(config), **replaced}
    # the official objective: no cell is hidden whole, whatever the AnnData registers
    model = cls(adata, spatial_pe=spatial_pe, gene_key=gene_key, hide_cell_rate=0.0, **kwargs)
    if latent != config.get("latent_mod", "vae"):
        # a fresh latent layer: the checkpoint's latent weights give way to the new layer's
        state = {k: v for k, v in state.items() if not k.startswith("latent.")}
        fresh = model.module.state_dict()
        state.update({k: v for k, v in fresh.items() if k.startswith("latent.")})
        logger.info(
            "The %r latent layer is freshly initialised (the checkpoint's is %r): fine-tune "
            "before using the embedding.",
            latent,
            config.get("latent_mod", "vae"),
        )
    _checkpoint.load_strict(model.module, state, fresh_prefixes=("classifier.",))
    model.module.eval()
    model.is_trained_ = True
    model.history_ = {}  # pretrained elsewhere: the first `train` call starts the history
    model.official_config_ = {k: v for k, v in config.items() if k != "gene_list"}
    return model


# ------------------------------------------------------------------------------------ export


def _write_atomically(path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def model_vocabulary(model: CellPLM) -> list[str]:
    """The gene of each row of ``model``'s gene-embedding table: the ``vocabulary`` it was
    built with (an official checkpoint's gene list), else the registered ``var_names``."""
    from scvi import REGISTRY_KEYS

    params = model.init_params_
    vocabulary = params.get("non_kwargs", params).get("vocabulary")
    if vocabulary is None:
        state = model.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY)
        vocabulary = state.column_names
    return [str(g) for g in vocabulary]


def save_official(model: CellPLM, prefix: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``model`` as an official CellPLM release (see :meth:`CellPLM.save_official`).

    Writes ``<prefix>.best.ckpt`` (``{"model_state_dict": ...}``, float32 CPU tensors under the
    official names) and ``<prefix>.config.json`` (the ``OmicsFormer`` arguments and
    ``gene_list``), each atomically (a temporary file, then :func:`os.replace`). Everything is
    checked before a file is touched.

    Raises
    ------
    ValueError
        If a file exists and ``overwrite`` is False, or the official network cannot represent
        a part of the model (the message names it).
    """
    import json

    import torch

    config_path, ckpt_path = _checkpoint.official_paths(prefix)
    existing = [str(p) for p in (config_path, ckpt_path) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing} already exist; pass overwrite=True to replace them.")
    state = _checkpoint.official_state_dict(model.module)
    extra = getattr(model, "official_config_", None)
    config = _checkpoint.official_config(model.module, model_vocabulary(model), extra)
    text = json.dumps(config).encode()
    config_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(ckpt_path, lambda fh: torch.save({"model_state_dict": state}, fh))
    _write_atomically(config_path, lambda fh: fh.write(text))
    logger.info("Wrote the official CellPLM files %s and %s.", config_path, ckpt_path)
