"""Cells per second: CellPLM (cell tokens) vs a gene-token transformer of scGPT's size, on CPU.

**CellPLM**: the full-size (85M) architecture with random weights, in the official file layout
(:func:`cellplm_scvi.datasets.random_official_checkpoint`: GMVAE, 1024 hidden, 4 Flowformer
layers, 512 latent, 19,374 genes), loaded with :meth:`CellPLM.load_official`; zero-shot
``get_latent_representation`` on ``--n-cells`` cells x 19,374 genes (``--density`` non-zero,
float32 CSR, Poisson(2) + 1), all cells in one tissue. Timed end to end (one warm-up call on
64 cells first); best of ``--repeats`` calls.

**Gene-token model** (scGPT's published whole-human size; Cui et al. 2024, ``scGPT_human``
``args.json``: ``embsize`` 512, ``nheads`` 8, ``d_hid`` 512, ``nlayers`` 12, ``dropout`` 0.2,
``max_seq_len`` 1200, vocabulary 60,697): gene embedding + LayerNorm, continuous value encoder
(Linear(1, 512), ReLU, Linear(512, 512), LayerNorm), summed, ``<cls>`` token prepended (1,201
tokens), then ``torch.nn.TransformerEncoder`` (12 post-norm layers, d_model 512, 8 heads,
feed-forward ``--d-hid``, batch_first), cell embedding = output at ``<cls>``. Random weights,
``eval()`` + ``torch.inference_mode()`` (PyTorch's fused fast path), fp32. ``--gt-cells`` cells
are timed in batches of ``--gt-batch`` after one warm-up batch; cells/s is extrapolated from
that. scGPT's own ``d_hid`` is 512 (a 1x feed-forward, not the usual 4x); ``--also-d-hid 2048``
adds a 4x variant for reference.

Printed: cells/s of each, their ratio (the CellPLM paper reports ~100x over gene-token models
at inference), and the analytic multiply-adds per cell behind it.

Usage::

    python benchmarks/bench_gene_token.py
    python benchmarks/bench_gene_token.py --n-cells 500 --gt-cells 4 --gt-batch 2 --also-d-hid
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    add_common_options,
    counts_adata,
    load_line,
    make_counts,
    official_genes,
    start,
)

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------ gene-token model
def gene_token_model(n_vocab: int, d_model: int, n_heads: int, d_hid: int, n_layers: int):
    import torch
    from torch import nn

    class GeneTokenTransformer(nn.Module):
        """scGPT-like encoder: (gene id, expression value) tokens -> <cls> embedding."""

        def __init__(self):
            super().__init__()
            self.gene = nn.Embedding(n_vocab, d_model)
            self.gene_norm = nn.LayerNorm(d_model)
            self.value = nn.Sequential(
                nn.Linear(1, d_model),
                nn.ReLU(),
                nn.Linear(d_model, d_model),
                nn.LayerNorm(d_model),
            )
            layer = nn.TransformerEncoderLayer(
                d_model, n_heads, d_hid, dropout=0.2, batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

        def forward(self, genes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            h = self.gene_norm(self.gene(genes)) + self.value(values[..., None])
            return self.encoder(h)[:, 0]  # <cls> token

    return GeneTokenTransformer()


def time_gene_token(d_hid: int, n_cells: int, batch: int, seq_len: int, seed: int):
    import torch

    torch.manual_seed(seed)
    n_vocab = 60_697
    model = gene_token_model(n_vocab, 512, 8, d_hid, 12).eval()
    g = torch.Generator().manual_seed(seed)
    L = seq_len + 1  # + <cls>

    def batch_inputs(b):
        genes = torch.randint(0, n_vocab, (b, L), generator=g)
        genes[:, 0] = 0  # <cls> id
        values = torch.randint(0, 51, (b, L), generator=g).float()  # 51 expression bins
        return genes, values

    with torch.inference_mode():
        model(*batch_inputs(batch))  # warm-up batch
        seconds, done = 0.0, 0
        while done < n_cells:
            b = min(batch, n_cells - done)
            inputs = batch_inputs(b)
            t0 = time.perf_counter()
            out = model(*inputs)
            seconds += time.perf_counter() - t0
            done += b
    assert out.shape == (b, 512)
    macs = 12 * L * (4 * 512 * 512 + 2 * 512 * d_hid + 2 * L * 512)  # proj + FFN + QK^T, AV
    return done / seconds, seconds, done, macs


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=2000, help="CellPLM cells (one tissue)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=2, help="CellPLM timed calls")
    parser.add_argument("--gt-cells", type=int, default=16, help="gene-token cells timed")
    parser.add_argument("--gt-batch", type=int, default=8, help="gene-token cells per batch")
    parser.add_argument("--seq-len", type=int, default=1200, help="gene tokens per cell")
    parser.add_argument("--d-hid", type=int, default=512, help="gene-token feed-forward width")
    parser.add_argument(
        "--also-d-hid",
        type=int,
        nargs="?",
        const=2048,
        default=None,
        help="also time this feed-forward width (default 2048 if given)",
    )
    add_common_options(parser)
    args = parser.parse_args()

    start(args)
    import cellplm_scvi as cp

    # ------------------------------------------------------------------ CellPLM
    genes = official_genes()
    X = make_counts(args.n_cells, len(genes), args.density, args.seed)
    adata = counts_adata(X, genes, tissues="all")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "random_85M"
        cp.datasets.random_official_checkpoint(
            prefix, latent="gmvae", n_hidden=1024, n_layers=4, n_latent=512, seed=args.seed
        )
        cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
        model = cp.CellPLM.load_official(prefix, adata)
    n_params = sum(p.numel() for p in model.module.parameters())
    model.get_latent_representation(indices=np.arange(64))  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        z = model.get_latent_representation()
        times.append(time.perf_counter() - t0)
    cellplm_cps = args.n_cells / min(times)
    d = 1024
    nnz_cell = X.nnz / args.n_cells
    cellplm_macs = (
        nnz_cell * d
        + d * d  # embedder: sparse product + extra linear
        + 4 * (4 * d * d + 2 * d * 2 * d)  # 4 Flowformer layers: projections + FFN
        + (d + 16) * 512
        + 512 * 512 * 2  # GMVAE posterior (approx.)
    )
    print(
        f"CellPLM 85M config ({n_params:,} parameters incl. decoder), zero-shot "
        f"get_latent_representation, {args.n_cells:,} cells x {len(genes):,} genes, "
        f"{X.nnz / np.prod(X.shape):.0%} non-zero, one tissue: "
        f"{', '.join(f'{t:.2f}s' for t in times)} -> {cellplm_cps:.0f} cells/s (best); "
        f"~{cellplm_macs / 1e6:.0f} M multiply-adds per cell; z {z.shape}"
    )

    # ------------------------------------------------------------------ gene-token model
    widths = [args.d_hid] + ([args.also_d_hid] if args.also_d_hid else [])
    for d_hid in widths:
        n = args.gt_cells if d_hid == args.d_hid else max(args.gt_batch, args.gt_cells // 2)
        cps, secs, done, macs = time_gene_token(d_hid, n, args.gt_batch, args.seq_len, args.seed)
        print(
            f"gene-token transformer (scGPT size: 12 layers, d_model 512, 8 heads, d_hid "
            f"{d_hid}{' = scGPT' if d_hid == 512 else ''}, {args.seq_len} gene tokens + <cls>, "
            f"fp32, inference_mode): {done} cells in {secs:.2f}s (batches of {args.gt_batch}, "
            f"after a warm-up batch) -> {cps:.2f} cells/s = {1 / cps:.2f} s/cell; "
            f"~{macs / 1e9:.1f} G multiply-adds per cell"
        )
        print(
            f"  ratio CellPLM / gene-token (d_hid {d_hid}): x{cellplm_cps / cps:.0f} cells/s "
            f"(multiply-add ratio x{macs / cellplm_macs:.0f}; paper: ~100x)"
        )
    print(load_line())


if __name__ == "__main__":
    main()
