"""Perturbation token: what a genetic perturbation adds to the tokens of the cells under it."""

from __future__ import annotations

import torch
from torch import nn


class PerturbationEncoder(nn.Module):
    """``offset = sum over the perturbed genes g of MLP(LayerNorm(E[g]))``, zero for controls.

    The perturbed genes are read through the model's own gene-embedding table ``E`` (the
    tokenizer), so every gene of the vocabulary has an embedding, including genes never
    perturbed in training. ``E`` is read detached: the perturbation objective trains the map,
    not the rows, so the rows of seen and unseen genes keep coming from the same (expression)
    objective and the map learnt on seen genes applies to unseen ones.

    Parameters
    ----------
    n_hidden
        Token width (columns of ``E``).
    n_latent
        Latent width: ``to_latent`` maps the offset to a shift of the decoder's input.
    n_vocab
        Genes of the decoder: ``to_genes`` maps the offset to a shift of each gene's log mean
        (zero at initialisation). A pair's shift is the sum of its genes' shifts (additive in
        log space); the non-additive part goes through ``to_latent`` and the decoder.

    Attributes
    ----------
    own_gene_shift
        The shift of the perturbed genes' own log means, instead of ``to_genes``'s: one learned
        value for every gene (a CRISPRi knock-down acts first on its own gene; the sign and
        size are learned), so a gene never perturbed in training gets it too.
    """

    def __init__(self, n_hidden: int, n_latent: int, n_vocab: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(n_hidden),  # E rows are ~0.005 at init, pretrained ones larger
            nn.Linear(n_hidden, n_hidden),
            nn.GELU(),
            nn.Linear(n_hidden, n_hidden),
        )
        self.to_latent = nn.Linear(n_hidden, n_latent)
        self.to_genes = nn.Linear(n_hidden, n_vocab)
        nn.init.zeros_(self.to_genes.weight)
        nn.init.zeros_(self.to_genes.bias)
        self.own_gene_shift = nn.Parameter(torch.zeros(()))

    def forward(self, emb: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """(V, d) gene embeddings, (N, P) vocabulary rows (-1: none) -> (N, d) token offsets."""
        present = genes >= 0  # (N, P)
        rows = emb.detach()[genes.clamp(min=0)]  # (N, P, d)
        offsets = self.mlp(rows) * present[..., None].to(rows.dtype)  # (N, P, d), 0 for -1
        return offsets.sum(1)  # (N, d); controls: no offset

    def gene_shift(
        self, offset: torch.Tensor, genes: torch.Tensor, gene_index: torch.Tensor | None
    ) -> torch.Tensor:
        """(R, d) offsets, (R, P) perturbed vocabulary rows -> (R, G) log-mean shifts of the
        decoded genes (``gene_index``: their vocabulary rows; ``None``: all)."""
        weight, bias = self.to_genes.weight, self.to_genes.bias  # (V, d), (V,)
        columns = torch.arange(weight.shape[0], device=offset.device)  # (G,) vocabulary rows
        if gene_index is not None:
            weight, bias, columns = weight[gene_index], bias[gene_index], gene_index
        own = (genes[:, :, None] == columns[None, None, :]).any(1)  # (R, G): perturbed genes
        shift = torch.addmm(bias, offset, weight.T)  # (R, G)
        return torch.where(own, self.own_gene_shift.to(shift.dtype), shift)
