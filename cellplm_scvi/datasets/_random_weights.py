"""Write a random-weight checkpoint in the official CellPLM file format (for offline demos)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .._genes import official_config
from ..module import CellPLMModule
from ..official._files import model_kwargs, official_state_dict


def random_official_checkpoint(
    prefix: str | os.PathLike,
    latent: str = "vae",
    n_hidden: int = 64,
    n_layers: int = 2,
    n_latent: int = 32,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``<prefix>.config.json`` and ``<prefix>.best.ckpt`` with random weights.

    The files have exactly the layout of the authors' releases (the official 19,374-gene
    vocabulary, ``{"model_state_dict": ...}`` with the official key names) but a small network
    and **random weights**: embeddings from it carry no biology. Use it to try
    :meth:`~cellplm_scvi.CellPLM.load_official` without downloading the real files.

    Parameters
    ----------
    prefix
        Output path without the suffixes, e.g. ``"ckpt/random_85M"``.
    latent
        ``"vae"`` (like ``20231027_85M``) or ``"gmvae"`` (like ``20230926_85M``).
    n_hidden, n_layers, n_latent
        Network size (the real release: 1024, 4, 512).
    seed
        Seed of the random weights.

    Returns
    -------
    The config and checkpoint paths.
    """
    config = official_config()
    config.update(
        enc_hid=n_hidden,
        enc_layers=n_layers,
        post_latent_dim=n_latent,
        dec_hid=n_hidden,
        latent_mod=latent,
        name=f"random_{latent}_{n_hidden}",
    )
    kwargs = model_kwargs(config)
    vocabulary = kwargs.pop("vocabulary")
    kwargs.pop("use_batch_covariate")
    torch.manual_seed(seed)
    module = CellPLMModule(n_vocab=len(vocabulary), **kwargs)
    state = official_state_dict(module)  # official names, the unused GroupNorm, no counters
    config_path, ckpt_path = Path(f"{prefix}.config.json"), Path(f"{prefix}.best.ckpt")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    torch.save({"model_state_dict": state}, ckpt_path)
    return config_path, ckpt_path
