"""Per-stage CPU time of zero-shot inference: ``cellplm_scvi`` vs the official CellPLM code.

Both models get the **same random weights**: the official ``OmicsFormer`` is built from the
vendored ``20230926_85M`` config (GMVAE, 1024 hidden, 4 Flowformer layers, 19,374 genes, NB
decoder) with ``torch.manual_seed(--seed)``, its state dict is saved in the official file format
and loaded into ours with :meth:`CellPLM.load_official`. The input is one tissue / group of
``--n-cells`` cells x 19,374 genes with ``--density`` non-zeros (float32 CSR, Poisson(2) + 1).
Both run in ``eval()`` under ``torch.inference_mode()``; each stage is timed with
``time.perf_counter`` (median over ``--repeats`` runs after one warm-up).

Stages (ours / official):

- ``input``: ours, the tissue loader reading the rows of the AnnData into a CSR tensor
  (``TissueDataset[rows]``); official, scipy CSR -> coalesced torch COO (what its
  ``TranscriptomicDataset`` does) plus the mask builder's dense ``N x G`` ``input_mask`` of ones
  that its eval forward allocates.
- ``embedder`` (the package's / official module as is), split by hooks into the gene sum
  (``log1p`` + sparse product with the gene-embedding table) and ``extra_linear`` (Linear,
  ReLU, GroupNorm).
- ``encoder``: the 4 Flowformer layers, split into flow attention and feed-forward (the split is
  timed by running the layers' parts separately, and adds up to the whole).
  Ours also times the encoder as ``precision="int8"`` runs it (its Linear layers int8,
  :mod:`cellplm_scvi.nn._int8`), listed apart and not in the total.
- ``pre-latent LN + latent``: LayerNorm and the GMVAE posterior (official: incl. its KL loss and
  Gumbel sampling, which its forward always computes).
- ``decoder``: the NB decoder producing the ``N x 19,374`` mean (not needed for embeddings;
  used by denoising / imputation). The official decoder output is then fed to its objective
  in every forward call, also in eval; that ``objective`` is listed separately.

Usage::

    python benchmarks/experiments/profile_stages.py             # 2000 cells, 10% non-zero
    python benchmarks/experiments/profile_stages.py --n-cells 500 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parents[1]))
from _common import (
    add_common_options,
    counts_adata,
    load_line,
    make_counts,
    official_genes,
    start,
    to_torch_coo,
    write_official_checkpoint,
)

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------ data + models
def build_models(tmp: Path, X: sp.csr_matrix, seed: int):
    """Official OmicsFormer (random weights) + ours loaded from the same official files."""
    import cellplm_scvi as cp

    prefix, official = write_official_checkpoint(tmp, seed)
    genes = official_genes()
    adata = counts_adata(X, genes, tissues="all")
    cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
    ours = cp.CellPLM.load_official(prefix, adata)
    official.eval()
    ours.module.eval()
    return official, ours, adata, genes


# ------------------------------------------------------------------------------ timing helpers
INT8_ENCODER = "  encoder, precision='int8' (Linear layers int8; not in the total)"


class Timer:
    def __init__(self):
        self.times: dict[str, list[float]] = defaultdict(list)

    def __call__(self, name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name].append(time.perf_counter() - t0)
        return out


def run_flowformer_parts(layers, h, t: Timer, batched: bool):
    """Run encoder layers as attention / feed-forward parts, timing each part. Both
    implementations' layers have ``norm1``, ``self_attn``, ``dropout1``, ``norm2`` and
    ``_ff_block``; the official layer takes a leading batch axis (``batched``)."""
    for layer in layers:
        x = h[None] if batched else h

        def attn(x=x, layer=layer):
            return x + layer.dropout1(layer.self_attn(layer.norm1(x)))

        x = t("  encoder: flow attention (+LN, residual)", attn)

        def ff(x=x, layer=layer):
            return x + layer._ff_block(layer.norm2(x))

        x = t("  encoder: feed-forward (+LN, residual)", ff)
        h = x[0] if batched else x
    return h


def timed_embedder(embedder, call, t: Timer):
    """Time the whole embedder and, through hooks on its ``extra_linear``, split it into the
    gene sum (log1p + sparse product; everything before ``extra_linear``) and ``extra_linear``.
    Works on the package's code as it is (no re-implementation)."""
    marks = {}
    hooks = [
        embedder.extra_linear.register_forward_pre_hook(
            lambda m, a: marks.__setitem__("start", time.perf_counter())
        ),
        embedder.extra_linear.register_forward_hook(
            lambda m, a, o: marks.__setitem__("end", time.perf_counter())
        ),
    ]
    try:
        t0 = time.perf_counter()
        h = call()
        t.times["  embedder: gene sum (log1p + sparse product)"].append(marks["start"] - t0)
        t.times["  embedder: extra_linear"].append(marks["end"] - marks["start"])
        t.times["embedder"].append(time.perf_counter() - t0)
    finally:
        for hook in hooks:
            hook.remove()
    return h


def profile_ours(model, t: Timer) -> None:
    import torch

    from cellplm_scvi.data import TissueDataLoader

    module = model.module
    loader = TissueDataLoader(model.adata_manager, batch_size=None)
    rows = next(iter(loader.sampler))
    dataset = loader.dataset
    tensors = t("input (loader: AnnData rows -> CSR tensor)", dataset.__getitem__, rows)
    with torch.inference_mode():
        x = tensors["X"]

        def embed():
            return module.embedder(x, tensors.get("gene_index"), None)  # as in module.inference

        h = timed_embedder(module.embedder, embed, t)

        def encode():
            return run_flowformer_parts(
                module.encoder.layers,
                h,
                t,
                batched=False,
            )

        h2 = t("encoder", encode)
        with module.int8_inference():  # precision="int8" (issue 16): quantized once, cached
            encoder_int8 = module.int8_encoder().quantized
        t(INT8_ENCODER, encoder_int8, h)

        def latent():
            return module.latent(module.pre_latent_norm(h2))

        out = t("pre-latent LN + latent", latent)
        gen_in = module._get_generative_input(tensors, out)
        t("decoder (NB mean, N x G)", module.generative, **gen_in)


def profile_official(model, X: sp.csr_matrix, genes: list[str], t: Timer) -> None:
    import torch

    with torch.inference_mode():
        x_seq = t("input: scipy CSR -> torch COO", lambda: to_torch_coo(X))
        # gene_mask: genes in the loss (pretraining: all); the objective needs it
        xd = {
            "x_seq": x_seq,
            "coord": -torch.ones(X.shape[0], 2),
            "gene_mask": torch.arange(X.shape[1]),
        }
        t("input: mask builder (dense N x G input_mask)", model.mask_model.apply_mask, xd)

        def embed():
            return model.embedder(xd, genes)  # as in OmicsFormer.forward (pipeline gene list)

        xd["h"] = timed_embedder(model.embedder, embed, t)

        def encode():
            return run_flowformer_parts(
                model.encoder.layers,
                xd["h"],
                t,
                batched=True,
            )

        xd["h"] = t("encoder", encode)

        def latent():
            xd["h"] = model.pre_latent_norm(xd)
            return model.latent(xd)

        xd["h"], latent_loss = t("pre-latent LN + latent", latent)
        out = t("decoder (NB mean, N x G)", model.decoder, xd)
        t(
            "objective (NB loss; official eval forward always computes it)",
            model.objective,
            out,
            xd,
        )


def check_layer_api(official) -> None:
    """The official FlowformerLayer must expose the parts we call (norm1, self_attn, ...)."""
    layer = official.encoder.layers[0]
    for name in ("norm1", "self_attn", "dropout1", "norm2", "_ff_block"):
        if not hasattr(layer, name):
            raise RuntimeError(f"official FlowformerLayer has no {name!r}; update the profiler")


def report(title: str, runs: list[Timer]) -> dict[str, float]:
    """Print the median over runs of each stage (parts repeated per layer are summed per run)."""
    keys = list(runs[0].times)
    med = {k: statistics.median(sum(r.times[k]) for r in runs) for k in keys}
    total = sum(v for k, v in med.items() if not k.startswith("  "))
    print(f"{title}: total {total:.3f}s (sum of top-level stages; median of {len(runs)} runs)")
    for k, v in med.items():
        print(f"  {k:<64} {v:8.3f}s  {100 * v / total:5.1f}%")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    add_common_options(parser)
    args = parser.parse_args()

    import torch

    start(args)

    n_genes = len(official_genes())
    X = make_counts(args.n_cells, n_genes, args.density, args.seed)
    print(
        f"input: {args.n_cells:,} cells x {n_genes:,} genes, {X.nnz:,} non-zeros "
        f"({X.nnz / np.prod(X.shape):.1%}), one tissue/group, eval, inference_mode"
    )
    with tempfile.TemporaryDirectory() as tmp:
        official, ours, adata, genes = build_models(Path(tmp), X, args.seed)
    check_layer_api(official)
    print(
        f"parameters: official OmicsFormer {sum(p.numel() for p in official.parameters()):,},"
        f" ours {sum(p.numel() for p in ours.module.parameters()):,} (same weights)"
    )

    # warm-up both (thread pools, first-call allocations), then alternate runs
    profile_ours(ours, Timer())
    profile_official(official, X, genes, Timer())
    runs_ours, runs_off = [], []
    for _ in range(args.repeats):
        runs_ours.append(Timer())
        profile_ours(ours, runs_ours[-1])
        runs_off.append(Timer())
        profile_official(official, X, genes, runs_off[-1])

    # end-to-end check: our get_latent_representation vs official forward (eval)
    t0 = time.perf_counter()
    ours.get_latent_representation()
    t_e2e_ours = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        xd = {
            "x_seq": to_torch_coo(X),
            "coord": -torch.ones(X.shape[0], 2),
            "gene_mask": torch.arange(X.shape[1]),
        }
        official(xd, genes)
        t_e2e_off = time.perf_counter() - t0

    print()
    med_ours = report("ours (cellplm_scvi)", runs_ours)
    print()
    med_off = report("official (CellPLM 0.1.0.post2 OmicsFormer)", runs_off)
    print()
    top = lambda med: sum(v for k, v in med.items() if not k.startswith("  "))  # noqa: E731
    tot_ours, tot_off = top(med_ours), top(med_off)
    emb_ours = sum(med_ours[k] for k in ("embedder", "encoder", "pre-latent LN + latent"))
    emb_off = sum(
        med_off[k]
        for k in (
            "input: mask builder (dense N x G input_mask)",
            "embedder",
            "encoder",
            "pre-latent LN + latent",
        )
    )
    print(
        f"embedding path (embedder + encoder + LN/latent; official + its input_mask): "
        f"ours {emb_ours:.3f}s vs official {emb_off:.3f}s -> x{emb_off / emb_ours:.2f}"
    )
    emb_int8 = emb_ours - med_ours["encoder"] + med_ours[INT8_ENCODER]
    print(
        f"embedding path with precision='int8': ours {emb_int8:.3f}s vs official "
        f"{emb_off:.3f}s -> x{emb_off / emb_int8:.2f} (encoder fp32 {med_ours['encoder']:.3f}s, "
        f"int8 {med_ours[INT8_ENCODER]:.3f}s: x{med_ours['encoder'] / med_ours[INT8_ENCODER]:.2f})"
    )
    print(
        f"all stages: ours {tot_ours:.3f}s vs official {tot_off:.3f}s -> x{tot_off / tot_ours:.2f}"
    )
    print(
        f"end to end, one call: ours get_latent_representation {t_e2e_ours:.3f}s "
        f"({args.n_cells / t_e2e_ours:.0f} cells/s); official full forward in eval "
        f"(with decoder + objective) {t_e2e_off:.3f}s"
    )
    print(load_line())


if __name__ == "__main__":
    main()
