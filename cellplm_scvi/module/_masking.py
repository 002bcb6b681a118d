"""Masked-cell / masked-gene corruption of a tissue (training only), sparse-aware."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TissueMask:
    """Which cells and entries were hidden from the encoder.

    Attributes
    ----------
    cells
        (M,) row indices of the masked cells.
    entries
        (M, G) bool: the hidden (cell, gene) entries of those cells, zeros included.
    n_hidden
        The first ``n_hidden`` of ``cells`` are fully hidden (every entry of their row is in
        ``entries``): the encoder sees only their tissue, as in the niche read-out.
    """

    cells: torch.Tensor
    entries: torch.Tensor
    n_hidden: int = 0


def sample_mask(
    n_cells: int,
    n_genes: int,
    cell_rate: float,
    gene_rate: float,
    device: torch.device,
    hide_rate: float = 0.0,
) -> TissueMask:
    """Mask ``M = max(1, floor(cell_rate * N))`` random cells and, in them, each entry with
    probability ``gene_rate``; the first ``min(M, floor(hide_rate * N))`` of them are hidden
    whole (all genes). ``hide_rate=0`` draws exactly the official mask."""
    n_masked = max(1, int(cell_rate * n_cells))
    cells = torch.randperm(n_cells, device=device)[:n_masked]
    entries = torch.rand(n_masked, n_genes, device=device) <= gene_rate
    n_hidden = min(n_masked, int(hide_rate * n_cells))
    entries[:n_hidden] = True
    return TissueMask(cells, entries, n_hidden)


def apply_mask(x: torch.Tensor, mask: TissueMask) -> torch.Tensor:
    """Zero the hidden entries of ``x`` (N, G), dense or sparse CSR; returns a new tensor.

    An empty mask (no cell; e.g. a niche read-out pass of a tissue with fewer cells than
    passes) returns ``x`` unchanged.
    """
    if len(mask.cells) == 0:
        return x.clone()
    if x.layout != torch.sparse_csr:
        x = x.clone()
        x[mask.cells] = x[mask.cells].masked_fill(mask.entries, 0.0)
        return x
    crow, col, values = x.crow_indices(), x.col_indices(), x.values()
    rows = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), crow.diff())
    slot = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    slot[mask.cells] = torch.arange(len(mask.cells), device=x.device)
    in_masked_cell = slot[rows] >= 0
    hidden = in_masked_cell & mask.entries[slot[rows].clamp(min=0), col]
    return torch.sparse_csr_tensor(
        crow, col, values.masked_fill(hidden, 0.0), x.shape, check_invariants=False
    )


def join_masks(masks: list[TissueMask], rows: list[torch.Tensor]) -> TissueMask:
    """One mask of a packed step from the masks of its tissues, each drawn for that tissue alone.

    ``rows[t]`` are the step's row indices of tissue ``t`` (the mask of tissue ``t`` indexes
    them). Fully hidden cells (``n_hidden``) of every tissue come first, as in one tissue's mask.
    """
    parts = [(r[m.cells[: m.n_hidden]], m.entries[: m.n_hidden]) for m, r in zip(masks, rows)]
    parts += [(r[m.cells[m.n_hidden :]], m.entries[m.n_hidden :]) for m, r in zip(masks, rows)]
    cells = torch.cat([c for c, _ in parts])
    entries = torch.cat([e for _, e in parts])
    return TissueMask(cells, entries, sum(m.n_hidden for m in masks))
