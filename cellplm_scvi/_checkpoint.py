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
