"""CPU benchmark: official CellPLM embedding pipeline vs ``cellplm_scvi`` on the 85M config.

Builds the official ``20230926_85M`` architecture (GMVAE, or with ``--latent vae`` the plain
VAE of ``20231027_85M``; 19,374 genes) with random weights, writes an official-format
checkpoint (``<prefix>.config.json`` + ``<prefix>.best.ckpt``) into a temporary directory and,
in the same process, times

(a) the official ``CellEmbeddingPipeline(...).predict(adata, device="cpu")`` (the whole matrix as
    one group, one chunk; warm-up on 64 cells first), as in the spec's section 6 recipe;
(b) ours: ``CellPLM.setup_anndata(adata, tissue_key=<constant column>)`` +
    ``CellPLM.load_official(prefix, adata)`` + ``get_latent_representation()`` (all cells in one
    tissue, i.e. the same attention context as the official call);
(c) ours with ``get_latent_representation(precision="int8")`` (the encoder's Linear layers int8,
    issue 16; quantized in the warm-up call, whose time is printed apart);
(d) the same without the float32 refinement of the GMVAE's near-tied cells
    (``INT8_TIE_MARGIN = 0``, see ``cellplm_scvi/nn/_int8.py``): its cost and accuracy gain.

The four calls alternate within each of ``--repeats`` rounds (the machine is shared: alternating
spreads the load over all four); the speed-ups are ratios of the medians.

Peak RSS increase per call: freed heap is returned to the OS (``malloc_trim``) and VmHWM is
reset (``5`` -> ``/proc/self/clear_refs``) before each measured call; the increase is VmHWM after
the call minus VmRSS before it. Our timings run under ``torch.inference_mode()``; the official
predict runs under ``torch.no_grad()`` (it fails under inference mode with more than one thread,
see ``main``). Weights are random, so the embeddings are meaningless; speed and memory do not
depend on them.

Usage::

    python benchmarks/bench_official_embedding.py --n-cells 2000 --density 0.1 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    add_common_options,
    counts_adata,
    load_line,
    make_counts,
    peak_mb,
    reset_peak,
    rss_mb,
    start,
    to_torch_coo,
    trim_heap,
    write_official_checkpoint,
)

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------------ memory


def measure(fn, inference_mode: bool = True):
    """Run ``fn`` once (under inference mode, else no_grad); return (result, s, peak MB)."""
    trim_heap()
    reset_peak()
    base = rss_mb()
    t0 = time.perf_counter()
    with torch.inference_mode() if inference_mode else torch.no_grad():
        out = fn()
    dt = time.perf_counter() - t0
    return out, dt, peak_mb() - base


# ------------------------------------------------------------------------------------ stages


def our_stages(module, X: sp.csr_matrix) -> dict[str, float]:
    """Seconds per stage of our module on one tissue (inference mode, eval)."""
    from cellplm_scvi.data._tissue_loader import _to_csr_tensor

    times = {}
    module.eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        x = _to_csr_tensor(X)  # what the tissue loader hands the module
        times["scipy->torch CSR"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        h = module.embedder(x, None, None)  # vocabulary columns (no gene index), as inference
        times["embedder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        h = module.encoder(h)
        times["encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        h = module.pre_latent_norm(h)
        times["pre-latent LN"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        module.latent(h)
        times["latent"] = time.perf_counter() - t0
    return times


def official_stages(model, X: sp.csr_matrix, genes: list[str]) -> dict[str, float]:
    """Seconds per stage of the official model (same input, eval, no_grad; latent incl. its
    loss)."""
    times = {}
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        xd = {"x_seq": to_torch_coo(X), "coord": -torch.ones(X.shape[0], 2)}
        times["scipy->torch COO"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        xd["h"] = model.embedder(xd, genes)
        times["embedder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        xd["h"] = model.encoder(xd)["hidden"]
        times["encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        xd["h"] = model.pre_latent_norm(xd)
        times["pre-latent LN"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.latent(xd)
        times["latent"] = time.perf_counter() - t0
    return times


def print_stages(title: str, times: dict[str, float]) -> None:
    total = sum(times.values())
    print(f"{title}: total {total:.2f}s")
    for name, t in times.items():
        print(f"  {name:<18} {t:7.3f}s  {100 * t / total:5.1f}%")


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--latent",
        choices=("gmvae", "vae"),
        default="gmvae",
        help="gmvae: the vendored 20230926_85M config; vae: its latent swapped for the plain VAE "
        "of 20231027_85M (no GMVAE tie refinement in int8)",
    )
    add_common_options(parser)
    args = parser.parse_args()
    start(args)

    from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline
    from CellPLM.utils import set_seed

    import cellplm_scvi as cp
    from cellplm_scvi.nn import _int8

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        prefix, official_model = write_official_checkpoint(tmp, args.seed, args.latent)
        n_official = sum(p.numel() for p in official_model.parameters())
        del official_model
        size_mb = (tmp / "20230926_85M.best.ckpt").stat().st_size / 2**20
        print(
            f"checkpoint: {n_official:,} numbers, {size_mb:.0f} MB, "
            f"written in {time.perf_counter() - t0:.1f}s"
        )
        genes = json.loads((tmp / "20230926_85M.config.json").read_text())["gene_list"]
        X = make_counts(args.n_cells, len(genes), args.density, args.seed)
        print(
            f"data: {args.n_cells} x {len(genes)} CSR float32, {X.nnz:,} non-zeros "
            f"({X.nnz / np.prod(X.shape):.1%}), one group/tissue"
        )
        gc.collect()

        # ---------------------------------------------------------------- (a) official
        set_seed(42, cuda=False)
        t0 = time.perf_counter()
        quiet = contextlib.redirect_stdout(io.StringIO())
        pipe = CellEmbeddingPipeline(pretrain_prefix="20230926_85M", pretrain_directory=str(tmp))
        t_load_off = time.perf_counter() - t0
        adata_off = counts_adata(X, genes)
        # The official predict cannot run under torch.inference_mode() with >1 thread: its
        # sparse index_select fails ("Inplace update to inference tensor outside
        # InferenceMode"), so it runs under no_grad (which it also sets itself).
        with quiet, torch.no_grad():
            pipe.predict(adata_off[:64].copy(), device="cpu")  # warm-up
        official = lambda: pipe.predict(adata_off, device="cpu")  # noqa: E731

        # ---------------------------------------------------------------- (b, c) ours
        warm = counts_adata(X[:64].copy(), genes, tissues="all")
        cp.CellPLM.setup_anndata(warm, tissue_key="tissue")
        cp.CellPLM.load_official(prefix, warm).get_latent_representation()  # warm-up

        adata = counts_adata(X, genes, tissues="all")  # one tissue = one official group
        t0 = time.perf_counter()
        cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
        t_setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = cp.CellPLM.load_official(prefix, adata)
        t_load_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        with model.module.int8_inference():  # quantizes the encoder (once per model)
            pass
        t_quantize = time.perf_counter() - t0

        # ---------------------------------------------------------------- alternating runs
        def int8_unrefined():
            margin, _int8.INT8_TIE_MARGIN = _int8.INT8_TIE_MARGIN, 0.0
            try:
                return model.get_latent_representation(precision="int8")
            finally:
                _int8.INT8_TIE_MARGIN = margin

        calls = {
            "official predict": (official, False),
            "ours get_latent_representation": (model.get_latent_representation, True),
            "ours precision='int8'": (
                lambda: model.get_latent_representation(precision="int8"),
                True,
            ),
            "ours int8, no tie refinement": (int8_unrefined, True),
        }
        times = {name: [] for name in calls}
        peaks = {name: [] for name in calls}
        results = {}
        for _ in range(args.repeats):
            for name, (fn, inference_mode) in calls.items():
                with contextlib.redirect_stdout(io.StringIO()):
                    results[name], dt, peak = measure(fn, inference_mode=inference_mode)
                times[name].append(dt)
                peaks[name].append(peak)
        emb_off = results["official predict"].numpy()
        emb, emb_int8 = results["ours get_latent_representation"], results["ours precision='int8'"]
        off_times, our_times, int8_times, _ = times.values()
        off_peaks, our_peaks = peaks["official predict"], peaks["ours get_latent_representation"]

        # ---------------------------------------------------------------- report
        n = args.n_cells
        print(
            f"\nload: official pipeline {t_load_off:.2f}s "
            f"({sum(p.numel() for p in pipe.model.parameters()):,} params, no decoder); "
            f"ours setup_anndata {t_setup:.2f}s + load_official {t_load_ours:.2f}s "
            f"({sum(p.numel() for p in model.module.parameters()):,} params)"
        )
        print(f"RSS now {rss_mb():.0f} MB (both models loaded)")
        for name in calls:
            runs = ", ".join(
                f"{t:.2f}s ({n / t:.0f} cells/s, +{p:.0f} MB)"
                for t, p in zip(times[name], peaks[name])
            )
            print(f"{name}: {runs}")
        best_off, best_ours = min(off_times), min(our_times)
        print(
            f"best: official {n / best_off:.0f} cells/s, ours {n / best_ours:.0f} cells/s, "
            f"speed-up x{best_off / best_ours:.2f}; peak RSS increase official "
            f"+{max(off_peaks):.0f} MB, ours +{max(our_peaks):.0f} MB"
        )
        med = {name: float(np.median(t)) for name, t in times.items()}
        med_off, med_ours, med_int8, med_unrefined = med.values()
        int8_peak = max(peaks["ours precision='int8'"])

        def cosine_to_fp32(other: np.ndarray) -> np.ndarray:  # per cell
            return (
                (emb * other).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(other, axis=1)
            )

        cosine = cosine_to_fp32(emb_int8)
        emb_unrefined = results["ours int8, no tie refinement"]
        cosine_unrefined = cosine_to_fp32(emb_unrefined)
        n_refined = int((emb_int8 != emb_unrefined).any(1).sum())
        print(
            f"median of {args.repeats} alternating runs: official {n / med_off:.0f} cells/s, "
            f"ours fp32 {n / med_ours:.0f} cells/s (x{med_off / med_ours:.2f}), ours int8 "
            f"{n / med_int8:.0f} cells/s (x{med_off / med_int8:.2f}; x{med_ours / med_int8:.2f} "
            f"vs fp32); int8 quantization (once per model) {t_quantize:.2f}s, "
            f"peak RSS increase int8 +{int8_peak:.0f} MB; per-cell "
            f"cosine int8 vs fp32 min {cosine.min():.5f}, mean {cosine.mean():.6f}"
        )
        print(
            f"without the tie refinement: int8 {n / med_unrefined:.0f} cells/s "
            f"(x{med_off / med_unrefined:.2f} the official), min cosine "
            f"{cosine_unrefined.min():.5f}; the refinement re-ran {n_refined} of {n} cells "
            f"in float32 (+{100 * (med_int8 / med_unrefined - 1):.0f}% time)"
        )
        # sanity: the official GMVAE samples its cluster (Gumbel), ours takes the argmax, so
        # only the rows where both pick the same cluster agree
        close = np.abs(emb - emb_off).max(1) < 1e-4
        print(
            f"embedding shapes {emb.shape} / {emb_off.shape}; rows equal to 1e-4: "
            f"{close.mean():.1%} (official Gumbel cluster sample vs our argmax)"
        )

        # ---------------------------------------------------------------- stages
        print()
        print_stages("ours, per stage", our_stages(model.module, X))
        print_stages("official, per stage", official_stages(pipe.model, X, genes))
    print(load_line())


if __name__ == "__main__":
    main()
