"""Cell tokens: expression-weighted sums of learned gene embeddings (+ optional spatial PE)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_2d_table(n_hidden: int, grid: int = 100) -> torch.Tensor:
    """The official ``Sinusoidal2dPE`` table, shape ``(grid * grid, n_hidden)``.

    Row ``r = grid * i + j`` encodes x-bin ``i`` in the second half of the channels and
    y-bin ``j`` in the first half, with sin/cos pairs at ``n_hidden / 4`` frequencies.
    """
    if n_hidden % 4:
        raise ValueError(f"The spatial encoding needs n_hidden divisible by 4, got {n_hidden}.")
    half = n_hidden // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))  # (half / 2,)
    pos = torch.arange(float(grid))[:, None] * freq  # (grid, half / 2)
    wave = torch.stack([pos.sin(), pos.cos()], dim=-1).flatten(1)  # (grid, half): sin, cos, ...
    i, j = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([wave[j.flatten()], wave[i.flatten()]], dim=1)  # (grid^2, n_hidden)


class Sinusoidal2dPE(nn.Module):
    """Fixed 2-D sinusoidal encoding of coordinates in ``[0, 1]`` (binned on a 100 x 100 grid).

    Cells without coordinates (a NaN row) get the learned ``missing_pe`` vector.
    """

    def __init__(self, n_hidden: int, grid: int = 100):
        super().__init__()
        self.grid = grid
        self.missing_pe = nn.Parameter(torch.randn(n_hidden) * 0.01)
        self.pe_enc = nn.Embedding.from_pretrained(sinusoidal_2d_table(n_hidden, grid))  # frozen

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """(N, 2) coordinates scaled to [0, 1] -> (N, n_hidden)."""
        missing = coords.isnan().any(1)
        bins = ((coords.nan_to_num(0.0) * 1.02 - 0.01) * self.grid).long().clamp(0, self.grid - 1)
        pe = self.pe_enc(bins[:, 0] * self.grid + bins[:, 1])
        return torch.where(missing[:, None], self.missing_pe.expand_as(pe), pe)


class GeneEmbedding(nn.Module):
    """The gene-embedding table ``E`` (vocabulary x n_hidden): the model's tokenizer."""

    def __init__(self, n_vocab: int, n_hidden: int):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(n_vocab, n_hidden) * 0.005)


_BLOCK = 32  # embedding columns per gather pass (128 bytes; fastest of 16-1024 on AVX2)


def _gather_rows(emb: torch.Tensor, gene_index: torch.Tensor) -> torch.Tensor:
    """Rows of ``emb`` for each input gene; zero rows where ``gene_index`` is -1."""
    table = emb[gene_index.clamp(min=0)]
    return table * (gene_index >= 0)[:, None].to(table.dtype)


def _sparse_token(
    x: torch.Tensor, emb: torch.Tensor, gene_index: torch.Tensor | None
) -> torch.Tensor:
    """``log1p(x) @ emb[gene_index]`` for a CSR ``x`` (N, G_in) -> (N, d).

    Computed as weighted ``embedding_bag`` sums over each cell's non-zero genes: several times
    faster than torch's CSR x dense product on CPU, and without gathering a (G_in, d) table.
    At inference on CPU, 32 embedding columns are gathered at a time (cache-friendly); in
    training (each call's backward sorts the indices again) and on GPUs one call is used.
    """
    crow, genes = x.crow_indices(), x.col_indices()
    weights = torch.log1p(x.values().float())
    if gene_index is not None:
        genes = gene_index[genes]
        weights = weights * (genes >= 0).to(weights.dtype)  # genes outside the vocabulary
        genes = genes.clamp(min=0)
    offsets = crow[:-1].to(genes.dtype)  # int32 or int64 CSR indices; both must match
    if (torch.is_grad_enabled() and emb.requires_grad) or emb.device.type != "cpu":
        return nn.functional.embedding_bag(
            genes, emb, offsets, mode="sum", per_sample_weights=weights
        )
    blocks = [  # column blocks of E stay in cache while the cells' genes are gathered
        nn.functional.embedding_bag(
            genes,
            emb[:, i : i + _BLOCK].contiguous(),
            offsets,
            mode="sum",
            per_sample_weights=weights,
        )
        for i in range(0, emb.shape[1], _BLOCK)
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


class CellEmbedder(nn.Module):
    """Cell token ``h0 = GroupNorm(Dropout(ReLU(W (log1p(x) @ E[genes]) + b)))``.

    Parameters
    ----------
    n_vocab
        Number of genes in the vocabulary (rows of ``E``).
    n_hidden
        Token width.
    dropout
        Dropout after the ReLU.
    """

    def __init__(self, n_vocab: int, n_hidden: int, dropout: float):
        super().__init__()
        self.feat_enc = GeneEmbedding(n_vocab, n_hidden)
        self.pe_enc = Sinusoidal2dPE(n_hidden)
        self.extra_linear = nn.Sequential(
            nn.Linear(n_hidden, n_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.GroupNorm(4, n_hidden),
        )

    def forward(
        self,
        x: torch.Tensor,
        gene_index: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed one tissue.

        Parameters
        ----------
        x
            Raw counts, (N, G_in), sparse CSR (preferred) or dense.
        gene_index
            (G_in,) vocabulary row of each input column, ``-1`` for a gene outside the
            vocabulary (it contributes nothing), or ``None`` when the columns are the vocabulary.
        coords
            (N, 2) coordinates in [0, 1] (NaN rows: missing) to add the spatial encoding, or
            ``None`` for no encoding (as in the official checkpoints).
        """
        emb = self.feat_enc.emb
        with torch.autocast(x.device.type, enabled=False):  # the gene sum stays float32
            if x.layout == torch.sparse_csr:
                h = _sparse_token(x, emb, gene_index)
            else:  # dense input: the same sum as a matrix product
                table = emb if gene_index is None else _gather_rows(emb, gene_index)
                h = torch.log1p(x.float()) @ table
        if coords is not None:
            h = h + self.pe_enc(coords)
        return self.extra_linear(h)
