"""A distance-decaying spatial kernel that linear (flow) attention can use.

Linear attention never forms the cells x cells matrix, so a relative position cannot be added
to its scores. A kernel that factorises can be multiplied in instead: with positive features
``psi(x)`` of a cell's position, the score ``phi(q_i) . phi(k_j)`` of a head becomes

    (phi(q_i) (x) psi(x_i)) . (phi(k_j) (x) psi(x_j)) = phi(q_i) . phi(k_j) * psi(x_i) . psi(x_j)

and flow attention runs unchanged on the wider (dh * M) non-negative features.

``psi`` places Gaussian bumps on a ``grid x grid`` lattice of anchors over the tissue (its
coordinates scaled to [0, 1] by the larger side, so distances stay isotropic) with a width of
one lattice step ``s``. Then

    psi(x_i) . psi(x_j) = exp(-|x_i - x_j|^2 / (2 s^2)) * sum_m exp(-2 |x_ij - c_m|^2 / s^2)

(``x_ij`` the midpoint): a Gaussian of the distance times a factor that is nearly constant
inside the lattice (anchors no farther apart than the width). Cells attend mostly to cells
within a few lattice steps, a fraction ``~1 / grid`` of the tissue's side. Cells without
coordinates (NaN) get the uniform features ``1 / sqrt(M)``: they attend to the whole tissue,
evenly.

:func:`~cellplm_scvi._geometry.scale_coordinates` is the per-tissue scaling of both spatial
encodings: isotropic here, per axis for the sinusoidal encoding of the embedder.
"""

from __future__ import annotations

import torch

from .._geometry import scale_coordinates
from ._segments import TissueSegments


def spatial_kernel_features(
    coords: torch.Tensor, grid: int, tissues: TissueSegments | None = None
) -> torch.Tensor:
    """(N, 2) coordinates -> (N, grid**2) positive kernel features, per tissue.

    Parameters
    ----------
    coords
        Cell coordinates of one tissue, or of each of the packed ``tissues``.
    grid
        Anchors per side (>= 2); the kernel width is one anchor step, ``1 / (grid - 1)`` of
        the tissue's larger side.
    tissues
        Packed tissues: each is scaled on its own.
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}.")
    coords = coords[:, :2].float()
    unit = scale_coordinates(coords, tissues, isotropic=True)  # (N, 2) in [0, 1]
    step = 1.0 / (grid - 1)
    axis = torch.linspace(0.0, 1.0, grid, device=coords.device)
    anchors = torch.cartesian_prod(axis, axis)  # (M, 2)
    sq_dist = (unit[:, None, :] - anchors[None]).pow(2).sum(-1)  # (N, M)
    features = torch.exp(-sq_dist / step**2)
    missing = coords.isnan().any(1)
    return torch.where(missing[:, None], features.new_full((), grid**-1.0), features)
