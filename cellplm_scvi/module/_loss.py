"""Negative-binomial reconstruction objective of CellPLM (library-size rescaled)."""

from __future__ import annotations

import torch
from scvi.distributions._negative_binomial import log_nb_positive


def nb_nll(x: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Elementwise NB negative log-likelihood (scvi-tools' ``log_nb_positive``: mean, inverse
    dispersion ``theta``). ``theta`` may be per gene, (G,): it broadcasts without being
    expanded, so its log-gamma is computed once per gene."""
    return -log_nb_positive(x, mean, theta)


def rescale_to_library(mean: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None):
    """Rescale each row of ``mean`` so that it sums to the row's observed count total.

    With ``weight`` (0/1, same shape), sums run over the weighted entries only.
    """
    if weight is not None:
        mean, x = mean * weight, x * weight
    return mean / mean.sum(1, keepdim=True).clamp_min(1e-12) * x.sum(1, keepdim=True)


def masked_nb_loss(
    x: torch.Tensor,
    mean: torch.Tensor,
    theta: torch.Tensor,
    entries: torch.Tensor | None = None,
    measured: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-cell CellPLM NB loss, shape (M,).

    Parameters
    ----------
    x
        (M, G) observed counts of the cells in the loss.
    mean, theta
        Decoder NB mean (M, G) and inverse dispersion (G,) or (M, G).
    entries
        (M, G) bool, the masked entries. When given, the denoising ("DAE") term, the NB loss of
        the masked entries with the mean rescaled to their own total, is added.
    measured
        (M, G) bool, the genes measured for each cell (official ``NBImputationLoss``): the
        library size and the loss use these genes only. ``None``: all genes.
    """
    if measured is None:
        loss = nb_nll(x, rescale_to_library(mean, x), theta).sum(1)
    else:
        w = measured.to(mean.dtype)
        loss = (nb_nll(x * w, rescale_to_library(mean, x, w), theta) * w).sum(1)
    if entries is not None:  # evaluated at the masked entries only (~gene_rate of them)
        w = entries.to(mean.dtype)
        scale = (x * w).sum(1) / (mean * w).sum(1).clamp_min(1e-12)  # (M,)
        rows, cols = entries.nonzero(as_tuple=True)
        theta_at = theta[cols] if theta.dim() == 1 else theta[rows, cols]
        dae = nb_nll(x[rows, cols], mean[rows, cols] * scale[rows], theta_at)
        loss = loss + torch.zeros_like(loss).index_add(0, rows, dae)
    return loss
