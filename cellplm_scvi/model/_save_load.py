"""Model files in scvi-tools' layout that load with ``torch.load(weights_only=True)``.

scvi-tools writes ``model.pt`` as ``{"model_state_dict", "var_names", "attr_dict"}`` and pickles
whatever the attributes hold (numpy arrays, DataFrames), so loading it runs the unpickler on
arbitrary objects. We write the same layout with plain values only: arrays become lists and
DataFrames dicts of lists; ``attr_dict["cellplm_arrays_"]`` records where they were, so that
:func:`read_model_file` gives back the original types. scvi-tools' readers
(``view_setup_args``, ``load_registry``, ``scvi.hub.HubMetadata.from_dir``) read the file as is.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

FORMAT = "cellplm_scvi/2"
_LEGACY_FORMAT = "cellplm_scvi/1"  # tensors + one JSON string (first release)
_ARRAYS = "cellplm_arrays_"  # attr_dict entry: path -> how to restore a list / dict


def _plain(obj, path: str, types: dict):
    """``obj`` with arrays/DataFrames as lists/dicts; their paths and kinds go to ``types``."""
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{path}/{k}", types) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v, f"{path}/{i}", types) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        types[path] = ["ndarray", str(obj.dtype)]
        return _plain(obj.tolist(), path, {})
    if isinstance(obj, pd.DataFrame):
        dtypes = {str(c): str(obj[c].dtype) for c in obj}
        types[path] = ["dataframe", obj.index.name, str(obj.index.dtype), dtypes]
        return {
            "index": _plain(obj.index.to_numpy().tolist(), path, {}),
            "columns": {str(c): _plain(obj[c].to_numpy().tolist(), path, {}) for c in obj},
        }
    if isinstance(obj, pd.Index):
        types[path] = ["ndarray", str(obj.dtype)]
        return _plain(obj.to_numpy().tolist(), path, {})
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"Cannot store a {type(obj).__name__} (at {path}) in a CellPLM model file.")


def _restore(obj, path: str, types: dict):
    kind = types.get(path)
    if kind is not None and kind[0] == "ndarray":
        return np.asarray(obj, dtype=_numpy_dtype(kind[1]))
    if kind is not None and kind[0] == "dataframe":
        _, name, index_dtype, dtypes = kind
        index = pd.Index(np.asarray(obj["index"], dtype=_numpy_dtype(index_dtype)), name=name)
        columns = {
            c: np.asarray(v, dtype=_numpy_dtype(dtypes[c])) for c, v in obj["columns"].items()
        }
        return pd.DataFrame(columns, index=index)
    if isinstance(obj, dict):
        return {k: _restore(v, f"{path}/{k}", types) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v, f"{path}/{i}", types) for i, v in enumerate(obj)]
    return obj


def _numpy_dtype(name: str):
    """numpy dtype for a stored dtype name (pandas' extension dtypes -> object)."""
    try:
        return np.dtype(name)
    except TypeError:
        return object


def write_model_file(
    path: Path, state: dict, var_names, attributes: dict, save_kwargs: dict | None = None
) -> None:
    """Write ``model.pt`` atomically (a temporary file renamed over the old one)."""
    types: dict = {}
    attr_dict = _plain(attributes, "", types)
    attr_dict[_ARRAYS] = types
    attr_dict["cellplm_format_"] = FORMAT
    payload = {
        "model_state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "var_names": [str(v) for v in var_names],
        "attr_dict": attr_dict,
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp, **(save_kwargs or {}))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_model_file(path: Path) -> tuple[dict, list[str], dict]:
    """Read a file written by :func:`write_model_file` (or the first format) with
    ``weights_only=True``: (state dict, var names, attributes)."""
    path = Path(path)
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
    if isinstance(payload, dict) and payload.get("format") == _LEGACY_FORMAT:
        attributes = _decode_legacy(json.loads(payload["attributes"]))
        return payload["model_state_dict"], payload["var_names"], _no_local_heads(attributes)
    attr_dict = payload.get("attr_dict") if isinstance(payload, dict) else None
    if not isinstance(attr_dict, dict) or attr_dict.get("cellplm_format_") != FORMAT:
        raise ValueError(f"{path} is not a CellPLM model file (no '{FORMAT}' marker).")
    attr_dict = dict(attr_dict)
    types = attr_dict.pop(_ARRAYS, {})
    attr_dict.pop("cellplm_format_")
    attributes = {k: _restore(v, f"/{k}", types) for k, v in attr_dict.items()}
    return payload["model_state_dict"], payload["var_names"], _no_local_heads(attributes)


def _no_local_heads(attributes: dict) -> dict:
    """Rebuild a model saved without ``n_local_heads`` with none.

    ``CellPLM`` writes the local heads it defaults to into its init parameters, so a file
    without them predates them (or is a model without coordinates, which gets none anyway):
    without this its spatial model would be rebuilt with the current spatial default.
    """
    params = attributes.get("init_params_")
    if isinstance(params, dict) and isinstance(params.get("kwargs"), dict):
        params["kwargs"].setdefault("module_kwargs", {}).setdefault("n_local_heads", 0)
    return attributes


def _decode_legacy(obj):
    """Attributes of a ``cellplm_scvi/1`` file (arrays and DataFrames tagged inline)."""
    if isinstance(obj, list):
        return [_decode_legacy(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__dataframe__" in obj:
        frame = obj["__dataframe__"]
        index = pd.Index(_decode_legacy(frame["index"]), name=frame["index_name"])
        data = {c: _decode_legacy(frame["data"][c]) for c in frame["columns"]}
        return pd.DataFrame(data, index=index, columns=frame["columns"])
    return {k: _decode_legacy(v) for k, v in obj.items()}
