"""Model files that load with ``torch.load(weights_only=True)``.

scvi-tools pickles the model's attributes (registry, history, ...) into ``model.pt`` and loads it
with ``weights_only=False``, so a tampered file can run code. We write the same content as
tensors plus one JSON string, and refuse anything else on load.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

FORMAT = "cellplm_scvi/1"


def _encode(obj):
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _encode(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, pd.DataFrame):
        return {
            "__dataframe__": {
                "index": _encode(obj.index.to_numpy()),
                "index_name": obj.index.name,
                "columns": [str(c) for c in obj.columns],
                "data": {str(c): _encode(obj[c].to_numpy()) for c in obj.columns},
            }
        }
    if isinstance(obj, pd.Index):
        return _encode(obj.to_numpy())
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"Cannot store a {type(obj).__name__} in a CellPLM model file.")


def _decode(obj):
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__dataframe__" in obj:
        frame = obj["__dataframe__"]
        index = pd.Index(_decode(frame["index"]), name=frame["index_name"])
        data = {c: _decode(frame["data"][c]) for c in frame["columns"]}
        return pd.DataFrame(data, index=index, columns=frame["columns"])
    return {k: _decode(v) for k, v in obj.items()}


def public_attributes(model) -> dict:
    """The attributes scvi-tools saves: public names ending in ``_``."""
    return {k: v for k, v in vars(model).items() if k.endswith("_") and not k.startswith("_")}


def write_model_file(path: Path, state: dict, var_names, attributes: dict) -> None:
    """Write tensors, var names and a JSON string of ``attributes``."""
    payload = {
        "format": FORMAT,
        "model_state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "var_names": [str(v) for v in var_names],
        "attributes": json.dumps(_encode(attributes)),
    }
    torch.save(payload, path)


def read_model_file(path: Path) -> tuple[dict, list[str], dict]:
    """Read a file written by :func:`write_model_file` with ``weights_only=True``."""
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"Could not read {path}: not a torch zip file (corrupt or truncated?, or a raw "
            "pickle, which is refused)."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise ValueError(f"Could not read {path} (corrupt or truncated?).") from None
        raise ValueError(
            f"Refusing to load {path}: it contains pickled Python objects beyond tensors (a "
            "tampered file, or one saved by another tool). Files written by CellPLM.save load "
            "with weights_only=True."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"Could not read {path} (corrupt or truncated?): {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a CellPLM model file (no '{FORMAT}' marker).")
    return (
        payload["model_state_dict"],
        payload["var_names"],
        _decode(json.loads(payload["attributes"])),
    )
