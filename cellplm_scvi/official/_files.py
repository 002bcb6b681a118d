"""Official CellPLM checkpoints: reading the files and mapping the config to our model.

An official release is ``<prefix>.config.json`` (constructor arguments plus the gene vocabulary)
and ``<prefix>.best.ckpt`` (``{"model_state_dict": ...}``). Our module keeps the official
state-dict names, so loading is strict: every key must exist with the same shape, except the
two parameters of a normalisation layer the official forward never calls (``DEAD_KEYS``) and
training counters the official files do not hold (a layer's ``training_state`` buffers, e.g. the
VAE's KL warm-up step, which then start at 0 as in the official code).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("cellplm_scvi")

DEAD_KEYS = ("embedder.norm0.weight", "embedder.norm0.bias")

# config values our re-implementation supports; anything else would silently change the model
_REQUIRED = {
    "enc_mod": "flowformer",
    "dec_mod": "nbmlp",
    "norm": "groupnorm",
    "cat_pe": False,
    "dsbn": False,
    "ecs": False,
    "dar": False,
    "input_covariate": False,
}


def official_paths(prefix: str | os.PathLike | tuple) -> tuple[Path, Path]:
    """``"dir/20231027_85M"`` -> (``…config.json``, ``…best.ckpt``); a (config, ckpt) pair is
    returned as is."""
    if isinstance(prefix, tuple | list):
        if len(prefix) != 2:
            raise ValueError("Pass a prefix or a (config_path, checkpoint_path) pair.")
        return Path(prefix[0]), Path(prefix[1])
    prefix = str(prefix)
    for suffix in (".config.json", ".best.ckpt"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return Path(prefix + ".config.json"), Path(prefix + ".best.ckpt")


def read_config(path: Path) -> dict:
    """Read an official ``config.json`` and check it describes a model we implement."""
    if not path.is_file():
        raise FileNotFoundError(f"Official config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid JSON config: {err}") from None
    if not isinstance(config, dict) or "gene_list" not in config:
        raise ValueError(f"{path} has no 'gene_list': not an official CellPLM config.")
    missing = [
        k
        for k in ("enc_hid", "enc_layers", "post_latent_dim", "dec_hid", "dec_layers")
        if k not in config
    ]
    if missing:
        raise ValueError(f"{path} lacks the config keys {missing}.")
    bad = {k: config[k] for k, v in _REQUIRED.items() if k in config and config[k] != v}
    if config.get("latent_mod", "vae") not in ("gmvae", "vae"):
        bad["latent_mod"] = config["latent_mod"]
    if config.get("head_type") is not None:
        bad["head_type"] = config["head_type"]
    if config.get("out_dim", len(config["gene_list"])) != len(config["gene_list"]):
        bad["out_dim"] = config["out_dim"]
    if bad:
        raise ValueError(f"Unsupported CellPLM config values in {path}: {bad}.")
    return config


def read_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load ``model_state_dict`` on the CPU with ``weights_only=True``.

    A file that needs arbitrary unpickling is refused unless ``trust_pickle=True`` (then a
    warning is issued). Tensors come back detached, contiguous and on the CPU.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Official checkpoint not found: {path}")
    unreadable = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"Could not read checkpoint {path} (corrupt or truncated?).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise ValueError(
                f"Could not read checkpoint {path} (corrupt or truncated?)."
            ) from None
        if not trust_pickle:
            raise ValueError(
                f"{path} contains pickled Python objects beyond tensors, which can run code when "
                "loaded. If you trust its source, pass trust_pickle=True."
            ) from err
        warnings.warn(f"Loading {path} with full unpickling (trust_pickle=True).", stacklevel=3)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except (*unreadable, AttributeError, ModuleNotFoundError) as err2:
            raise ValueError(f"Could not unpickle checkpoint {path}: {err2}") from None
    except unreadable[1:] as err:
        raise ValueError(
            f"Could not read checkpoint {path} (corrupt or truncated?): {err}"
        ) from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} has no 'model_state_dict' (found {keys}).")
    state = ckpt["model_state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'model_state_dict' is a {type(state).__name__}, not a dict.")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: 'model_state_dict' has non-tensor entries {bad[:5]}.")
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def model_kwargs(config: dict) -> dict:
    """Map an official config to :class:`~cellplm_scvi.CellPLM` constructor arguments."""
    latent = config.get("latent_mod", "vae")
    if latent == "gmvae":
        latent_kwargs = {
            "lamda": config.get("lamda", 0.5),
            "w_li": config.get("w_li", 1.0),
            "w_en": config.get("w_en", 1.0),
        }
    else:  # OmicsFormer never passes the config's lamda to the VAE layer (it keeps 1.0)
        latent_kwargs = {"lamda": 1.0}
    covariates = {name: config.get(f"{name}_num", 0) for name in ("batch", "dataset", "platform")}
    return {
        "n_hidden": config["enc_hid"],
        "n_layers": config["enc_layers"],
        "n_heads": config.get("enc_head", 8),
        "n_latent": config["post_latent_dim"],
        "latent": latent,
        "n_clusters": config.get("num_clusters", 16),
        "dropout": config.get("model_dropout", 0.1),
        "n_dec_hidden": config["dec_hid"],
        "n_dec_layers": config["dec_layers"],
        "mask_cell_rate": config.get("mask_node_rate", 0.5),
        "mask_gene_rate": config.get("mask_feature_rate", 0.8),
        "dae": config.get("dae", True),
        "decoder_covariates": {k: v for k, v in covariates.items() if v > 0},
        "use_batch_covariate": False,
        "latent_kwargs": latent_kwargs,
        "vocabulary": list(config["gene_list"]),
    }


def load_strict(
    module: nn.Module, state: dict[str, torch.Tensor], fresh_prefixes: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is an error.

    Parameters whose name starts with one of ``fresh_prefixes`` (e.g. a new classification head
    that the checkpoint cannot hold) keep their initialisation.
    """
    state = {k: v for k, v in state.items() if k not in DEAD_KEYS}
    expected = module.state_dict()
    # training counters (e.g. the VAE's KL warm-up step) that official files cannot hold: a
    # missing one keeps the module's initial value, as a fresh official model would
    counters = {
        f"{name}.{key}" if name else key: expected[f"{name}.{key}" if name else key]
        for name, sub in module.named_modules()
        for key in getattr(sub, "training_state", ())
    }
    state = {**{k: v for k, v in counters.items() if k not in state}, **state}
    fresh = {k: v for k, v in expected.items() if k.startswith(fresh_prefixes)}
    if fresh_prefixes and any(k.startswith(fresh_prefixes) for k in state):
        fresh = {}
    missing = sorted(set(expected) - set(state) - set(fresh))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            "The checkpoint does not match the model built from its config.\n"
            f"missing keys: {missing}\nunexpected keys: {unexpected}\n"
            f"shape mismatches: {mismatched}"
        )
    module.load_state_dict({**fresh, **state}, strict=True)


# ------------------------------------------------------------------------------------ export

OFFICIAL_COVARIATES = ("batch", "dataset", "platform")  # the official decoder's tables
_OFFICIAL_QZ_HIDDEN = 512  # hidden width of the official GMVAE's q(z|h,y) (hard-coded there)
_OFFICIAL_NB_HIDDEN = 128  # hidden width of the official NB head (hard-coded there)
# official VAE layer settings that OmicsFormer never takes from its config
_OFFICIAL_VAE = {"lamda": 1.0, "kl_warmup_steps": 10_000, "max_kl_weight": 1.0}


def _decoder_tables(module: nn.Module) -> dict[str, int]:
    """Decoder covariate table name -> levels (empty without covariates or hidden layers)."""
    layers = module.decoder.covariate_layers
    if len(layers) == 0:
        return {}
    return {name: int(block[0].num_embeddings) for name, block in layers[0].items()}


def check_exportable(module: nn.Module) -> None:
    """Raise a ``ValueError`` naming every part of ``module`` the official network lacks.

    The official ``OmicsFormer`` cannot represent: the spatial positional encoding (its
    embedder adds the constant 0 instead), decoder covariate tables other than ``batch``,
    ``dataset`` and ``platform`` (e.g. those of ``categorical_covariate_keys``), and hidden
    widths that it hard-codes (512 in the GMVAE's ``q(z|h,y)``, 128 in the NB head), and a
    perturbation encoder.
    """
    problems = []
    if getattr(module, "use_spatial_pe", False):
        problems.append(
            "the spatial positional encoding (use_spatial_pe=True): the official embedder adds "
            "0 instead, so the official model would embed the cells differently. Export a model "
            "built with spatial_pe=False."
        )
    if getattr(module, "perturbation_encoder", None) is not None:
        problems.append(
            "the perturbation encoder (setup_anndata(perturbation_key=...)): the official "
            "network takes no perturbation. Save the model with model.save(...) instead."
        )
    extra = sorted(set(_decoder_tables(module)) - set(OFFICIAL_COVARIATES))
    if extra:
        problems.append(
            f"the decoder covariate tables {extra}: the official decoder has only the "
            f"{list(OFFICIAL_COVARIATES)} tables. Train the model without "
            "setup_anndata(categorical_covariate_keys=...) (a batch_key is fine)."
        )
    layer = module.latent.layers[1]
    if module.latent_type == "gmvae":
        width = layer.inference.inference_qzyx[0].out_features
        if width != _OFFICIAL_QZ_HIDDEN:
            problems.append(
                f"the GMVAE's q(z|h,y) hidden width {width}: the official layer fixes it at "
                f"{_OFFICIAL_QZ_HIDDEN}."
            )
    elif module.latent_type != "vae":
        problems.append(f"the latent layer {module.latent_type!r}: only 'gmvae' and 'vae'.")
    width = module.decoder.out_layer.dec_1.out_features
    if width != _OFFICIAL_NB_HIDDEN:
        problems.append(
            f"the NB head's hidden width {width}: the official head fixes it at "
            f"{_OFFICIAL_NB_HIDDEN}."
        )
    if problems:
        raise ValueError(
            "This model cannot be exported to the official CellPLM format; the official network "
            "lacks " + "; ".join(problems)
        )


def export_config(module: nn.Module, vocabulary: list[str], extra: dict | None = None) -> dict:
    """The official ``config.json`` of ``module``: the inverse of :func:`model_kwargs`.

    Every argument that the official ``OmicsFormer(**config)`` needs to build the same network
    is set explicitly (architecture, ``gene_list``, decoder tables ``batch_num`` /
    ``dataset_num`` / ``platform_num``, latent settings, ``model_dropout``, mask rates,
    ``dae``), together with the fixed choices our module implements (``_REQUIRED``,
    ``pe_type="sin"``, ``mask_type="input"``, no head).

    Parameters
    ----------
    module
        A :class:`~cellplm_scvi.module.CellPLMModule`.
    vocabulary
        The gene of each row of the gene-embedding table (``module.n_vocab`` unique strings).
    extra
        Further config entries to keep (e.g. the pretraining settings of the release a model
        was loaded from: ``name``, ``drop_node_rate``, ``max_batch_size``); the values computed
        from ``module`` win.

    Raises
    ------
    ValueError
        For a part the official network cannot represent (see :func:`check_exportable`) or a
        vocabulary that does not fit the module.
    """
    check_exportable(module)
    vocabulary = [str(g) for g in vocabulary]
    if len(vocabulary) != module.n_vocab:
        raise ValueError(
            f"`vocabulary` has {len(vocabulary)} genes but the model's gene-embedding table has "
            f"{module.n_vocab} rows."
        )
    if len(set(vocabulary)) != len(vocabulary):
        duplicated = sorted(g for g, n in Counter(vocabulary).items() if n > 1)[:5]
        raise ValueError(
            f"`vocabulary` has duplicated genes {duplicated}: the official embedder finds a "
            "gene's row by its name, so every name must be unique (make the AnnData's "
            "var_names unique before training)."
        )
    encoder_layers = module.encoder.layers
    layer = module.latent.layers[1]
    tables = _decoder_tables(module)
    config = dict(extra or {})
    config.update(
        gene_list=vocabulary,
        enc_hid=int(module.embedder.feat_enc.emb.shape[1]),
        enc_layers=len(encoder_layers),
        enc_head=int(encoder_layers[0].self_attn.n_heads) if len(encoder_layers) else 8,
        post_latent_dim=int(module.n_latent),
        dec_hid=int(module.decoder.out_layer.dec_1.in_features),
        dec_layers=len(module.decoder.layers) + 1,
        out_dim=len(vocabulary),
        **{f"{name}_num": tables.get(name, 0) for name in OFFICIAL_COVARIATES},
        latent_mod=module.latent_type,
        model_dropout=float(module.embedder.extra_linear[2].p),
        mask_type="input",
        mask_node_rate=float(module.mask_cell_rate),
        mask_feature_rate=float(module.mask_gene_rate),
        dae=bool(module.dae),
        pe_type="sin",
        activation="gelu",
        head_type=None,
        **_REQUIRED,  # enc_mod, dec_mod, norm, cat_pe and the official options left off
    )
    if module.latent_type == "gmvae":
        config.update(
            num_clusters=int(layer.n_clusters),
            lamda=float(layer.lamda),
            w_li=float(layer.w_li),
            w_en=float(layer.w_en),
        )
    else:
        ours = {name: getattr(layer, name) for name in _OFFICIAL_VAE}
        differ = {k: v for k, v in ours.items() if v != _OFFICIAL_VAE[k]}
        if differ:
            warnings.warn(
                f"The VAE latent's training settings {differ} cannot be written: the official "
                f"VAE layer always uses {_OFFICIAL_VAE}. The weights and embeddings are "
                "exported unchanged; official fine-tuning would use its own settings.",
                UserWarning,
                stacklevel=3,
            )
    return config


def official_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s weights under the official ``OmicsFormer`` names (float32, CPU).

    The names are ours already; the differences are:

    - training counters (a layer's ``training_state`` buffers, e.g. the VAE's
      ``latent.layers.1.kl_step_count``) are dropped: the official model has none and starts
      its KL warm-up at 0, as :func:`load_strict` does when reading the file back;
    - the cell-type head ``classifier.*`` is dropped with a warning: ``OmicsFormer`` has no
      such head (the official annotation pipeline builds its own). This suits the
      pretraining use case; the exported model embeds and reconstructs identically;
    - the official embedder's never-called ``embedder.norm0`` GroupNorm (``DEAD_KEYS``) is
      added with its initial values (weight 1, bias 0), which a strict load needs.

    Raises
    ------
    ValueError
        For a part the official network cannot represent (see :func:`check_exportable`).
    """
    check_exportable(module)
    state = module.state_dict()
    counters = {
        f"{name}.{key}" if name else key
        for name, sub in module.named_modules()
        for key in getattr(sub, "training_state", ())
    }
    head = [k for k in state if k.startswith("classifier.")]
    if head:
        warnings.warn(
            "The cell-type head (classifier.*) is not exported: the official OmicsFormer has no "
            "such head. The exported model embeds and reconstructs as this one.",
            UserWarning,
            stacklevel=3,
        )
    out = {}
    for key, value in state.items():
        if key in counters or key in head:
            continue
        value = value.detach().to("cpu")
        out[key] = (value.float() if value.is_floating_point() else value).clone().contiguous()
    n_hidden = module.embedder.feat_enc.emb.shape[1]
    weight_key, bias_key = DEAD_KEYS
    out[weight_key], out[bias_key] = torch.ones(n_hidden), torch.zeros(n_hidden)
    return out
