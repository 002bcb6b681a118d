"""Saving and loading CellPLM models: scvi-tools' layout, read with ``weights_only=True``.

scvi-tools writes ``model.pt`` as ``{"model_state_dict", "var_names", "attr_dict"}`` and pickles
whatever the attributes hold (numpy arrays, DataFrames), so loading it runs the unpickler on
arbitrary objects. We write the same layout with plain values only: arrays become lists and
DataFrames dicts of lists; ``attr_dict["cellplm_arrays_"]`` records where they were, so that
:func:`read_model_file` gives back the original types. Every reader of :class:`SaveLoadMixin`
(``load``, ``load_registry``, ``view_setup_args``) and the query readers go through
:func:`read_model_file`, which never unpickles an object.

A save directory is changed so that a process killed at any moment leaves it loadable as the
old model or the new one (see :func:`save_directory`): ``model.pt`` is written last and is the
commit record; it holds the SHA-256 of its weights and of the ``adata.h5ad`` saved with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import pandas as pd
import torch

from .._constants import X_KEY
from ._presets import saved_init_params

if TYPE_CHECKING:
    from anndata import AnnData

FORMAT = "cellplm_scvi/2"
_LEGACY_FORMAT = "cellplm_scvi/1"  # tensors + one JSON string (first release)
_ARRAYS = "cellplm_arrays_"  # attr_dict entry: path -> how to restore a list / dict
# top-level entry of model.pt: SHA-256 of the weights and of the AnnData saved with them (None:
# saved without). Files written before it existed have no such entry and load unchecked.
_CHECKSUMS = "cellplm_checksums"
_UNRECORDED = "unrecorded"  # a model file without _CHECKSUMS
_HASH_CHUNK = 1 << 20


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


def state_sha256(state: dict) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ writing files


def _sync(path: Path) -> None:
    """Flush ``path``'s bytes to the disk (so a rename after it never exposes a hole)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(dir_path: Path) -> None:
    """Make the renames in ``dir_path`` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(dir_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temporary(path: Path, write: Callable[[str], None]) -> Path:
    """Write ``path``'s new content to a temporary file next to it, synced; return that file.

    Whatever the failure, the temporary file is removed; a full or read-only disk raises an
    ``OSError`` that says so (torch reports it as a ``RuntimeError`` from its zip writer).
    """
    suffix = f".tmp{path.suffix}"  # keeps the extension, for writers that check it
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(name)
        _sync(tmp)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError | RuntimeError):  # h5py and torch's writer: RuntimeError
            free = shutil.disk_usage(path.parent).free
            reason = _write_error_reason(err)
            raise OSError(
                f"Could not write {path.name} in {path.parent} ({reason}); {free} bytes are "
                "free there: is the disk full or not writable? The files already in the "
                "directory are unchanged; free some space and save again."
            ) from err
        raise
    return tmp


def _write_error_reason(err: BaseException) -> str:
    """A short reason for a failed write (h5py's messages span lines; pick the OS error)."""
    text = str(err).strip()
    found = re.search(r"error message = '([^']*)'", text)
    if found:
        return found.group(1)
    return text.splitlines()[0][:200] if text else type(err).__name__


def _model_payload(state: dict, var_names, attributes: dict, adata_sha256: str | None) -> dict:
    types: dict = {}
    attr_dict = _plain(attributes, "", types)
    attr_dict[_ARRAYS] = types
    attr_dict["cellplm_format_"] = FORMAT
    state = {k: v.detach().cpu() for k, v in state.items()}
    return {
        "model_state_dict": state,
        "var_names": [str(v) for v in var_names],
        "attr_dict": attr_dict,
        _CHECKSUMS: {"model_state_dict": state_sha256(state), "adata": adata_sha256},
    }


def _replace_with(path: Path, payload: dict, save_kwargs: dict | None = None) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = _write_temporary(path, lambda name: torch.save(payload, name, **(save_kwargs or {})))
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_model_file(
    path: Path,
    state: dict,
    var_names,
    attributes: dict,
    save_kwargs: dict | None = None,
    adata_sha256: str | None = None,
) -> None:
    """Write ``model.pt`` atomically (a temporary file renamed over the old one).

    ``adata_sha256`` is the SHA-256 of the ``adata.h5ad`` saved with the model (``None``: none).
    """
    _replace_with(
        Path(path), _model_payload(state, var_names, attributes, adata_sha256), save_kwargs
    )


# ------------------------------------------------------------------ reading files


def _objects_message(path: Path) -> str:
    return (
        f"Refusing to load {path}: it holds pickled Python objects (classes or functions, "
        "whose unpickling can run any code), and it will not be unpickled. Files written by "
        "CellPLM.save hold only tensors and plain values and load with weights_only=True; this "
        "one was written by another tool (e.g. scvi-tools' own save) or tampered with."
    )


def _damaged_message(path: Path, err: BaseException) -> str:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"Could not read {path}: the file is damaged (corrupt or truncated; "
        f"{type(err).__name__}: {detail}). Restore it from a good copy or save the model again."
    )


# opcodes that name or call a class or function: a pickle without them only builds plain values
_OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _raw_pickle_has_objects(path: Path) -> bool:
    """Whether ``path`` parses as a pickle that names classes or functions (parsed, not run)."""
    try:
        with open(path, "rb") as handle:
            opcodes = {op.name for op, _, _ in pickletools.genops(handle)}
    except Exception:  # not a pickle at all
        return False
    return bool(opcodes & _OBJECT_OPCODES)


def _names_an_object(err: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only unpickler stopped at a class or function (not damage)."""
    message = str(err)
    return any(s in message for s in ("GLOBAL", "Can only create new object", "Can only build"))


def _load_payload(path: Path, mmap: bool = False):
    """``torch.load(weights_only=True)`` of ``path``, with errors that say what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}.")
    if not zipfile.is_zipfile(path):
        if _raw_pickle_has_objects(path):
            raise ValueError(_objects_message(path))
        raise ValueError(
            f"Could not read {path}: not a torch zip file (corrupt or truncated?). CellPLM "
            "model files are written by torch.save."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if _names_an_object(err):
            raise ValueError(_objects_message(path)) from None
        raise ValueError(_damaged_message(path, err)) from None
    except Exception as err:  # a damaged file fails anywhere in torch's reader
        raise ValueError(_damaged_message(path, err)) from None


def _valid_checksums(checksums) -> bool:
    """Whether a file's checksums are two SHA-256 hex digests (the AnnData's may be None)."""
    if not isinstance(checksums, dict):
        return False
    weights, adata = checksums.get("model_state_dict"), checksums.get("adata")
    return _is_sha256(weights) and (adata is None or _is_sha256(adata))


def _is_sha256(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _is_cellplm_payload(payload) -> bool:
    if not isinstance(payload, dict):
        return False
    if payload.get("format") == _LEGACY_FORMAT:
        return True
    attr_dict = payload.get("attr_dict")
    return isinstance(attr_dict, dict) and attr_dict.get("cellplm_format_") == FORMAT


def read_model_file_with_checksums(path: Path) -> tuple[dict, list[str], dict, dict | None]:
    """:func:`read_model_file` plus the file's checksums (``None``: saved before them).

    The weights are checked against their SHA-256 when the file has one.
    """
    path = Path(path)
    payload = _load_payload(path)
    if not _is_cellplm_payload(payload):
        raise ValueError(f"{path} is not a CellPLM model file (no '{FORMAT}' marker).")
    state = payload.get("model_state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a CellPLM model file (no state dict of tensors).")
    checksums = payload.get(_CHECKSUMS)
    if checksums is not None:
        if not _valid_checksums(checksums):
            raise ValueError(
                f"Could not read {path}: its '{_CHECKSUMS}' entry is damaged (two SHA-256 "
                "hex digests expected). Restore it from a good copy or save the model again."
            )
        if state_sha256(state) != checksums["model_state_dict"]:
            raise ValueError(
                f"The weights in {path} do not match the SHA-256 saved with them: the file was "
                "changed or damaged after saving (e.g. a flipped bit). Restore it from a good "
                "copy or save the model again."
            )
    if payload.get("format") == _LEGACY_FORMAT:
        attributes = _decode_legacy(json.loads(payload["attributes"]))
        return state, payload["var_names"], saved_init_params(attributes), checksums
    attr_dict = dict(payload["attr_dict"])
    types = attr_dict.pop(_ARRAYS, {})
    attr_dict.pop("cellplm_format_")
    attributes = {k: _restore(v, f"/{k}", types) for k, v in attr_dict.items()}
    return state, payload["var_names"], saved_init_params(attributes), checksums


def read_model_file(path: Path) -> tuple[dict, list[str], dict]:
    """Read a file written by :func:`write_model_file` (or the first format) with
    ``weights_only=True``: (state dict, var names, attributes).

    Files holding pickled objects are refused without unpickling them; weights that differ from
    the SHA-256 saved with them raise a ``ValueError``.
    """
    state, var_names, attributes, _ = read_model_file_with_checksums(path)
    return state, var_names, attributes


# ------------------------------------------------------------------ save directories


def _set_aside_path(dir_path: Path, prefix: str, sha: str) -> Path:
    """Where a save keeps the previous ``adata.h5ad`` (named by its SHA-256) until it commits."""
    return dir_path / f".{prefix}adata.{sha}.h5ad"


def _leftovers(dir_path: Path, prefix: str) -> tuple[list[Path], list[Path]]:
    """Temporary files and set-aside AnnData files that saves of ``prefix`` left behind."""
    temporary = re.compile(
        rf"\.{re.escape(prefix)}(model\.pt|adata\.h5ad)\.[a-z0-9_]+\.tmp(\.pt|\.h5ad)?"
    )  # without the extension: left by saves of earlier versions
    set_aside = re.compile(rf"\.{re.escape(prefix)}adata\.[0-9a-f]{{64}}\.h5ad")
    names = [p for p in dir_path.iterdir() if p.is_file()]
    return (
        [p for p in names if temporary.fullmatch(p.name)],
        [p for p in names if set_aside.fullmatch(p.name)],
    )


def _committed_checksums(dir_path: Path, prefix: str) -> dict | None:
    """Checksums of the model file now in place, written into it first if it has none.

    ``None`` when there is no readable CellPLM model file (nothing to keep an AnnData for). A
    file saved before the checksums gets them (same content), so that it names its AnnData.
    """
    model_path = dir_path / f"{prefix}model.pt"
    try:
        payload = _load_payload(model_path, mmap=True)  # the weights stay on the disk
    except FileNotFoundError:
        return None
    except ValueError:
        try:  # e.g. a file torch cannot map
            payload = _load_payload(model_path)
        except ValueError:
            return None
    if not _is_cellplm_payload(payload):
        return None
    checksums = payload.get(_CHECKSUMS)
    if checksums is not None:  # a damaged entry names no AnnData to keep
        return checksums if _valid_checksums(checksums) else None
    live = dir_path / f"{prefix}adata.h5ad"
    payload = _load_payload(model_path)  # whole, to write it again
    checksums = {
        "model_state_dict": state_sha256(payload["model_state_dict"]),
        "adata": file_sha256(live) if live.is_file() else None,
    }
    _replace_with(model_path, {**payload, _CHECKSUMS: checksums})
    return checksums


def save_directory(
    dir_path: Path,
    prefix: str,
    state: dict,
    var_names,
    attributes: dict,
    adata: AnnData | None = None,
    save_kwargs: dict | None = None,
    anndata_write_kwargs: dict | None = None,
) -> None:
    """Write ``<prefix>model.pt`` (and ``<prefix>adata.h5ad``) so a kill never breaks the pair.

    Every file is written under a temporary name and renamed into place. ``model.pt`` comes
    last and commits the save: it names the SHA-256 of its AnnData. Until then the AnnData the
    previous ``model.pt`` names stays in the directory (renamed aside), so :func:`saved_adata`
    finds the old model's AnnData before the commit and the new one after it. Leftovers of
    interrupted saves are removed; other files in the directory are not touched.
    """
    dir_path.mkdir(parents=True, exist_ok=True)
    model_path, live = dir_path / f"{prefix}model.pt", dir_path / f"{prefix}adata.h5ad"
    for path in _leftovers(dir_path, prefix)[0]:
        path.unlink(missing_ok=True)
    adata_sha256 = None
    if adata is not None:
        kwargs = anndata_write_kwargs or {}
        tmp = _write_temporary(live, lambda name: adata.write_h5ad(name, **kwargs))
        try:
            adata_sha256 = file_sha256(tmp)
            committed = _committed_checksums(dir_path, prefix)
            sha = committed.get("adata") if committed is not None else None
            if sha is not None and live.is_file():
                aside = _set_aside_path(dir_path, prefix, sha)
                if not aside.is_file():  # else an interrupted save already moved it there
                    os.replace(live, aside)
            os.replace(tmp, live)
        finally:
            tmp.unlink(missing_ok=True)
        _sync_directory(dir_path)
    write_model_file(model_path, state, var_names, attributes, save_kwargs, adata_sha256)
    for path in _leftovers(dir_path, prefix)[1]:
        path.unlink(missing_ok=True)
    _sync_directory(dir_path)


def saved_adata(dir_path: Path, prefix: str, checksums: dict | None) -> AnnData:
    """Read the AnnData saved with a model whose file holds ``checksums``.

    A file saved before the checksums reads ``adata.h5ad`` unchecked. Otherwise the AnnData
    must have the SHA-256 the model file names; during an interrupted save it is the
    set-aside copy. The file is read once, into memory, and the AnnData built from the bytes
    that were checked.
    """
    import anndata

    live = dir_path / f"{prefix}adata.h5ad"
    if checksums is None:
        if not live.is_file():
            raise ValueError(f"No saved AnnData in {dir_path}: pass `adata=`.")
        return anndata.read_h5ad(live)
    sha = checksums.get("adata")
    if sha is None:
        other = f" ({live.name} there is not the one it was saved with)" if live.is_file() else ""
        raise ValueError(
            f"No saved AnnData in {dir_path}: the model was saved with save_anndata=False"
            f"{other}. Pass `adata=`."
        )
    aside = _set_aside_path(dir_path, prefix, sha)
    path = aside if aside.is_file() else live
    if not path.is_file():
        raise ValueError(
            f"No saved AnnData in {dir_path}: {live.name}, saved with the model, is missing. "
            "Pass `adata=`."
        )
    content = path.read_bytes()  # read once: the bytes checked are the bytes loaded
    if hashlib.sha256(content).hexdigest() != sha:
        raise ValueError(
            f"{live} is not the AnnData saved with {prefix}model.pt (its SHA-256 differs: it "
            "was replaced or damaged after saving). Pass `adata=`, or save the model again."
        )
    return anndata.read_h5ad(io.BytesIO(content))


# ------------------------------------------------------------------ the model's methods


class SaveLoadMixin:
    """``save``, ``load`` and scvi-tools' file readers, which never unpickle an object."""

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
        dicts, strings and numbers: it loads with ``torch.load(weights_only=True)``, as do
        :meth:`view_setup_args` and :meth:`load_registry`; :class:`scvi.hub.HubMetadata` reads
        it too. It also holds the SHA-256 of the weights and of the saved AnnData, which
        :meth:`load` checks.

        Saving over an earlier model is safe against interruption: each file is written under
        a temporary name and renamed into place, ``model.pt`` last, and the earlier AnnData is
        kept aside until then, so a process killed at any moment leaves a directory that
        :meth:`load` reads as the earlier model or the new one, each with its own AnnData.
        Other files in ``dir_path`` are left alone.

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

        Raises
        ------
        OSError
            A file could not be written (e.g. the disk is full); the directory's earlier files
            are unchanged.
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
        attributes = {
            k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")
        }
        save_directory(
            dir_path,
            prefix or "",
            self.module.state_dict(),
            self.registry_["field_registries"][X_KEY]["state_registry"]["column_names"],
            attributes,
            self.adata if save_anndata else None,
            save_kwargs,
            anndata_write_kwargs,
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
    ) -> Self:
        """Load a model saved with :meth:`save` (``weights_only=True``; pickles are refused).

        The weights and the saved AnnData are checked against the SHA-256 in ``model.pt``
        (files saved before those existed load unchecked).

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

        Returns
        -------
        CellPLM
            The model, in eval mode.
        """
        from scvi.model._utils import parse_device_args
        from scvi.model.base._save_load import _initialize_model

        if backup_url is not None:
            raise ValueError("backup_url is not supported: copy the files to dir_path first.")
        dir_path, prefix = Path(dir_path), prefix or ""
        state, var_names, attributes, checksums = read_model_file_with_checksums(
            dir_path / f"{prefix}model.pt"
        )
        registry = attributes.pop("registry_")
        if registry.get("model_name") != cls.__name__:
            raise ValueError(
                f"{dir_path} holds a {registry.get('model_name')!r} model, not a {cls.__name__}."
            )
        if attributes.get("registry_built_"):  # e.g. corpus-trained: reads any set-up AnnData
            model = _initialize_model(cls, None, registry, attributes, None)
        else:
            if adata is None:
                adata = saved_adata(dir_path, prefix, checksums)
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

    @staticmethod
    def load_registry(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """Return the registry saved with a model (read with ``weights_only=True``).

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        prefix
            File name prefix used when saving.

        Returns
        -------
        dict
            The registry (``setup_args``, ``field_registries``, ...), as
            :meth:`scvi.model.base.BaseModelClass.load_registry` gives it.
        """
        path = Path(dir_path) / f"{prefix or ''}model.pt"
        return read_model_file(path)[2]["registry_"]

    @staticmethod
    def view_setup_args(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the arguments a saved model's AnnData was set up with.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        prefix
            File name prefix used when saving.
        """
        import rich.pretty  # noqa: F401  (scvi-tools 1.4.2 prints with it without importing it)
        from scvi.data import AnnDataManager

        AnnDataManager.view_setup_method_args(SaveLoadMixin.load_registry(dir_path, prefix))


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
