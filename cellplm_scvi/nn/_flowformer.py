"""Flowformer encoder: linear "flow" attention over the cells of one tissue.

Cells are tokens and a tissue is the sequence. Attention is non-causal Flow-Attention
(Wu et al., 2022): sigmoid feature maps, flow conservation, softmax competition over cells and
sigmoid allocation. Cost is O(cells x hidden^2) time and O(cells x hidden) memory; no
cells x cells matrix is ever built. Attribute names follow the official CellPLM state dict.

A packed minibatch (several tissues per step, :class:`~cellplm_scvi.nn.TissueSegments`) runs
every reduction over cells per tissue, so attention never crosses tissues: each tissue's rows
get exactly what a forward pass of that tissue alone would give.

With ``n_local_heads`` and cell positions, that many heads of each layer attend through a
distance-decaying spatial kernel (:mod:`~cellplm_scvi.nn._spatial_kernel`): a cell reads its
neighbourhood there, and the whole tissue in the other heads. Official checkpoints have none.
"""

from __future__ import annotations

import torch
from torch import nn

from ._segments import TissueSegments


class FlowAttention(nn.Module):
    """Multi-head Flow-Attention over a set of ``N`` cells.

    Parameters
    ----------
    n_hidden
        Token width ``d``.
    n_heads
        Number of heads; ``d`` must be divisible by it.
    dropout
        Dropout on the output projection (the official model hard-codes 0.01).
    eps
        Stabiliser added to the flows.
    n_local_heads
        Heads (the first ones) whose scores are multiplied by the spatial kernel when
        ``forward`` gets kernel features; 0: none.
    """

    def __init__(
        self,
        n_hidden: int,
        n_heads: int,
        dropout: float = 0.01,
        eps: float = 1e-6,
        n_local_heads: int = 0,
    ):
        super().__init__()
        if n_hidden % n_heads:
            raise ValueError(f"n_hidden={n_hidden} must be divisible by n_heads={n_heads}.")
        if not 0 <= n_local_heads <= n_heads:
            raise ValueError(
                f"n_local_heads must be in [0, n_heads={n_heads}], got {n_local_heads}."
            )
        self.n_heads = n_heads
        self.n_local_heads = n_local_heads
        self.eps = eps
        self.query_projection = nn.Linear(n_hidden, n_hidden)
        self.key_projection = nn.Linear(n_hidden, n_hidden)
        self.value_projection = nn.Linear(n_hidden, n_hidden)
        self.out_projection = nn.Linear(n_hidden, n_hidden)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        return x.view(n, self.n_heads, d // self.n_heads).transpose(0, 1)  # (H, N, dh)

    def forward(
        self,
        x: torch.Tensor,
        tissues: TissueSegments | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, d) -> (N, d); with ``tissues``, each tissue's rows attend to that tissue only;
        with ``spatial`` ((N, M) kernel features), the local heads through the kernel."""
        n, d = x.shape
        eps = self.eps
        q, k, v = self._project(x)  # 3 x (N, d)
        q = torch.sigmoid(self._heads(q))  # (H, N, dh), non-negative
        k = torch.sigmoid(self._heads(k))  # (H, N, dh)
        v = self._heads(v)  # (H, N, dh)
        # the flows sum over N cells (about N * dh / 4): float16 overflows from ~4k cells, so
        # this part (a few % of the layer's FLOPs) runs in float32 under autocast
        dtype = v.dtype
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            if spatial is None or not self.n_local_heads:
                out = self._attend(q, k, v, tissues, eps).to(dtype)
            else:  # local heads on (dh * M)-wide features: score * psi_i . psi_j
                lh = self.n_local_heads
                q_local, k_local = self._through_kernel(q[:lh], k[:lh], spatial=spatial)
                local = self._attend(q_local, k_local, v[:lh], tissues, eps)
                rest = self._attend(q[lh:], k[lh:], v[lh:], tissues, eps)
                out = torch.cat([local, rest]).to(dtype)
        out = out.transpose(0, 1).reshape(n, d)  # (N, d)
        return self.dropout(self.out_projection(out))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, d) -> queries, keys and values, (N, d) each."""
        return self.query_projection(x), self.key_projection(x), self.value_projection(x)

    def _attend(self, q, k, v, tissues: TissueSegments | None, eps: float) -> torch.Tensor:
        """Flow-Attention of (H, N, D) queries/keys and (H, N, dh) values -> (H, N, dh)."""
        if tissues is not None:
            return tissues.unpad(self._packed_flow(q, k, v, tissues, eps))
        sums, sink_in = self.flow_sums(q, k, v, q.shape[1], eps)
        return self.sink_flow(q, sums, eps, sink_in)

    @staticmethod
    def _through_kernel(*features: torch.Tensor, spatial: torch.Tensor) -> list[torch.Tensor]:
        """(h, N, dh) queries or keys of the local heads -> (h, N, dh * M): each times its
        cell's (N, M) kernel features, so that their products carry ``psi_i . psi_j``."""
        psi = spatial.float()[None, :, None, :]  # (1, N, 1, M)
        return [(f[..., None] * psi).flatten(-2) for f in features]

    @staticmethod
    def _flow(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, eps: float):
        """Flow-Attention of one tissue: (H, N, D) queries and keys, (H, N, dh) values ->
        (H, N, dh)."""
        sums, sink_in = FlowAttention.flow_sums(q, k, v, n, eps)
        return FlowAttention.sink_flow(q, sums, eps, sink_in)

    @staticmethod
    def flow_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, eps: float):
        """What every sink (query) reads from the whole tissue: ``k.sum`` (H, D), the conserved
        key flow ``(k * source_out).sum`` (H, D) and the competition-weighted ``kv`` (H, D, dh);
        and, beside these sums, the sinks' incoming flow (H, N) that :meth:`sink_flow` would
        otherwise compute again.
        """
        # incoming flow of each sink and outgoing flow of each source (key): (H, N)
        sink_in = 1.0 / torch.einsum("hnd,hd->hn", q + eps, k.sum(1) + eps)
        source_out = 1.0 / torch.einsum("hnd,hd->hn", k + eps, q.sum(1) + eps)
        # conservation: a source's flow re-measured after normalising the sinks: (H, N)
        conserved_source = torch.einsum(
            "hnd,hd->hn", k + eps, (q * sink_in[..., None]).sum(1) + eps
        )
        # competition: softmax over the N source cells
        competition = torch.softmax(conserved_source.clamp(-1.0, 1.0), dim=-1) * n
        kv = torch.einsum("hnd,hnm->hdm", k, v * competition[..., None])  # (H, D, dh)
        return (k.sum(1), (k * source_out[..., None]).sum(1), kv), sink_in

    @staticmethod
    def sink_flow(
        q: torch.Tensor, sums: tuple, eps: float, sink_in: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(H, R, D) queries of R sinks -> (H, R, dh), given their tissue's :meth:`flow_sums`
        (and their incoming flow (H, R), if already known)."""
        k_sum, k_conserved, kv = sums
        if sink_in is None:
            sink_in = 1.0 / torch.einsum("hnd,hd->hn", q + eps, k_sum + eps)  # (H, R)
        # allocation: a sink's flow re-measured after normalising the sources (official:
        # times N_q / N_k, which is 1 here)
        allocation = torch.sigmoid(torch.einsum("hnd,hd->hn", q + eps, k_conserved + eps))
        return torch.einsum("hnd,hdm->hnm", q * sink_in[..., None], kv) * allocation[..., None]

    def attend_rows(
        self, x: torch.Tensor, sums: list[tuple], spatial: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(R, d) -> (R, d): :meth:`forward` (evaluation) of R rows of one tissue, given the
        :meth:`flow_sums` of each ``_flow`` call of a pass over the whole tissue (one; with
        local heads and ``spatial``, (R, M), two: the local heads', then the others')."""
        r, d = x.shape
        q = torch.sigmoid(self._heads(self.query_projection(x))).float()  # (H, R, dh)
        if len(sums) == 1:
            out = self.sink_flow(q, sums[0], self.eps)
        else:
            lh = self.n_local_heads
            (q_local,) = self._through_kernel(q[:lh], spatial=spatial)  # (lh, R, dh * M)
            local = self.sink_flow(q_local, sums[0], self.eps)
            out = torch.cat([local, self.sink_flow(q[lh:], sums[1], self.eps)])
        return self.out_projection(out.transpose(0, 1).reshape(r, d))

    @staticmethod
    def _packed_flow(q, k, v, tissues: TissueSegments, eps: float) -> torch.Tensor:
        """:meth:`_flow` of each tissue: (H, N, dh) -> padded (H, T, n_max, dh).

        The rows are laid out as (T, n_max) with zeros past each tissue's end (q = k = 0
        there, and their flows are zeroed), so every sum over cells is a sum over one
        tissue's cells; the softmax competition runs over one tissue's sources (pads at
        -inf) and is scaled by that tissue's size.
        """
        q, k, v = tissues.pad(q), tissues.pad(k), tissues.pad(v)  # (H, T, n, dh)
        valid = tissues.valid()  # (T, n)
        sink_in = 1.0 / torch.einsum("htnd,htd->htn", q + eps, k.sum(2) + eps) * valid
        source_out = 1.0 / torch.einsum("htnd,htd->htn", k + eps, q.sum(2) + eps) * valid
        conserved_sink = torch.einsum(
            "htnd,htd->htn", q + eps, (k * source_out[..., None]).sum(2) + eps
        )
        conserved_source = torch.einsum(
            "htnd,htd->htn", k + eps, (q * sink_in[..., None]).sum(2) + eps
        )
        conserved_source = conserved_source.clamp(-1.0, 1.0).masked_fill(~valid, -torch.inf)
        allocation = torch.sigmoid(conserved_sink)
        n = tissues.counts.to(q.dtype)[:, None]  # (T, 1)
        competition = torch.softmax(conserved_source, dim=-1) * n  # (H, T, n), 0 at pads

        kv = torch.einsum("htnd,htnm->htdm", k, v * competition[..., None])  # (H, T, dh, dh)
        return torch.einsum("htnd,htdm->htnm", q * sink_in[..., None], kv) * allocation[..., None]


class FlowformerLayer(nn.Module):
    """Pre-LayerNorm transformer block with Flow-Attention and a GELU feed-forward (x2)."""

    def __init__(self, n_hidden: int, n_heads: int, dropout: float, n_local_heads: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(n_hidden)
        self.self_attn = FlowAttention(n_hidden, n_heads, n_local_heads=n_local_heads)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(n_hidden)
        self._ff_block = nn.Sequential(
            nn.Linear(n_hidden, 2 * n_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * n_hidden, n_hidden),
            nn.Dropout(dropout),
        )

    def forward(
        self,
        x: torch.Tensor,
        tissues: TissueSegments | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, d) -> (N, d)."""
        x = x + self.dropout1(self.self_attn(self.norm1(x), tissues, spatial))
        return x + self._ff_block(self.norm2(x))

    def forward_rows(
        self, x: torch.Tensor, sums: list[tuple], spatial: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(R, d) -> (R, d): :meth:`forward` of R rows of a tissue, given the attention's
        sums of a pass over the whole tissue (:meth:`FlowAttention.attend_rows`)."""
        x = x + self.dropout1(self.self_attn.attend_rows(self.norm1(x), sums, spatial))
        return x + self._ff_block(self.norm2(x))


class FlowformerEncoder(nn.Module):
    """A stack of :class:`FlowformerLayer` (no final norm: the model's pre-latent norm follows)."""

    def __init__(
        self, n_hidden: int, n_layers: int, n_heads: int, dropout: float, n_local_heads: int = 0
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            FlowformerLayer(n_hidden, n_heads, dropout, n_local_heads) for _ in range(n_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        tissues: TissueSegments | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, d) -> (N, d): every cell attends to every other cell of its tissue (one tissue,
        or each of the packed ``tissues``); with ``spatial`` kernel features, the local heads
        weigh them by distance."""
        for layer in self.layers:
            x = layer(x, tissues, spatial)
        return x

    def forward_rows(
        self, x: torch.Tensor, sums: list[list[tuple]], spatial: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(R, d) -> (R, d): :meth:`forward` of R rows of one tissue, reading the rest of it
        through each layer's attention ``sums`` of a pass over the whole tissue."""
        for layer, layer_sums in zip(self.layers, sums, strict=True):
            x = layer.forward_rows(x, layer_sums, spatial)
        return x
