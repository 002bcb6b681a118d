"""A pretraining corpus of many ``.h5ad`` files, read lazily, one tissue per minibatch.

:class:`TissueCorpus` is a Lightning data module in the style of scvi-tools' custom data
modules (``model = Model(adata=None, registry=dm.registry)``, ``model.train(datamodule=dm)``):

- files are opened with h5py and read through anndata's backed sparse datasets, one read per
  tissue, so memory holds the tissues in flight and per-cell bookkeeping (a few bytes per cell),
  never a whole file;
- every file is aligned to one gene vocabulary (:func:`~cellplm_scvi._genes.align_genes`);
  minibatch counts are a CSR tensor in vocabulary columns, and a ``"measured"`` row says which
  vocabulary genes the file measured (the others are left out of the loss);
- tissues per file (:func:`~cellplm_scvi.pp.assign_tissues`: spatial patches, or random chunks
  of each sample) are computed once and cached beside the corpus, never inside the files;
- tissues are shuffled across files, split into train / validation as whole tissues, and
  shared across DDP ranks by :class:`~cellplm_scvi.data.TissueBatchSampler`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch
from anndata import AnnData
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from .._constants import (
    BATCH_KEY,
    INDICES_KEY,
    INDICES_OBS,
    LABELS_KEY,
    SPATIAL_KEY,
    TISSUE_CODE_OBS,
    TISSUE_KEY,
    X_KEY,
)
from .._genes import align_genes, available_configs, official_config
from .._validation import check_batch_size, check_drop_node_rate
from ..pp._tissues import assign_tissues
from ._resume import ResumableLoader
from ._tissue_loader import TissueBatchSampler, _is_packed, _to_csr_tensor, pack_minibatches

logger = logging.getLogger("cellplm_scvi")

__all__ = ["TissueCorpus"]

MEASURED_KEY = "measured"  # (n_vocab,) bool per minibatch: the genes its file measured
_CACHE_VERSION = 1  # bump when the tissue computation changes
_CHECK_ROWS = 2_000  # rows read per file to check for raw counts


# ------------------------------------------------------------------------------ file access


def _open_h5ad(path: str) -> h5py.File:
    """Open an ``.h5ad`` read-only, or raise a ``ValueError`` naming the file and the fix."""
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Corpus file {path!r} cannot be read as an .h5ad file ({e}). Check the path, or "
            "re-write the file with `adata.write_h5ad(path)` (zarr and loom are not supported)."
        ) from e
    if "obs" not in handle or "var" not in handle:
        handle.close()
        raise ValueError(
            f"Corpus file {path!r} is an HDF5 file but not an AnnData .h5ad (no obs/var "
            "groups). Re-write it with `adata.write_h5ad(path)`."
        )
    return handle


def _matrix(handle: h5py.File, layer: str | None, path: str):
    """The backed counts matrix (anndata sparse dataset or h5py dataset) of X or a layer."""
    if layer is None:
        if "X" not in handle:
            raise ValueError(f"Corpus file {path!r} has no X; pass `layer=` naming the counts.")
        elem = handle["X"]
    else:
        layers = list(handle["layers"]) if "layers" in handle else []
        if layer not in layers:
            raise KeyError(
                f"layer={layer!r} is not a layer of corpus file {path!r} (layers: {layers}). "
                "Pass a per-file list of layers (None for X) if the files differ."
            )
        elem = handle["layers"][layer]
    if isinstance(elem, h5py.Group):
        return ad.io.sparse_dataset(elem)
    return elem  # dense h5py dataset


def _read_rows(matrix, rows: np.ndarray) -> sp.csr_matrix:
    """Rows (sorted, unique) of a backed matrix as CSR: one slice when they are contiguous."""
    contiguous = rows[-1] - rows[0] + 1 == len(rows)
    block = matrix[int(rows[0]) : int(rows[-1]) + 1] if contiguous else matrix[rows]
    return block.tocsr() if sp.issparse(block) else sp.csr_matrix(block)


def _obs_column(handle: h5py.File, key: str) -> np.ndarray:
    return np.asarray(ad.io.read_elem(handle["obs"][key]))


def _obs_names(handle: h5py.File) -> pd.Index:
    return pd.Index(ad.io.read_elem(handle["obs"][handle["obs"].attrs["_index"]]))


def _per_file(value, n_files: int, name: str) -> list:
    """A key given once for all files, or a list with one entry per file."""
    if value is None or isinstance(value, str):
        return [value] * n_files
    value = list(value)
    if len(value) != n_files:
        raise ValueError(
            f"{name} must be a string, None, or a list with one entry per file ({n_files}); "
            f"got {len(value)} entries."
        )
    return value


@dataclass
class _CorpusFile:
    """What the corpus knows about one file (no counts)."""

    path: str
    layer: str | None
    spatial_key: str | None
    n_obs: int
    n_genes: int
    columns: np.ndarray  # (n_matched,) file columns kept, ascending
    column_vocab: np.ndarray  # (n_genes,) vocabulary position of each file column, -1: none
    measured: np.ndarray  # (n_vocab,) bool: vocabulary genes this file measured


# -------------------------------------------------------------------------------- dataset


class CorpusDataset(Dataset):
    """Reads one tissue (a list of global row numbers inside one file) of a :class:`TissueCorpus`.

    Files are opened lazily in the process that reads (DataLoader workers open their own
    handles); counts come back as a float32 CSR tensor in vocabulary columns.
    """

    def __init__(self, corpus: TissueCorpus):
        self.files = corpus.files
        self.offsets = corpus.offsets  # (n_files + 1,) first global row of each file
        self.batch_codes = corpus.batch_codes  # (n_cells,) int32
        self.tissue_codes = corpus.tissue_codes  # (n_cells,) int64
        self.n_vocab = len(corpus.vocabulary)
        self.spatial = corpus.has_spatial
        self._handles: dict[int, tuple[h5py.File, object]] = {}
        self._coords: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_coords"] = {}, {}  # h5py handles do not pickle
        return state

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _matrix(self, k: int):
        if k not in self._handles:
            info = self.files[k]
            handle = _open_h5ad(info.path)
            matrix = _matrix(handle, info.layer, info.path)
            shape = tuple(matrix.shape)
            if shape != (info.n_obs, info.n_genes):
                handle.close()
                raise ValueError(
                    f"Corpus file {info.path!r} changed after the TissueCorpus was built: its "
                    f"counts are {shape} cells x genes, the corpus was built with "
                    f"{(info.n_obs, info.n_genes)}. Build the TissueCorpus again (a new "
                    "TissueCorpus(files, ...)) after rewriting a file."
                )
            self._handles[k] = (handle, matrix)
        return self._handles[k][1]

    def _coordinates(self, k: int, rows: np.ndarray) -> np.ndarray:
        info = self.files[k]
        if info.spatial_key is None:
            return np.full((len(rows), 2), np.nan, dtype=np.float32)  # missing coordinates
        if k not in self._coords:  # (n_obs, 2) float32: 8 bytes per cell
            self._matrix(k)
            xy = ad.io.read_elem(self._handles[k][0]["obsm"][info.spatial_key])
            self._coords[k] = np.asarray(xy)[:, :2].astype(np.float32)
        return self._coords[k][rows]

    def close(self) -> None:
        """Close the open file handles."""
        for handle, _ in self._handles.values():
            handle.close()
        self._handles.clear()

    def __getitem__(self, rows: list[int] | list[list[int]]) -> dict[str, torch.Tensor]:
        if _is_packed(rows):  # several tissues (of any files): each read alone, then stacked
            return pack_minibatches([self[tissue] for tissue in rows])
        rows = np.sort(np.asarray(rows, dtype=np.int64))  # global rows, one file
        k = int(np.searchsorted(self.offsets, rows[0], side="right") - 1)
        if rows[-1] >= self.offsets[k + 1]:
            raise ValueError("A corpus minibatch must hold rows of one file.")
        info = self.files[k]
        local = rows - self.offsets[k]
        x = _read_rows(self._matrix(k), local)  # (n, n_genes) file columns
        out = {X_KEY: _to_csr_tensor(_to_vocabulary(x, info.column_vocab, self.n_vocab))}
        n = len(rows)
        out[BATCH_KEY] = torch.from_numpy(self.batch_codes[rows].astype(np.int64)).view(n, 1)
        out[LABELS_KEY] = torch.zeros(n, 1, dtype=torch.int64)
        out[TISSUE_KEY] = torch.from_numpy(self.tissue_codes[rows].astype(np.float32)).view(n, 1)
        out[INDICES_KEY] = torch.from_numpy(rows).view(n, 1)
        out[MEASURED_KEY] = torch.from_numpy(info.measured)
        if self.spatial:
            out[SPATIAL_KEY] = torch.from_numpy(self._coordinates(k, local))
        return out


def _to_vocabulary(x: sp.csr_matrix, column_vocab: np.ndarray, n_vocab: int) -> sp.csr_matrix:
    """(n, n_genes) counts in file columns -> (n, n_vocab) in vocabulary columns."""
    cols = column_vocab[x.indices]  # vocabulary position of each stored entry, -1: dropped
    keep = cols >= 0
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])  # (nnz + 1,)
    indptr = kept_before[x.indptr].astype(x.indptr.dtype)  # (n + 1,)
    out = sp.csr_matrix(
        (x.data[keep].astype(np.float32), cols[keep].astype(x.indices.dtype), indptr),
        shape=(x.shape[0], n_vocab),
    )
    out.has_sorted_indices = False
    out.sort_indices()
    return out


# ------------------------------------------------------------------------------ the module


class TissueCorpus(LightningDataModule):
    """Many ``.h5ad`` files as one pretraining corpus: one minibatch = one tissue of one file.

    At construction every file is opened (backed, read-only) and checked, aligned to the
    vocabulary and cut into tissues; bad input raises here, before training, with the file
    named. Counts are only read when minibatches are drawn.

    Parameters
    ----------
    files
        Paths of ``.h5ad`` files. Each may have its own genes, cells and keys.
    vocabulary
        Name of a vendored official config (its ``gene_list``; e.g. ``"20230926_85M"``, 19,374
        human Ensembl IDs), or a list of gene IDs. Every file is aligned to it.
    layer
        Layer holding raw counts (``None``: ``X``); one for all files, or a list per file.
    gene_key
        ``var`` column with Ensembl IDs or symbols (``None``: ``var_names``); or a list.
    batch_key
        ``obs`` column of samples. Batches are ``"<file>"`` (no key) or ``"<file>/<value>"``;
        non-spatial tissues never cross samples. One for all files, or a list.
    spatial_key
        ``obsm`` key of coordinates; files with one are cut into spatial patches. A list with
        ``None`` for the files without coordinates when the corpus mixes them.
    library_key
        ``obs`` column of slides (tissues never cross slides); or a list.
    max_cells
        Largest tissue (spatial patches and sample chunks). ``None``: whole samples for
        non-spatial files (1000 for spatial ones).
    validation_size
        Fraction of tissues held out for validation (whole tissues).
    seed
        Seed of the sample chunks, the split and the per-epoch shuffles.
    max_cells_per_step
        Cap on cells per training step (larger tissues are subsampled each step).
    drop_node_rate
        Official node drop: fraction of a tissue's cells left out at each training step.
    pack_tissues
        Training steps hold several whole tissues, of any files, up to ``max_cells_per_step``
        cells in all (each tissue capped at it); attention stays within each tissue and the
        loss is the mean of the per-tissue losses (see ``docs/pretraining.md``). Validation
        reads one tissue per step. Needs ``max_cells_per_step``.
    cache_dir
        Folder of the tissue cache (``None``: ``.cellplm_tissues`` beside the first file). One
        small ``.npz`` per file and setting; the corpus files are never written.
    num_workers
        DataLoader workers (each opens its own file handles).
    num_replicas, rank
        DDP sharding; ``None``: from ``torch.distributed`` when it is initialised.

    Attributes
    ----------
    alignment_report
        DataFrame, one row per file: ``file``, ``n_genes``, ``n_matched``, ``n_cells``,
        ``n_tissues``, ``spatial``, ``cached`` (tissues read from the cache).
    measured_genes
        (n_batch, n_vocab) bool: the vocabulary genes each batch (its file) measured.

    Examples
    --------
    >>> dm = TissueCorpus(["a.h5ad", "b.h5ad"], vocabulary="20230926_85M", max_cells=1000)
    >>> dm.alignment_report
    >>> batch = next(iter(dm.train_dataloader()))  # one tissue, X: (n_cells, 19374) CSR
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        vocabulary: str | Sequence[str] = "20230926_85M",
        layer: str | Sequence[str | None] | None = None,
        gene_key: str | Sequence[str | None] | None = None,
        batch_key: str | Sequence[str | None] | None = None,
        spatial_key: str | Sequence[str | None] | None = None,
        library_key: str | Sequence[str | None] | None = None,
        max_cells: int | None = 1000,
        validation_size: float = 0.05,
        seed: int = 0,
        max_cells_per_step: int | None = None,
        drop_node_rate: float = 0.0,
        pack_tissues: bool = False,
        cache_dir: str | os.PathLike | None = None,
        num_workers: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__()
        if isinstance(files, str | os.PathLike):
            files = [files]
        paths = [os.path.abspath(os.fspath(f)) for f in files]
        if not paths:
            raise ValueError("files is empty; pass a list of .h5ad paths.")
        if len(set(paths)) != len(paths):
            raise ValueError("files lists the same file more than once.")
        if not 0 <= validation_size < 1:
            raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
        if max_cells is not None and max_cells < 2:
            raise ValueError(f"max_cells must be >= 2 or None, got {max_cells}.")
        if pack_tissues and not max_cells_per_step:
            raise ValueError(
                "pack_tissues=True needs max_cells_per_step, the cell budget of a packed step "
                "(e.g. 8 * max_cells)."
            )
        check_batch_size(max_cells_per_step, "max_cells_per_step")
        check_drop_node_rate(drop_node_rate)
        self.pack_tissues = pack_tissues
        self.vocabulary = self._vocabulary(vocabulary)
        self.seed, self.max_cells, self.validation_size = seed, max_cells, validation_size
        self.max_cells_per_step, self.drop_node_rate = max_cells_per_step, drop_node_rate
        self.num_workers, self.num_replicas, self.rank = num_workers, num_replicas, rank
        self.cache_dir = (
            Path(cache_dir) if cache_dir else Path(paths[0]).parent / ".cellplm_tissues"
        )
        n = len(paths)
        keys = {
            "layer": _per_file(layer, n, "layer"),
            "gene_key": _per_file(gene_key, n, "gene_key"),
            "batch_key": _per_file(batch_key, n, "batch_key"),
            "spatial_key": _per_file(spatial_key, n, "spatial_key"),
            "library_key": _per_file(library_key, n, "library_key"),
        }
        self.setup_args = {"layer": layer, "batch_key": batch_key, "spatial_key": spatial_key}

        self.files: list[_CorpusFile] = []
        batch_names: list[str] = []
        batch_codes, tissue_codes, report = [], [], []
        labels = _file_labels(paths)
        file_of_batch: list[int] = []
        n_tissues_before = 0
        for k, path in enumerate(paths):
            file_keys = {name: values[k] for name, values in keys.items()}
            info, batches, local_batch, local_tissue, cached = self._scan(path, **file_keys)
            self.files.append(info)
            names = [labels[k]] if batches is None else [f"{labels[k]}/{b}" for b in batches]
            batch_codes.append((local_batch + len(batch_names)).astype(np.int32))
            tissue_codes.append(local_tissue + n_tissues_before)
            batch_names += names
            file_of_batch += [k] * len(names)
            n_tissues = int(local_tissue.max()) + 1
            n_tissues_before += n_tissues
            report.append(
                {
                    "file": path,
                    "n_genes": info.n_genes,
                    "n_matched": int(len(info.columns)),
                    "n_cells": info.n_obs,
                    "n_tissues": n_tissues,
                    "spatial": info.spatial_key is not None,
                    "cached": cached,
                }
            )
        self.batch_names = batch_names
        self.batch_codes = np.concatenate(batch_codes)  # (n_cells,) int32
        self.tissue_codes = np.concatenate(tissue_codes)  # (n_cells,) int64, global
        self.offsets = np.concatenate([[0], np.cumsum([f.n_obs for f in self.files])])
        self.alignment_report = pd.DataFrame(report)
        self.has_spatial = any(f.spatial_key is not None for f in self.files)
        self.file_of_batch = np.asarray(file_of_batch)  # (n_batch,) file of each batch
        self.measured_genes = np.stack([self.files[k].measured for k in self.file_of_batch])
        self._split()
        self.dataset = CorpusDataset(self)
        logger.info(
            "TissueCorpus: %d files, %d cells, %d tissues (%d train, %d validation)",
            n,
            self.n_obs,
            n_tissues_before,
            len(self.train_tissues),
            len(self.val_tissues),
        )

    # -------------------------------------------------------------- construction helpers
    @staticmethod
    def _vocabulary(vocabulary) -> list[str]:
        if isinstance(vocabulary, str):
            if vocabulary not in available_configs():
                raise ValueError(
                    f"vocabulary={vocabulary!r} is not a vendored config "
                    f"({available_configs()}); pass one of those or a list of gene IDs."
                )
            return list(official_config(vocabulary)["gene_list"])
        vocabulary = [str(g) for g in vocabulary]
        if not vocabulary:
            raise ValueError("vocabulary is empty; pass a config name or a list of gene IDs.")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary has duplicate gene IDs.")
        return vocabulary

    def _scan(self, path, layer, gene_key, batch_key, spatial_key, library_key):
        """Check one file, align its genes, and get its tissues (cached)."""
        with _open_h5ad(path) as handle:
            obs_columns = list(handle["obs"].attrs.get("column-order", []))
            for key, name in [(batch_key, "batch_key"), (library_key, "library_key")]:
                if key is not None and key not in obs_columns:
                    raise KeyError(
                        f"{name}={key!r} is not an obs column of corpus file {path!r} "
                        f"(columns: {obs_columns[:20]}). Pass a per-file list with None (or the "
                        "right column) for this file."
                    )
            obsm = list(handle["obsm"]) if "obsm" in handle else []
            if spatial_key is not None and spatial_key not in obsm:
                raise KeyError(
                    f"spatial_key={spatial_key!r} is not in obsm of corpus file {path!r} "
                    f"(obsm: {obsm}). For a corpus mixing spatial and non-spatial files pass a "
                    "per-file list with None for the files without coordinates."
                )
            var = ad.io.read_elem(handle["var"])
            if gene_key is not None and gene_key not in var.columns:
                raise KeyError(
                    f"gene_key={gene_key!r} is not a var column of corpus file {path!r} "
                    f"(columns: {list(var.columns)}). Pass a per-file list (None: var_names)."
                )
            genes = var.index if gene_key is None else var[gene_key].astype(str)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # duplicates: in the report
                    alignment = align_genes(list(genes), self.vocabulary)
            except ValueError as e:
                raise ValueError(f"Corpus file {path!r}: {e}") from e
            matrix = _matrix(handle, layer, path)
            n_obs, n_genes = matrix.shape
            _check_counts_sample(matrix, n_obs, path, layer)
            xy = None
            if spatial_key is not None:
                xy = np.asarray(ad.io.read_elem(handle["obsm"][spatial_key]))
            meta = {key: _obs_column(handle, key) for key in {batch_key, library_key} - {None}}
            obs_names = _obs_names(handle)

        column_vocab = np.full(n_genes, -1, dtype=np.int64)
        column_vocab[alignment.input_index] = alignment.vocab_index
        measured = np.zeros(len(self.vocabulary), dtype=bool)
        measured[alignment.vocab_index] = True
        info = _CorpusFile(
            path=path,
            layer=layer,
            spatial_key=spatial_key,
            n_obs=n_obs,
            n_genes=n_genes,
            columns=np.sort(alignment.input_index),
            column_vocab=column_vocab,
            measured=measured,
        )
        batches, local_batch = None, np.zeros(n_obs, dtype=np.int64)
        if batch_key is not None:
            values = pd.Categorical(meta[batch_key])
            if values.isna().any():
                raise ValueError(
                    f"obs[{batch_key!r}] (batch_key) of corpus file {path!r} has missing values; "
                    "fill them (e.g. 'unknown') in that file."
                )
            batches, local_batch = [str(c) for c in values.categories], values.codes
        settings = {
            "version": _CACHE_VERSION,
            "path": path,
            "size": os.path.getsize(path),
            "mtime_ns": os.stat(path).st_mtime_ns,
            "batch_key": batch_key,
            "library_key": library_key,
            "spatial_key": spatial_key,
            "max_cells": self.max_cells,
            "seed": self.seed,
        }
        tissues, cached = self._tissues(settings, obs_names, meta, xy)
        return info, batches, local_batch, tissues, cached

    def _tissues(self, settings: dict, obs_names, meta: dict, xy) -> tuple[np.ndarray, bool]:
        """(n_obs,) int64 tissue code per cell of one file, from the cache or computed."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
        cache = self.cache_dir / f"{digest}.npz"
        codes = _read_cache(cache) if cache.exists() else None
        if codes is not None and len(codes) == len(obs_names):
            return codes.astype(np.int64), True
        obs = pd.DataFrame(meta, index=obs_names)
        light = AnnData(obs=obs, obsm={"xy": xy} if xy is not None else None)  # no X
        max_cells = self.max_cells
        if settings["spatial_key"] is None and max_cells is not None and light.n_obs <= max_cells:
            max_cells = None  # one tissue per sample already fits
        assign_tissues(
            light,
            spatial_key="xy" if xy is not None else None,
            library_key=settings["library_key"],
            batch_key=settings["batch_key"],
            max_cells=max_cells,
            seed=self.seed,
            key_added="tissue",
        )
        codes = light.obs["tissue"].cat.codes.to_numpy().astype(np.int64)
        # a temporary file of this process (DDP ranks may build the same cache at once), then
        # an atomic rename: a reader sees no cache or a whole one, and the last writer wins
        # (every writer computed the same codes)
        tmp = cache.with_name(f"{digest}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp.npz")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, tissue=codes.astype(np.int32), settings=json.dumps(settings))
            os.replace(tmp, cache)
        except OSError as e:
            logger.warning("Tissue cache %s not written (%s); tissues are recomputed.", cache, e)
            tmp.unlink(missing_ok=True)
        return codes, False

    def _split(self) -> None:
        """Whole tissues into train / validation, deterministic for the seed."""
        n_tissues = int(self.tissue_codes.max()) + 1
        order = np.random.default_rng(self.seed).permutation(n_tissues)
        n_val = round(self.validation_size * n_tissues)
        if self.validation_size > 0 and n_val == 0 and n_tissues > 1:
            n_val = 1
        self.val_tissues = np.sort(order[:n_val])
        self.train_tissues = np.sort(order[n_val:])
        is_val = np.zeros(n_tissues, dtype=bool)
        is_val[self.val_tissues] = True
        rows_val = is_val[self.tissue_codes]
        self.train_idx = np.flatnonzero(~rows_val)
        self.val_idx = np.flatnonzero(rows_val)
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)

    # -------------------------------------------------------------- scvi-tools surface
    @property
    def n_obs(self) -> int:
        """Cells in the corpus."""
        return int(self.offsets[-1])

    @property
    def n_vars(self) -> int:
        """Genes in the vocabulary."""
        return len(self.vocabulary)

    @property
    def var_names(self) -> pd.Index:
        """The vocabulary."""
        return pd.Index(self.vocabulary)

    @property
    def n_batch(self) -> int:
        """Batches (files, or file/sample pairs)."""
        return len(self.batch_names)

    @property
    def n_labels(self) -> int:
        """No labels in a pretraining corpus: 1."""
        return 1

    @property
    def registry(self) -> dict:
        """Registry in the layout of :meth:`cellplm_scvi.CellPLM.setup_anndata`.

        ``var_names`` are the vocabulary (``X`` in vocabulary columns), the batch categories
        are :attr:`batch_names`, labels are one constant category, ``tissue`` / ``ind_x`` are
        per-minibatch codes, and ``spatial`` is present when a file has coordinates.
        ``setup_args`` hold the arguments ``setup_anndata`` would take for the same tensors,
        plus ``measured_genes`` is available as :attr:`measured_genes`.
        """
        fields = {
            X_KEY: {
                "data_registry": {"attr_name": "X", "attr_key": None},
                "state_registry": {
                    "n_obs": self.n_obs,
                    "n_vars": self.n_vars,
                    "column_names": np.asarray(self.vocabulary, dtype=object),
                },
                "summary_stats": {"n_vars": self.n_vars, "n_cells": self.n_obs},
            },
            BATCH_KEY: {
                "data_registry": {"attr_name": "obs", "attr_key": "_scvi_batch"},
                "state_registry": {
                    "categorical_mapping": np.asarray(self.batch_names, dtype=object),
                    "original_key": "_cellplm_corpus_batch",
                },
                "summary_stats": {"n_batch": self.n_batch},
            },
            LABELS_KEY: {
                "data_registry": {"attr_name": "obs", "attr_key": "_scvi_labels"},
                "state_registry": {
                    "categorical_mapping": np.array([0]),
                    "original_key": "_scvi_labels",
                },
                "summary_stats": {"n_labels": 1},
            },
            TISSUE_KEY: {
                "data_registry": {"attr_name": "obs", "attr_key": TISSUE_CODE_OBS},
                "state_registry": {},
                "summary_stats": {},
            },
            INDICES_KEY: {
                "data_registry": {"attr_name": "obs", "attr_key": INDICES_OBS},
                "state_registry": {},
                "summary_stats": {},
            },
        }
        if self.has_spatial:
            fields[SPATIAL_KEY] = {
                "data_registry": {"attr_name": "obsm", "attr_key": "spatial"},
                "state_registry": {"column_names": np.array([0, 1])},
                "summary_stats": {"n_spatial": 2},
            }
        setup_args = {
            "layer": None,
            "batch_key": "_cellplm_corpus_batch",
            "labels_key": None,
            "size_factor_key": None,
            "categorical_covariate_keys": None,
            "continuous_covariate_keys": None,
            "spatial_key": "spatial" if self.has_spatial else None,
            "tissue_key": None,
            "library_key": None,
            "max_cells": self.max_cells,
            "unlabeled_category": "Unknown",
            "measured_genes_key": "_cellplm_measured" if not self.measured_genes.all() else None,
            "gene_key": None,  # minibatches are in vocabulary columns already
            "perturbation_key": None,
            "control_category": "ctrl",
        }
        return {
            "scvi_version": scvi.__version__,
            "model_name": "CellPLM",
            "setup_args": setup_args,
            "field_registries": fields,
            "setup_method_name": "setup_anndata",
        }

    # -------------------------------------------------------------- loaders
    def _replicas(self) -> tuple[int, int]:
        if self.num_replicas is not None:
            return self.num_replicas, self.rank or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def sampler(
        self, split: str = "train", num_replicas: int | None = None, rank: int | None = None
    ) -> TissueBatchSampler:
        """The tissue sampler of ``"train"`` (shuffled, capped, node drop) or
        ``"validation"`` (whole tissues in order), for this rank."""
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
        default_replicas, default_rank = self._replicas()
        train = split == "train"
        indices = self.train_idx if train else self.val_idx
        return TissueBatchSampler(
            indices,
            self.tissue_codes[indices],
            shuffle=train,
            drop_node_rate=self.drop_node_rate if train else 0.0,
            max_cells=self.max_cells_per_step if train else None,
            seed=self.seed,
            pack_tissues=self.pack_tissues and train,
            num_replicas=default_replicas if num_replicas is None else num_replicas,
            rank=default_rank if rank is None else rank,
        )

    def _loader(self, split: str) -> DataLoader | None:
        if (self.n_train if split == "train" else self.n_val) == 0:
            return None
        options = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if split == "train":  # its place in the epoch goes into checkpoints (resume mid-epoch)
            return ResumableLoader(self.dataset, self.sampler(split), **options)
        return DataLoader(self.dataset, sampler=self.sampler(split), batch_size=None, **options)

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: files are checked and split at construction."""

    def train_dataloader(self) -> DataLoader:
        """Shuffled tissues from all files, one per step."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | None:
        """Whole validation tissues."""
        return self._loader("validation")

    def teardown(self, stage: str | None = None) -> None:
        """Close the file handles of the main process."""
        self.dataset.close()


def _read_cache(cache: Path) -> np.ndarray | None:
    """The tissue codes of a cache file, or ``None`` (with a warning in the log) when it cannot
    be read (truncated, empty, or not written by this module): the tissues are then rebuilt."""
    try:
        with np.load(cache) as stored:
            return np.asarray(stored["tissue"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        logger.warning("Tissue cache %s is unreadable (%s); rebuilding it.", cache, e)
        return None


def _file_labels(paths: list[str]) -> list[str]:
    """Batch name of each file: its file name, or its full path where names clash."""
    names = [Path(p).name for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def _check_counts_sample(matrix, n_obs: int, path: str, layer: str | None) -> None:
    """Raise unless a sample of rows (start, middle, end) holds raw counts."""
    where = "X" if layer is None else f"layers[{layer!r}]"
    hint = (
        f"CellPLM needs raw counts in every corpus file. Pass `layer=` naming the raw-count "
        f"layer of {path!r} (a per-file list if the files differ), or re-write the file with "
        "counts."
    )
    if n_obs == 0:
        raise ValueError(f"Corpus file {path!r} has no cells; leave it out of files.")
    step = max(1, _CHECK_ROWS // 3)
    for start in sorted({0, max(0, n_obs // 2 - step // 2), max(0, n_obs - step)}):
        block = matrix[start : min(n_obs, start + step)]
        values = np.asarray(block.data if sp.issparse(block) else block)
        if not np.isfinite(values).all():
            raise ValueError(f"Corpus file {path!r}: {where} has NaN or infinite values. {hint}")
        if (values < 0).any():
            raise ValueError(f"Corpus file {path!r}: {where} has negative values. {hint}")
        if not np.array_equal(values, np.round(values)):
            raise ValueError(
                f"Corpus file {path!r}: {where} has non-integer values (normalised?). {hint}"
            )
