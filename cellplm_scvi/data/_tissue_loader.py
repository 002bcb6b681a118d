"""Tissue minibatches for scvi-tools: one minibatch = the cells of one tissue.

scvi-tools' loaders draw random bags of cells. CellPLM needs every cell of a minibatch to
come from the same tissue, because cells attend to each other. Three pieces do it:

- :class:`TissueBatchSampler` yields, per step, the row indices of one tissue (shuffled tissue
  order, node drop and a cell cap in training; one rank's share under DDP), or, with
  ``pack_tissues=True``, a list of several tissues' rows up to a cell budget;
- :class:`TissueDataLoader` reads those rows (counts as a sparse CSR tensor);
- :class:`TissueDataSplitter` splits the cells within every tissue (or, ``split_by="tissues"``,
  whole tissues) into train / validation / test.

Results are put back in AnnData order through the registered row index ``ind_x``.
"""

from __future__ import annotations

import heapq
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningDataModule
from scvi import settings
from torch.utils.data import Dataset, Sampler

from .._constants import (
    BATCH_KEY,
    LAYOUT_KEYS,
    LOSS_MASK_KEY,
    MEASURED_KEY,
    REQUESTED_KEY,
    SPATIAL_KEY,
    TISSUE_INDEX_KEY,
    TISSUE_KEY,
    X_KEY,
)
from .._geometry import local_regions
from .._validation import (
    check_batch_size,
    check_drop_node_rate,
    check_loader_options,
)
from ._resume import ResumableLoader

if TYPE_CHECKING:
    from .._vocabulary import GeneLayout

SPLIT_NAMES = {"train": 0, "validation": 1, "valid": 1, "test": 2}  # `split_key` values


def _to_csr_tensor(x) -> torch.Tensor:
    """Rows read from the AnnData -> float32 CSR tensor, sharing scipy's buffers.

    scipy's index dtype is kept (int32 unless the rows hold over 2**31 non-zeros): half the
    memory of int64 indices, and no copy. A matrix with duplicate entries (the same matrix to
    scipy) is summed first, on a copy: the embedder takes ``log1p`` of each stored value, so
    the tensor must hold one value per (cell, gene).
    """
    x = sp.csr_matrix(x, dtype=np.float32)
    if not x.has_canonical_format:  # duplicates, or unsorted genes: never the caller's buffers
        x = x.copy()
        x.sum_duplicates()
    index_dtype = np.promote_types(x.indptr.dtype, x.indices.dtype)
    with warnings.catch_warnings():  # torch's "CSR support is in beta" note is not for users
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(x.indptr.astype(index_dtype, copy=False)),
            torch.from_numpy(x.indices.astype(index_dtype, copy=False)),
            torch.from_numpy(x.data),
            size=x.shape,
            check_invariants=False,
        )


def _cat_csr(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack CSR tensors with the same columns along rows."""
    dtype = torch.int64 if any(p.crow_indices().dtype == torch.int64 for p in parts) else None
    dtype = dtype or parts[0].crow_indices().dtype
    crows, offset = [torch.zeros(1, dtype=dtype)], 0
    for p in parts:
        crows.append(p.crow_indices()[1:].to(dtype) + offset)
        offset += int(p.crow_indices()[-1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.cat(crows),
            torch.cat([p.col_indices().to(dtype) for p in parts]),
            torch.cat([p.values() for p in parts]),
            size=(sum(p.shape[0] for p in parts), parts[0].shape[1]),
            check_invariants=False,
        )


def pack_minibatches(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One packed step from the minibatches of T tissues (each as read alone).

    Rows are stacked tissue after tissue; ``"tissue_index"`` ((N,) long, 0..T-1) says which
    tissue each row came from. The per-file ``"measured"`` genes ((G,) per tissue) become
    (T, G); the gene layout's entries (one AnnData's) are kept once; every other key is per row
    and is stacked.
    """
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key in LAYOUT_KEYS:
            out[key] = values[0]
        elif key == X_KEY:
            out[key] = (
                _cat_csr(values) if values[0].layout == torch.sparse_csr else torch.cat(values)
            )
        elif key == MEASURED_KEY:
            out[key] = torch.stack([v.view(-1) for v in values])  # (T, G)
        else:
            out[key] = torch.cat(values)
    sizes = [p[X_KEY].shape[0] for p in parts]
    out[TISSUE_INDEX_KEY] = torch.repeat_interleave(
        torch.arange(len(parts)), torch.tensor(sizes, dtype=torch.long)
    )
    return out


def _is_packed(rows) -> bool:
    """Whether a sampler's step holds several tissues (a list of row lists)."""
    return len(rows) > 0 and not np.isscalar(rows[0])


def whole_tissues(codes: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(marked, rows)``: ``indices`` as an (n_obs,) bool mask, and every row of the tissues
    (``codes``: tissue code per row) that hold one of them, sorted."""
    marked = np.zeros(len(codes), dtype=bool)
    marked[indices] = True
    return marked, np.flatnonzero(np.isin(codes, np.unique(codes[indices])))


class TissueDataset(Dataset):
    """Reads a list of rows of a registered AnnData: counts as CSR tensor, the rest as arrays.

    Rows are read in sorted order, and a contiguous run of rows as one slice (several times
    faster than a fancy index on a backed ``.h5ad``); ``ind_x`` says which rows came. The
    ``gene_layout``'s tensors (how the columns meet the model's vocabulary) are added to every
    minibatch.
    """

    def __init__(
        self,
        adata_manager,
        requested: np.ndarray | None = None,
        loss_rows: np.ndarray | None = None,
        gene_layout: GeneLayout | None = None,
    ):
        self.requested = requested  # (n_obs,) bool: rows the caller asked for (context mode)
        self.loss_rows = loss_rows  # (n_obs,) bool: rows that enter the loss (cell split)
        self.layout = {} if gene_layout is None else gene_layout.tensors()
        self.missing_coordinates = gene_layout is not None and gene_layout.missing_coordinates
        self.x = adata_manager.get_from_registry(X_KEY)
        if sp.issparse(self.x) and self.x.format not in ("csr", "csc"):
            self.x = sp.csr_matrix(self.x)  # e.g. COO cannot be row-indexed
        keys = [k for k in adata_manager.data_registry if k != X_KEY]
        self.other = adata_manager.create_torch_dataset(data_and_attributes=keys)

    def __len__(self) -> int:
        return len(self.other)

    def __getitem__(self, rows: list[int] | list[list[int]]) -> dict[str, torch.Tensor]:
        if _is_packed(rows):  # several tissues: each read alone, then stacked
            return pack_minibatches([self[tissue] for tissue in rows])
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        out = {k: torch.as_tensor(v) for k, v in self.other[rows].items()}
        contiguous = len(rows) > 0 and rows[-1] - rows[0] + 1 == len(rows)  # rows are unique
        x = self.x[slice(rows[0], rows[-1] + 1) if contiguous else rows]
        if sp.issparse(x) and sp.issparse(self.x) and np.may_share_memory(x.data, self.x.data):
            x = x.copy()  # a slice may be a view: the model never gets the user's own buffers
        out[X_KEY] = _to_csr_tensor(x)
        if self.requested is not None:
            out[REQUESTED_KEY] = torch.from_numpy(self.requested[rows])
        if self.loss_rows is not None:
            out[LOSS_MASK_KEY] = torch.from_numpy(self.loss_rows[rows])
        if self.missing_coordinates:
            out[SPATIAL_KEY] = torch.full((len(rows), 2), float("nan"))
        out.update(self.layout)
        return out


def _group_by(rows: np.ndarray, codes: np.ndarray) -> list[np.ndarray]:
    """``rows`` split by their ``codes`` (one array per code, in code order, rows in order)."""
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(rows[order], bounds) if len(rows) else []


def _next_fit_decreasing(sizes: np.ndarray, budget: int, order: np.ndarray) -> list[list[int]]:
    """Steps of tissues taken largest first (ties in ``order``), each closed when the next
    tissue does not fit. How many there are depends on the sizes only."""
    order = order[np.argsort(-sizes[order], kind="stable")]
    steps, current, filled = [], [], 0
    for i in order:
        if current and filled + sizes[i] > budget:
            steps.append(current)
            current, filled = [], 0
        current.append(int(i))
        filled += sizes[i]
    return steps + [current] if current else steps


def pack_steps(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Group tissues of ``sizes`` cells (each <= ``budget``) into steps of <= ``budget`` cells.

    The number of steps ``S`` is that of packing the tissues largest first (next fit,
    decreasing): it depends on the sizes only, so every epoch has the steps Lightning was told.
    Each epoch the tissues, in random order, go one by one to the least filled of the ``S``
    steps, so steps mix tissues of all sizes and files at random; in the rare epoch where a
    tissue does not fit that way, the largest-first packing (equal sizes in random order) is
    used. The steps come in random order; each is an array of positions in ``sizes``.
    """
    sizes = np.asarray(sizes)
    n_steps = len(_next_fit_decreasing(sizes, budget, np.arange(len(sizes))))
    heap = [(0, k) for k in range(n_steps)]  # (cells so far, step)
    steps: list[list[int]] = [[] for _ in range(n_steps)]
    for i in rng.permutation(len(sizes)):
        filled, k = heapq.heappop(heap)
        if filled + sizes[i] > budget:
            steps = _next_fit_decreasing(sizes, budget, rng.permutation(len(sizes)))
            break
        steps[k].append(int(i))
        heapq.heappush(heap, (filled + int(sizes[i]), k))
    return [np.array(steps[k]) for k in rng.permutation(len(steps))]


class TissueBatchSampler(Sampler):
    """Yield the rows of one tissue per step (or of several, ``pack_tissues``).

    Parameters
    ----------
    indices
        Rows (positions in the AnnData) to draw from.
    tissue_codes
        Tissue code of each of those rows.
    shuffle
        Shuffle the order of tissues each epoch (training).
    drop_node_rate
        In each step keep a random ``floor((1 - rate) * n)`` cells of the tissue (official
        node drop; training only).
    max_cells
        Cap on cells per step. Training: a random subset of larger tissues. Evaluation: larger
        tissues are cut into random chunks of at most ``max_cells``. ``None``: no cap.
    seed
        Base seed; combined with the epoch set by Lightning.
    num_replicas, rank
        DDP: every rank gets the same number of steps (tissues are repeated to pad).
    requested
        (n_obs,) bool. Context mode (inference): steps holding no requested row are skipped.
    redraw
        ``(coords, groups, size)`` of the rows in ``indices``: (n, 2) coordinates, (n,) slide
        codes and the cells per re-drawn tissue (``None``: the registered tissues' mean size).
        In training (``shuffle``) the tissues are then drawn anew each epoch: within each slide,
        the Voronoi regions of ``round(n_slide / size)`` random cells, relaxed by two Lloyd
        steps (local, whole; :func:`~cellplm_scvi._geometry.local_regions`), so no cell
        stays at one tissue border. Node drop and the cap apply as usual.
    pack_tissues
        Training only: a step holds several whole tissues (each after node drop and the cap),
        at most ``max_cells`` cells in all, and is yielded as a list of their row lists
        (:class:`TissueDataset` stacks them and numbers them in ``"tissue_index"``). Tissues are
        grouped at random each epoch into a fixed number of steps (:func:`pack_steps`); the
        steps, not the tissues, are shared across DDP ranks, so every tissue is still seen once
        per epoch.

    Attributes
    ----------
    start
        0, or the number of this rank's steps that the next iteration skips: a resumed
        :class:`~cellplm_scvi.data._resume.ResumableLoader` sets it.
    """

    def __init__(
        self,
        indices: np.ndarray,
        tissue_codes: np.ndarray,
        shuffle: bool = False,
        drop_node_rate: float = 0.0,
        max_cells: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        requested: np.ndarray | None = None,
        redraw: tuple[np.ndarray, np.ndarray, int | None] | None = None,
        pack_tissues: bool = False,
    ):
        drop_node_rate = check_drop_node_rate(drop_node_rate)
        max_cells = check_batch_size(max_cells, "max_cells (batch_size)")
        if pack_tissues:
            if not shuffle or requested is not None:
                raise ValueError(
                    "pack_tissues=True is for training steps (shuffle=True): evaluation and "
                    "inference read one tissue per step."
                )
            if not max_cells:
                raise ValueError(
                    "pack_tissues=True needs a cell budget per step: pass max_cells (train(): "
                    "batch_size / max_cells_per_step)."
                )
            if redraw is not None:
                raise ValueError(
                    "pack_tissues=True is not supported with redrawn tissues (redraw=): their "
                    "sizes change each epoch, and so would the number of packed steps."
                )
        self.pack_tissues = pack_tissues
        indices = np.asarray(indices, dtype=np.int64)
        self.requested = requested
        self.tissues = _group_by(indices, np.asarray(tissue_codes).reshape(-1))
        self.shuffle, self.drop_node_rate, self.max_cells = shuffle, drop_node_rate, max_cells
        self.seed, self.epoch, self.start = seed, 0, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.redraw = None
        if redraw is not None:
            coords, groups, size = redraw
            groups = np.asarray(groups)
            if size is None:  # the registered tissues' mean size
                size = len(indices) / max(1, len(self.tissues))
            slides = [np.flatnonzero(groups == g) for g in np.unique(groups)]
            self.redraw = (indices, np.asarray(coords, dtype=np.float64), slides, size)

    def _redrawn_tissues(self, rng: np.random.Generator) -> list[np.ndarray]:
        """This epoch's local tissues (see ``redraw``)."""
        indices, coords, slides, size = self.redraw
        tissues = []
        for rows in slides:
            tissues += _group_by(indices[rows], local_regions(coords[rows], size, rng))
        return tissues

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch."""
        self.epoch = epoch

    def _steps(self, rng: np.random.Generator) -> list[np.ndarray]:
        steps = []
        redrawn = self.shuffle and self.redraw is not None
        for cells in self._redrawn_tissues(rng) if redrawn else self.tissues:
            if self.shuffle:  # training: node drop, then cap
                if self.drop_node_rate > 0:
                    n_keep = max(1, int(len(cells) * (1 - self.drop_node_rate)))
                    cells = rng.choice(cells, n_keep, replace=False)
                if self.max_cells and len(cells) > self.max_cells:
                    cells = rng.choice(cells, self.max_cells, replace=False)
                steps.append(cells)
            elif self.max_cells and len(cells) > self.max_cells:
                n_chunks = math.ceil(len(cells) / self.max_cells)
                steps.extend(np.array_split(rng.permutation(cells), n_chunks))
            else:
                steps.append(cells)
        if self.requested is not None:
            steps = [cells for cells in steps if self.requested[cells].any()]
        return steps

    def __iter__(self):
        # `start` is read now, not at the first step: a DataLoader iterator that exists has
        # its sampler iterator, and the loader then resets `start` (ResumableLoader)
        return self._iter_from(self.start)

    def _iter_from(self, start: int):
        rng = np.random.default_rng([self.seed, self.epoch])
        steps = self._steps(rng)
        order = rng.permutation(len(steps)) if self.shuffle else np.arange(len(steps))
        packs = None
        if self.pack_tissues:  # several tissues per step
            packs = pack_steps(np.array([len(s) for s in steps]), self.max_cells, rng)
            order = np.arange(len(packs))
        if self.num_replicas > 1:
            total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
            order = np.resize(order, total)[self.rank :: self.num_replicas]
        for i in order[start:]:  # a resumed epoch skips the steps taken
            if packs is None:
                yield steps[i].tolist()
            else:
                yield [steps[j].tolist() for j in packs[i]]

    def emission_order(self) -> np.ndarray:
        """Context mode: the requested rows in the order the model returns them (per step,
        sorted rows, as :class:`TissueDataset` reads them)."""
        steps = self._steps(np.random.default_rng([self.seed, self.epoch]))
        rows = [np.sort(cells)[self.requested[np.sort(cells)]] for cells in steps]
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        steps = self._steps(np.random.default_rng(0))  # chunking is size-determined
        n = len(steps)
        if self.pack_tissues:  # as is packing (see pack_steps)
            sizes = np.array([len(s) for s in steps])
            n = len(pack_steps(sizes, self.max_cells, np.random.default_rng(0)))
        return math.ceil(n / self.num_replicas)


class TissueDataLoader(ResumableLoader):
    """DataLoader whose minibatches are tissues (see :class:`TissueBatchSampler`).

    A :class:`~cellplm_scvi.data._resume.ResumableLoader`: Lightning checkpoints its place in
    the epoch (``state_dict()``) and a resumed run skips the steps taken
    (``load_state_dict()``; see ``start`` of :class:`TissueBatchSampler`).

    Accepts the keyword arguments scvi-tools passes to a data loader; ``batch_size`` is the
    cap on cells per step (``None``: whole tissues). Counts always come as a sparse CSR tensor
    and every registered field is read, so ``drop_last=True``, ``load_sparse_tensor=False``
    and ``data_and_attributes`` raise a ``ValueError``.

    With ``context=True`` (inference), every tissue holding one of ``indices`` is read whole, so
    that each cell is encoded with the cells of its tissue as registered, and a ``"requested"``
    mask marks the rows asked for: the module returns those rows only, in the order given by
    :meth:`emission_order`.

    ``loss_rows`` ((n_obs,) bool) adds a ``"loss_mask"`` to each minibatch: the rows that enter
    the loss (within-tissue split: the other cells are context only).

    ``redraw_tissues`` (training; ``True``, or the cells per tissue) draws local tissues anew
    every epoch from the registered coordinates (see ``redraw`` of :class:`TissueBatchSampler`).

    ``pack_tissues=True`` (training, ``shuffle=True``) puts several whole tissues in one step,
    ``batch_size`` cells at most in all (each tissue capped at it): see ``pack_tissues`` of
    :class:`TissueBatchSampler`.

    ``gene_layout`` (:class:`~cellplm_scvi._vocabulary.GeneLayout`): how the AnnData's columns
    meet the model's vocabulary, put in every minibatch (``None``: the columns are the
    vocabulary, every gene measured). A model's loaders get it from the model.
    """

    def __init__(
        self,
        adata_manager,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        shuffle: bool = False,
        drop_node_rate: float = 0.0,
        distributed_sampler: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        load_sparse_tensor: bool | None = None,
        pin_memory: bool = False,
        data_and_attributes: list | dict | None = None,
        context: bool = False,
        loss_rows: np.ndarray | None = None,
        redraw_tissues: bool | int = False,
        pack_tissues: bool = False,
        gene_layout: GeneLayout | None = None,
        **kwargs,
    ):
        check_loader_options(drop_last, load_sparse_tensor, data_and_attributes)
        batch_size = check_batch_size(batch_size)
        n_obs = adata_manager.adata.n_obs
        indices = np.arange(n_obs) if indices is None else np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        all_codes = np.asarray(adata_manager.get_from_registry(TISSUE_KEY)).reshape(-1)
        requested = None
        self.requested_indices = indices  # the caller's order (context mode)
        if context:
            requested, indices = whole_tissues(all_codes, indices)
        codes = all_codes[indices]
        num_replicas, rank = 1, 0
        if distributed_sampler and torch.distributed.is_initialized():
            num_replicas = torch.distributed.get_world_size()
            rank = torch.distributed.get_rank()
        sampler = TissueBatchSampler(
            indices,
            codes,
            shuffle=shuffle,
            drop_node_rate=drop_node_rate if shuffle else 0.0,
            max_cells=batch_size,
            seed=(settings.seed or 0) if seed is None else seed,
            num_replicas=num_replicas,
            rank=rank,
            requested=requested,
            redraw=_redraw(adata_manager, indices, redraw_tissues) if redraw_tissues else None,
            pack_tissues=pack_tissues,
        )
        kwargs.pop("iter_ndarray", None)
        if not shuffle:  # evaluation / inference: the DataLoader's default generator, as before
            kwargs.setdefault("generator", None)
        super().__init__(
            TissueDataset(adata_manager, requested, loss_rows, gene_layout),
            sampler,
            pin_memory=pin_memory,
            **kwargs,
        )

    def emission_order(self) -> np.ndarray:
        """Rows in the order the model's outputs come (context mode)."""
        return self.tissue_sampler.emission_order()


MIN_CELLS_TO_SPLIT = 10  # split_by="cells": smaller tissues go wholly to training


def _refuse_unseen_levels(adata_manager, train_idx: np.ndarray) -> None:
    """``split_by="tissues"``: refuse a split whose training cells miss a batch or
    categorical covariate level (its decoder row would only ever see held-out tissues)."""
    columns = {}
    setup = adata_manager.registry["setup_args"]
    if setup.get("batch_key") is not None:
        columns[f"batch_key={setup['batch_key']!r}"] = adata_manager.adata.obs[setup["batch_key"]]
    for key in setup.get("categorical_covariate_keys") or []:
        columns[f"categorical covariate {key!r}"] = adata_manager.adata.obs[key]
    unseen = {}
    for name, values in columns.items():
        values = values.astype(str).to_numpy()
        missing = sorted(set(values) - set(values[train_idx]))
        if missing:
            unseen[name] = missing[:5]
    if not unseen:
        return
    without_coords = (
        SPATIAL_KEY not in adata_manager.data_registry and setup.get("tissue_key") is None
    )
    reason = (
        " Without coordinates the computed tissues are whole batch_key samples (unless "
        "max_cells cuts them), so holding out a tissue holds out a batch."
        if without_coords
        else ""
    )
    raise ValueError(
        f"split_by='tissues' would hold out every cell of {unseen}: those levels' decoder "
        f"covariate rows would never be trained.{reason} Use the default split_by='cells' "
        "(validation cells taken within every tissue, trained on as context), or pass "
        "train_size=1.0 to hold nothing out."
    )


def _redraw(adata_manager, indices: np.ndarray, redraw_tissues: bool | int) -> tuple:
    """``redraw`` of :class:`TissueBatchSampler`: (coordinates, slide code) of ``indices`` and
    the size (an int ``redraw_tissues``, else ``None``). Slides are the ``library_key`` values,
    else the batches (re-drawn tissues never span two slides)."""
    if SPATIAL_KEY not in adata_manager.data_registry:
        raise ValueError("redraw_tissues needs coordinates: setup_anndata(spatial_key=...).")
    coords = np.asarray(adata_manager.get_from_registry(SPATIAL_KEY), dtype=np.float64)[:, :2]
    library_key = adata_manager.registry["setup_args"].get("library_key")
    if library_key is not None:
        slides = pd.Categorical(adata_manager.adata.obs[library_key]).codes
    else:
        slides = np.asarray(adata_manager.get_from_registry(BATCH_KEY)).reshape(-1)
    size = None if redraw_tissues is True else int(redraw_tissues)
    return coords[indices], np.asarray(slides)[indices], size


class TissueDataSplitter(LightningDataModule):
    """Train / validation / test split: cells within every tissue (default), or whole tissues.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    train_size
        Fraction of each tissue's cells (or, ``split_by="tissues"``, of the tissues) for
        training (``None``: 0.9; all tissues when there is one and ``split_by="tissues"``).
    validation_size
        Fraction of each tissue's cells (or of the tissues) for validation (default: the rest).
    max_cells_per_step
        Cap on cells per training step (larger tissues are subsampled each step):
        :meth:`CellPLM.train`'s ``batch_size``. The splitter has no ``batch_size`` of its own
        (passing one raises).
    drop_node_rate
        Official node drop: fraction of a tissue's cells left out at each training step.
    distributed_sampler
        Share tissues across DDP ranks.
    pack_tissues
        Training steps hold several whole tissues, ``max_cells_per_step`` cells at most in all
        (see ``pack_tissues`` of :class:`TissueBatchSampler`); validation and test read one
        tissue per step.
    split_by
        ``"cells"`` (default; the official fine-tuning pipelines' ``split_field``): the cells
        of every tissue are split, stratified per tissue, so every tissue, slide, sample and
        batch is trained on; a tissue of fewer than ``MIN_CELLS_TO_SPLIT`` (10) cells goes
        wholly to training. Every loader reads its tissues whole and marks its own split's
        cells in a ``"loss_mask"``: validation cells stay in the training forward pass (as
        attention context of their tissue) and leave only the loss. The validation loss is
        therefore that of held-out cells seen in context, not an estimate for unseen tissues.
        Within each tissue the cells are permuted with ``scvi.settings.seed``
        (``shuffle_set_split=False``: taken in row order).
        ``"tissues"``: whole tissues go to one split (an estimate for unseen tissues). Refused
        when a held-out tissue would take a ``batch_key`` or categorical covariate level out
        of training (its decoder covariate row would never be trained), so always with tissues
        made from ``batch_key`` (data without coordinates).
    split_key
        ``adata.obs`` column with the split of each cell (``"train"``, ``"validation"`` or
        ``"valid"``, ``"test"``); implies ``split_by="cells"`` and replaces the sizes.
    redraw_tissues
        Training tissues drawn anew every epoch from the coordinates (local regions within each
        ``library_key`` slide, else batch, of this many cells, or for ``True`` of the
        registered tissues' mean size; see
        ``redraw`` of :class:`TissueBatchSampler`); validation and test keep the registered ones.
    **loader_kwargs
        Passed to every :class:`TissueDataLoader`, e.g. ``gene_layout`` (a model's
        ``train`` passes the layout of its AnnData).
    """

    def __init__(
        self,
        adata_manager,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        max_cells_per_step: int | None = None,
        drop_node_rate: float = 0.0,
        distributed_sampler: bool = False,
        split_by: str = "cells",
        split_key: str | None = None,
        redraw_tissues: bool | int = False,
        pack_tissues: bool = False,
        **loader_kwargs,
    ):
        super().__init__()
        if "batch_size" in loader_kwargs:
            raise ValueError(
                "TissueDataSplitter has no batch_size: the cells per training step are "
                "max_cells_per_step (CellPLM.train(batch_size=...) sets it)."
            )
        self.max_cells_per_step = check_batch_size(
            max_cells_per_step, "batch_size (max_cells_per_step)"
        )
        self.drop_node_rate = check_drop_node_rate(drop_node_rate)
        if pack_tissues and not max_cells_per_step:
            raise ValueError(
                "pack_tissues=True needs max_cells_per_step, the cell budget of a packed step."
            )
        self.pack_tissues = pack_tissues
        self.adata_manager = adata_manager
        self.redraw_tissues = redraw_tissues
        if loader_kwargs.pop("drop_dataset_tail", False):
            raise ValueError(
                "drop_dataset_tail=True is not supported: the tissue sampler gives every DDP rank "
                "the same number of steps itself. Leave it out."
            )
        check_loader_options(
            loader_kwargs.get("drop_last", False),
            loader_kwargs.get("load_sparse_tensor"),
            loader_kwargs.get("data_and_attributes"),
        )
        self.loader_kwargs = loader_kwargs
        self.distributed_sampler = distributed_sampler

        if split_by not in ("tissues", "cells"):
            raise ValueError(f"split_by must be 'tissues' or 'cells', got {split_by!r}.")
        self.split_by = "cells" if split_key is not None else split_by
        codes = np.asarray(adata_manager.get_from_registry(TISSUE_KEY)).reshape(-1)
        self._codes = codes
        if self.split_by == "cells":
            sizes = (train_size, validation_size, shuffle_set_split)
            split = self._cell_split(adata_manager.adata, codes, split_key, *sizes)
            self.train_idx, self.val_idx, self.test_idx = split
            self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
            return
        tissues = np.unique(codes)
        n = len(tissues)
        if train_size is None:
            train_size = 0.9 if n > 1 else 1.0
        if not 0 < train_size <= 1:
            raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
        n_train = max(1, min(n, round(train_size * n)))
        if train_size < 1 and n_train == n and n > 1:
            n_train = n - 1  # keep at least one validation tissue
        n_val = n - n_train if validation_size is None else round(validation_size * n)
        if n_train + n_val > n:
            raise ValueError("train_size + validation_size must not exceed 1.")
        if shuffle_set_split:
            tissues = np.random.RandomState(settings.seed).permutation(tissues)
        split = np.split(tissues, [n_train, n_train + n_val])
        rows = np.arange(len(codes))
        self.train_idx, self.val_idx, self.test_idx = (rows[np.isin(codes, t)] for t in split)
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
        _refuse_unseen_levels(adata_manager, self.train_idx)

    @staticmethod
    def _cell_split(
        adata, codes, split_key, train_size, validation_size, shuffle=True
    ) -> list[np.ndarray]:
        """Row indices of the train / validation / test cells, split within each tissue."""
        n_obs = adata.n_obs
        if split_key is not None:
            if split_key not in adata.obs:
                raise KeyError(f"split_key {split_key!r} is not a column of adata.obs.")
            values = adata.obs[split_key].astype(str).to_numpy()
            unknown = sorted(set(values) - set(SPLIT_NAMES))
            if unknown:
                raise ValueError(
                    f"adata.obs[{split_key!r}] has values {unknown[:5]}; use 'train', "
                    "'validation' (or 'valid') and 'test'."
                )
            code = np.array([SPLIT_NAMES[v] for v in values])
            return [np.flatnonzero(code == k) for k in range(3)]
        train_size = 0.9 if train_size is None else train_size
        if not 0 < train_size <= 1:
            raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
        val_size = 1 - train_size if validation_size is None else validation_size
        if train_size + val_size > 1 + 1e-9:
            raise ValueError("train_size + validation_size must not exceed 1.")
        rng = np.random.RandomState(settings.seed)
        parts: list[list[np.ndarray]] = [[], [], []]
        for rows in _group_by(np.arange(n_obs), codes):
            if shuffle:
                rows = rng.permutation(rows)
            if len(rows) < MIN_CELLS_TO_SPLIT:  # too few to spare any: all train
                parts[0].append(rows)
                continue
            n_train = max(1, round(train_size * len(rows)))
            n_val = min(len(rows) - n_train, round(val_size * len(rows)))
            for part, chunk in zip(parts, np.split(rows, [n_train, n_train + n_val])):
                part.append(chunk)
        return [np.sort(np.concatenate(part)) if part else np.zeros(0, int) for part in parts]

    def setup(self, stage: str | None = None) -> None:
        """Splits are fixed at construction (``TrainRunner`` reads their sizes first)."""

    def _loader(self, indices: np.ndarray, train: bool) -> TissueDataLoader | None:
        if len(indices) == 0:
            return None
        loss_rows = None
        if self.split_by == "cells":  # whole tissues; this split's cells enter the loss
            marked, whole = whole_tissues(self._codes, indices)
            if len(whole) > len(indices):  # else whole tissues: no mask, as split_by="tissues"
                loss_rows, indices = marked, whole
        return TissueDataLoader(
            self.adata_manager,
            indices=indices,
            loss_rows=loss_rows,
            batch_size=self.max_cells_per_step if train else None,
            shuffle=train,
            drop_node_rate=self.drop_node_rate,
            distributed_sampler=self.distributed_sampler,
            redraw_tissues=self.redraw_tissues if train else False,
            pack_tissues=self.pack_tissues and train,
            **self.loader_kwargs,
        )

    def train_dataloader(self) -> TissueDataLoader:
        """Shuffled tissues with node drop."""
        return self._loader(self.train_idx, train=True)

    def val_dataloader(self) -> TissueDataLoader | None:
        """Whole validation tissues."""
        return self._loader(self.val_idx, train=False)

    def test_dataloader(self) -> TissueDataLoader | None:
        """Whole test tissues."""
        return self._loader(self.test_idx, train=False)
