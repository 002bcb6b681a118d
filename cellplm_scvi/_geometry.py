"""Geometry of cell coordinates shared by the data loaders and the network.

:func:`local_regions` cuts a tissue's cells into random local regions (the loader's re-drawn
training tissues); :func:`scale_coordinates` scales a tissue's coordinates to the unit square
(the embedder's sinusoidal encoding, the local heads' spatial kernel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .nn._segments import TissueSegments


def local_regions(xy: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) region of each of ``n`` cells (coordinates ``xy``, (n, 2)): a random local partition.

    ``round(n / size)`` random cells are centres; each cell joins its nearest centre, and two
    Lloyd steps (centres moved to their regions' means) even out the region sizes. Regions are
    numbered ``0..R-1`` (every id used). Training tissues re-drawn every epoch come from here.
    """
    n = len(xy)
    n_regions = max(1, min(n, round(n / size)))
    centres = xy[rng.choice(n, n_regions, replace=False)]
    for step in range(3):
        region = ((xy[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)  # (n,)
        if step == 2:
            break
        counts = np.bincount(region, minlength=n_regions)[:, None]
        sums = np.zeros_like(centres)
        np.add.at(sums, region, xy)
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
    return np.unique(region, return_inverse=True)[1].reshape(-1)


def scale_coordinates(
    coords: torch.Tensor, tissues: TissueSegments | None = None, isotropic: bool = False
) -> torch.Tensor:
    """Min-max scale (N, 2) coordinates of one tissue (or of each packed tissue) to [0, 1]:
    per axis, or by the larger side (``isotropic``: distances keep their ratios). NaN rows
    stay NaN."""
    if tissues is not None:
        out = coords.clone()
        for rows in tissues.rows():
            out[rows] = scale_coordinates(coords[rows], isotropic=isotropic)
        return out
    finite = ~coords.isnan().any(1)
    if not finite.any():
        return coords
    lo = coords[finite].min(0).values
    span = coords[finite].max(0).values - lo
    return (coords - lo) / (span.max() if isotropic else span).clamp_min(1e-12)
