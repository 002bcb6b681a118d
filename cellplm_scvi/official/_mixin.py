"""The authors' released weights: :class:`OfficialMixin` loads an official checkpoint into a
model and exports a model as one (the files themselves: :mod:`cellplm_scvi.official._files`)."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from anndata import AnnData

from . import _files
from ._download import official_files

if TYPE_CHECKING:
    from ..model import CellPLM

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
    "vocabulary": (
        "the checkpoint's gene list fixes it (extend_vocabulary=True adds the AnnData's others)"
    ),
    "n_vocab": "the checkpoint's gene list fixes it",
    "gene_index": "it is computed from the AnnData's genes",
    "decoder_covariates": "the checkpoint's decoder tables fix it",
    "use_batch_covariate": (
        "the checkpoint's batch table indexes pretraining samples, not this AnnData's batches"
    ),
    "n_labels": "it comes from setup_anndata(labels_key=...)",
    "measured_genes": "it comes from setup_anndata(measured_genes_key=...)",
    "latent_kwargs": "pass lamda, w_li or w_en by name",
    "spatial_pe": "the official network has no spatial encoding",
    "use_spatial_pe": "the official network has no spatial encoding",
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
        The official config (as read by :func:`cellplm_scvi.official._files.read_config`).

    Returns
    -------
    The :class:`CellPLM` constructor arguments replacing those of
    :func:`~cellplm_scvi.official._files.model_kwargs`, and the latent type of the model (a latent
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
        fresh = _files.model_kwargs({**config, "latent_mod": latent})
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
        base = kwargs.get("latent_kwargs") or _files.model_kwargs(config)["latent_kwargs"]
        kwargs["latent_kwargs"] = {**base, **options}
    return kwargs, latent


class OfficialMixin:
    """Official CellPLM releases: :meth:`load_official` and :meth:`save_official`."""

    @classmethod
    def load_official(
        cls,
        prefix: str | os.PathLike | Sequence[str],
        adata: AnnData,
        gene_key: str | None = None,
        trust_pickle: bool = False,
        extend_vocabulary: bool = False,
        **overrides,
    ) -> CellPLM:
        """Load an official pretrained CellPLM release (e.g. ``20231027_85M``).

        The config file gives the architecture (``"gmvae"`` or ``"vae"`` latent, widths,
        vocabulary); the weights are loaded strictly on the CPU with ``weights_only=True``. The
        model is ready for zero-shot embedding, and can be fine-tuned with :meth:`train`. It
        uses the ``"official"`` preset (no cell hidden, no local heads, no spatial encoding),
        whatever the AnnData registers.

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
        trust_pickle
            Allow a checkpoint that needs full unpickling (runs code from the file).
        extend_vocabulary
            Add the AnnData's genes outside the vocabulary as new rows of the gene-embedding
            table and the decoder, which fine-tuning then trains; the outputs on the
            vocabulary genes stay as the checkpoint gives them (see
            :meth:`extend_vocabulary`, which also adds a chosen subset and can freeze all but
            the new rows).
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
        CellPLM
            The model holding the pretrained weights, in evaluation mode. Decoder covariates of
            new data use the mean pretraining embedding.

        Examples
        --------
        >>> cp.CellPLM.setup_anndata(adata, layer="counts", batch_key="sample")
        >>> model = cp.CellPLM.load_official("ckpt/20231027_85M", adata)
        >>> adata.obsm["X_cellplm"] = model.get_latent_representation()
        """
        if not isinstance(extend_vocabulary, bool):
            raise ValueError(
                f"extend_vocabulary must be True or False, got {extend_vocabulary!r} (to add "
                "chosen genes: load_official(...).extend_vocabulary(genes))."
            )
        config_path, ckpt_path = official_files(prefix)  # a name: the cache, else a download
        config = _files.read_config(config_path)
        replaced, latent = check_overrides(overrides, config)  # before reading a large file
        state = _files.read_state_dict(ckpt_path, trust_pickle=trust_pickle)
        kwargs = {**_files.model_kwargs(config), **replaced}
        # the official objective: no cell is hidden whole, whatever the AnnData registers
        model = cls(
            adata,
            spatial_pe=False,
            gene_key=gene_key,
            hide_cell_rate=0.0,
            preset="official",
            **kwargs,
        )
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
        _files.load_strict(
            model.module, state, fresh_prefixes=("classifier.", "perturbation_encoder.")
        )
        model.module.eval()
        model.is_trained_ = True
        model.history_ = {}  # pretrained elsewhere: the first `train` call starts the history
        model.official_config_ = {k: v for k, v in config.items() if k != "gene_list"}
        return model.extend_vocabulary() if extend_vocabulary else model

    def save_official(self, prefix: str | os.PathLike, overwrite: bool = False) -> None:
        """Export the model as an official CellPLM release, usable by the ``cellplm`` package.

        Writes ``<prefix>.config.json`` (the official ``OmicsFormer`` arguments, ``gene_list``
        = the model's vocabulary: the ``vocabulary`` it was built with, else the AnnData's
        ``var_names``) and ``<prefix>.best.ckpt`` (``{"model_state_dict": ...}``, float32 CPU
        tensors under the official names), each atomically (a temporary file, then
        :func:`os.replace`), after everything is checked. The official code builds the network
        with ``OmicsFormer(**config)``, loads the weights strictly and embeds the cells as this
        model does; :meth:`load_official` reads the files back.

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
        import json

        import torch

        config_path, ckpt_path = _files.official_paths(prefix)
        existing = [str(p) for p in (config_path, ckpt_path) if p.exists()]
        if existing and not overwrite:
            raise ValueError(f"{existing} already exist; pass overwrite=True to replace them.")
        state = _files.official_state_dict(self.module)
        extra = getattr(self, "official_config_", None)
        config = _files.export_config(self.module, model_vocabulary(self), extra)
        text = json.dumps(config).encode()
        config_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(ckpt_path, lambda fh: torch.save({"model_state_dict": state}, fh))
        _write_atomically(config_path, lambda fh: fh.write(text))
        logger.info("Wrote the official CellPLM files %s and %s.", config_path, ckpt_path)


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
