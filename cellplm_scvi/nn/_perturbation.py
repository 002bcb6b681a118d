"""Perturbation token: what a genetic perturbation adds to the tokens of the cells under it."""

from __future__ import annotations

import torch
from torch import nn


class PerturbationEncoder(nn.Module):
    """``offset = MLP(LayerNorm(sum of the perturbed genes' rows of E)))``, zero for controls.

    The perturbed genes are read through the model's own gene-embedding table ``E`` (the
    tokenizer), so every gene of the vocabulary has an embedding, including genes never
    perturbed in training. ``E`` is read detached: the perturbation objective trains the map,
    not the rows, so the rows of seen and unseen genes keep coming from the same (expression)
    objective and the map learnt on seen genes applies to unseen ones.

    Parameters
    ----------
    n_hidden
        Token width (columns of ``E``).
    """

    def __init__(self, n_hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(n_hidden),  # E rows are ~0.005 at init, pretrained ones larger
            nn.Linear(n_hidden, n_hidden),
            nn.GELU(),
            nn.Linear(n_hidden, n_hidden),
        )

    def forward(self, emb: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """(V, d) gene embeddings, (N, P) vocabulary rows (-1: none) -> (N, d) token offsets."""
        present = genes >= 0  # (N, P)
        rows = emb.detach()[genes.clamp(min=0)] * present[..., None].to(emb.dtype)  # (N, P, d)
        offset = self.mlp(rows.sum(1))  # (N, d)
        return offset * present.any(1, keepdim=True).to(offset.dtype)  # controls: no offset
