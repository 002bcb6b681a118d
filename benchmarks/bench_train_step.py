"""One training step (forward + backward) of the full-size CellPLM: ours vs the official code.

Both models hold the **same random weights**: the official ``OmicsFormer`` is built from the
vendored ``20230926_85M`` config (GMVAE, 1024 hidden, 4 Flowformer layers, 19,374 genes, NB
decoder with batch/dataset tables, ``model_dropout`` 0.2, ``mask_node_rate`` 0.75,
``mask_feature_rate`` 0.25, ``dae=True``) with ``torch.manual_seed(--seed)``; its state dict is
saved in the official file format and loaded into ours with :meth:`CellPLM.load_official`.
The official config's node drop (``drop_node_rate`` 0.3) is off (the injected mask replaces the
official mask builder, node drop included) so that both process the same ``--n-cells`` cells;
our node drop lives in the data loader and is not used here.

Input: one tissue of ``--n-cells`` cells x 19,374 genes with ``--density`` non-zeros
(float32 CSR, Poisson(2) + 1).

- **ours**: ``tensors`` = the minibatch of our ``TissueDataLoader`` (the whole tissue);
  ``model.module.train()``; ``inference, generative, loss_output = module(tensors)``;
  ``loss_output.loss.backward()`` (masked NB loss + DAE term + GMVAE loss).
- **official**: ``x_dict = {"x_seq": coalesced torch COO, "coord": -1, "gene_mask": all
  genes}`` (the pretraining layout, spec section 1.1/3.1); ``model.train()``;
  ``out_dict, loss = model(x_dict)``; ``loss.backward()``.

Both sides get **the same mask** at each step (drawn once per step with ``sample_mask``, handed to
ours by replacing ``cellplm_scvi.module._cellplm.sample_mask`` and to the official model by
replacing its mask builder's ``apply_mask``, which then applies it with the official
``simple_mask``) and the same torch seed (``--seed + step``) just before the forward pass, so the
dropout, Gumbel and reparameterisation draws agree too: the printed losses must agree (their
largest relative difference is printed; ``tests/test_official_training_parity.py`` checks
it). Gradients are reset (``set_to_none``) before each step. One warm-up step each, then
``--steps`` steps alternating ours / official; reported: median seconds per step (forward,
backward, total), the ratio, and the peak RSS above the RSS before the step (VmHWM reset before
each step).
``--profile`` also prints the top operators of one step of each (``torch.profiler``, self CPU
time).

Usage::

    python benchmarks/bench_train_step.py
    python benchmarks/bench_train_step.py --n-cells 200 --steps 1 --profile
"""

from __future__ import annotations

import argparse
import statistics
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
    peak_mb,
    reset_peak,
    rss_mb,
    start,
    to_torch_coo,
    trim_heap,
    write_official_checkpoint,
)

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=1000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--profile", action="store_true", help="print top operators")
    add_common_options(parser)
    args = parser.parse_args()

    import torch

    start(args)
    from CellPLM.utils.sparse import simple_mask

    import cellplm_scvi as cp
    import cellplm_scvi.module._cellplm as module_impl
    from cellplm_scvi.data import TissueDataLoader
    from cellplm_scvi.module._masking import sample_mask

    genes = official_genes()
    X = make_counts(args.n_cells, len(genes), args.density, args.seed)
    adata = counts_adata(X, genes, tissues="all")
    cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
    with tempfile.TemporaryDirectory() as tmp:
        # the official model without its node drop (see the module docstring)
        prefix, official = write_official_checkpoint(tmp, args.seed, drop_node_rate=0.0)
        model = cp.CellPLM.load_official(prefix, adata)
    module = model.module
    tensors = next(iter(TissueDataLoader(model.adata_manager, batch_size=None)))
    x_seq = to_torch_coo(X)
    n_ours = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_off = sum(p.numel() for p in official.parameters() if p.requires_grad)
    print(
        f"input: one tissue of {args.n_cells:,} cells x {len(genes):,} genes, {X.nnz:,} "
        f"non-zeros ({X.nnz / np.prod(X.shape):.1%}); trainable parameters ours {n_ours:,}, "
        f"official {n_off:,}; mask_cell_rate {module.mask_cell_rate}, mask_gene_rate "
        f"{module.mask_gene_rate}, dae {module.dae}; node drop off on both sides; the same "
        "mask and seed on both sides"
    )

    masks = {}

    def mask_of_step(i):
        """The (cells x genes) mask of step ``i``, shared by both models."""
        if i not in masks:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(10_000 + i)
            mask = sample_mask(
                args.n_cells, len(genes), module.mask_cell_rate, module.mask_gene_rate, "cpu"
            )
            torch.random.set_rng_state(gen_state)
            dense = torch.zeros(args.n_cells, len(genes), dtype=torch.bool)
            dense[mask.cells] = mask.entries
            masks[i] = (mask, dense)
        return masks[i]

    def step_ours(i):
        mask, _ = mask_of_step(i)
        module_impl.sample_mask = lambda *a, **k: mask  # the module's module-level name
        module.zero_grad(set_to_none=True)
        torch.manual_seed(args.seed + i)
        t0 = time.perf_counter()
        _, _, out = module(tensors)
        t1 = time.perf_counter()
        out.loss.backward()
        return t1 - t0, time.perf_counter() - t1, out.loss.item()

    def step_official(i):
        _, dense = mask_of_step(i)

        def apply_mask(x_dict):
            x_dict["masked_x_seq"] = simple_mask(x_dict["x_seq"].coalesce(), dense)
            x_dict["input_mask"] = dense.int()
            return x_dict

        official.mask_model.apply_mask = apply_mask
        official.zero_grad(set_to_none=True)
        torch.manual_seed(args.seed + i)
        x_dict = {
            "x_seq": x_seq,
            "coord": -torch.ones(args.n_cells, 2),
            "gene_mask": torch.arange(len(genes)),
        }
        t0 = time.perf_counter()
        _, loss = official(x_dict)
        t1 = time.perf_counter()
        loss.backward()
        return t1 - t0, time.perf_counter() - t1, loss.item()

    module.train()
    official.train()
    runs = {"ours": [], "official": []}
    peaks = {"ours": [], "official": []}
    steps = {"ours": step_ours, "official": step_official}
    for name in steps:  # warm-up
        steps[name](1000)
    for i in range(args.steps):
        for name, fn in steps.items():
            trim_heap()
            reset_peak()
            base = rss_mb()
            fwd, bwd, loss = fn(i)
            peaks[name].append((peak_mb() - base, base))
            runs[name].append((fwd, bwd, loss))
    print(f"{args.steps} timed steps each after one warm-up step (alternating):")
    med = {}
    for name in steps:
        fwd = statistics.median(r[0] for r in runs[name])
        bwd = statistics.median(r[1] for r in runs[name])
        tot = statistics.median(r[0] + r[1] for r in runs[name])
        med[name] = tot
        extra, base = max(peaks[name])
        print(
            f"  {name:<9} forward {fwd:6.2f}s  backward {bwd:6.2f}s  step {tot:6.2f}s "
            f"(all steps: {', '.join(f'{r[0] + r[1]:.2f}' for r in runs[name])}) | peak RSS "
            f"+{extra:.0f} MB over {base:.0f} MB | losses "
            f"{', '.join(f'{r[2]:.4g}' for r in runs[name])}"
        )
    loss_diff = max(
        abs(ours[2] / theirs[2] - 1) for ours, theirs in zip(runs["ours"], runs["official"])
    )
    print(f"same masks and seeds: largest relative loss difference {loss_diff:.1e}")
    ratio = med["official"] / med["ours"]
    print(
        f"speed-up ours vs official: x{ratio:.2f} per step (target >= 1.5: "
        f"{'met' if ratio >= 1.5 else 'NOT met'}); {args.n_cells / med['ours']:.0f} vs "
        f"{args.n_cells / med['official']:.0f} cells/s"
    )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn(99)
            print(f"\n{name}: top operators of one step by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(load_line())


if __name__ == "__main__":
    main()
