"""Negative-binomial MLP decoder with batch/dataset covariate embeddings."""

from __future__ import annotations

import torch
from torch import nn

MEAN_FLOOR = 1e-5  # the official NB head clamps its means to [MEAN_FLOOR, 1e6]


class NBHead(nn.Module):
    """NB mean and per-gene dispersion: ``mean = clamp(exp(W relu(W1 x)), 1e-5, 1e6)``."""

    def __init__(self, n_hidden: int, n_genes: int, n_head_hidden: int = 128):
        super().__init__()
        self.dec_1 = nn.Linear(n_hidden, n_head_hidden)
        self.dec_mean = nn.Sequential(nn.Linear(n_head_hidden, n_genes))
        self.dec_disp = nn.Parameter(torch.randn(n_genes))  # log-dispersion per gene

    def forward(
        self, x: torch.Tensor, gene_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d) -> mean (N, G) and dispersion (G,), restricted to ``gene_index`` if given."""
        e = torch.relu(self.dec_1(x))
        out = self.dec_mean[0]
        weight, bias, log_disp = out.weight, out.bias, self.dec_disp
        if gene_index is not None:  # compute only the genes we need
            weight, bias, log_disp = weight[gene_index], bias[gene_index], log_disp[gene_index]
        logits = torch.addmm(bias, e, weight.T)
        if logits.dtype == torch.float16:  # exp overflows float16 (max 65504) from logits ~11
            logits = logits.float()
        mean = logits.exp().clamp(MEAN_FLOOR, 1e6)
        return mean, log_disp.exp().clamp(1e-4, 1e4)


def _covariate_block(n_levels: int, n_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Embedding(n_levels, n_hidden), nn.PReLU(), nn.GroupNorm(4, n_hidden))


class NBDecoder(nn.Module):
    """``z -> [Linear, PReLU, Dropout, GroupNorm] (+ covariate embeddings) -> NBHead``.

    Parameters
    ----------
    n_latent
        Input width.
    n_hidden
        Hidden width.
    n_genes
        Output genes (the vocabulary).
    n_layers
        Number of layers counting the output head (official ``dec_layers``; 2 = one hidden).
    dropout
        Dropout of the hidden layers.
    covariates
        Number of levels per covariate name, e.g. ``{"batch": 3}``. A covariate whose index is
        not passed at forward time uses the sum of all its embeddings (official behaviour for
        unseen data; it acts as the mean embedding because GroupNorm is scale invariant).
    """

    def __init__(
        self,
        n_latent: int,
        n_hidden: int,
        n_genes: int,
        n_layers: int = 2,
        dropout: float = 0.0,
        covariates: dict[str, int] | None = None,
    ):
        super().__init__()
        covariates = {k: v for k, v in (covariates or {}).items() if v > 0}
        self.layers = nn.ModuleList()
        self.covariate_layers = nn.ModuleList()
        for i in range(n_layers - 1):
            n_in = n_latent if i == 0 else n_hidden
            self.layers.append(
                nn.Sequential(
                    nn.Linear(n_in, n_hidden),
                    nn.PReLU(),
                    nn.Dropout(dropout),
                    nn.GroupNorm(4, n_hidden),
                )
            )
            if covariates:
                self.covariate_layers.append(
                    nn.ModuleDict(
                        {k: _covariate_block(v, n_hidden) for k, v in covariates.items()}
                    )
                )
        self.out_layer = NBHead(n_hidden, n_genes)

    def forward(
        self,
        z: torch.Tensor,
        covariate_index: dict[str, torch.Tensor] | None = None,
        gene_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, n_latent) -> NB mean (N, G) and dispersion (G,)."""
        covariate_index = covariate_index or {}
        x = z
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if not self.covariate_layers:
                continue
            for name, (embedding, act, norm) in self.covariate_layers[i].items():
                if name in covariate_index:
                    x = x + norm(act(embedding(covariate_index[name])))
                else:
                    x = x + norm(act(embedding.weight.detach().sum(0, keepdim=True)))
        return self.out_layer(x, gene_index)
