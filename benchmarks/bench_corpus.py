"""Corpus loading benchmark: reading engines for a many-file tissue corpus.

1. **Generate** ``--n-files`` ``.h5ad`` files holding ``--n-cells`` cells in all, each with
   its own random ``--n-genes`` genes of the 85M vocabulary (a quarter of them shared by all
   files), sparse raw counts (``--density``), two samples per file; file 0 is spatial (a
   jittered grid). ``X`` is written chunk by chunk, never held in RAM.
2. **Read** one epoch of tissues (the :class:`~cellplm_scvi.data.TissueCorpus` training
   sampler, ``max_cells=--max-cells``) with each engine, each in a fresh subprocess so that its
   peak RSS (VmHWM) is its own:

   - ``corpus``: :class:`TissueCorpus` itself (h5py + anndata's backed sparse datasets; rows
     mapped to vocabulary columns, CSR tensors and the other minibatch keys);
   - ``backed``: ``anndata.read_h5ad(path, backed="r")`` per file and ``adata.X[rows]``
     (anndata's backed mode; no vocabulary mapping);
   - ``anncollection``: ``anndata.experimental.AnnCollection`` of the backed files
     (``join_vars="inner"``: it has no outer join, so it keeps only the genes all files share)
     and ``collection[rows].X``.

   ``corpus`` also runs on the first file alone (peak RSS of 1 file vs all files).

Reported: cells/s of the epoch, time to first minibatch (construction + first read; cold and
warm tissue cache for ``corpus``), peak RSS. No assertions: figures only.

Usage::

    python benchmarks/bench_corpus.py                        # 4 files, 200,000 cells
    python benchmarks/bench_corpus.py --n-cells 2000000      # 2M cells
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_line, machine_info, peak_mb, tissue_corpus, write_corpus

ENGINES = ("corpus", "backed", "anncollection")


def worker(args) -> dict:
    """One engine, one epoch (run in a fresh process)."""
    paths = json.loads(args.files)
    import cellplm_scvi.data  # noqa: F401  (imports are not part of the timings)

    t0 = time.perf_counter()
    dm = tissue_corpus(paths, args.max_cells, args.seed, args.cache_dir)
    built = time.perf_counter() - t0
    steps = list(dm.sampler("train"))
    if args.engine == "corpus":
        read = dm.dataset.__getitem__
    else:
        import anndata as ad

        adatas = [ad.read_h5ad(p, backed="r") for p in paths]
        offsets = dm.offsets
        if args.engine == "backed":

            def read(rows):
                rows = np.sort(rows)
                k = int(np.searchsorted(offsets, rows[0], side="right") - 1)
                return adatas[k].X[rows - offsets[k]]
        else:
            from anndata.experimental import AnnCollection

            collection = AnnCollection(adatas, join_vars="inner", index_unique="-")

            def read(rows):
                return collection[np.sort(rows)].X

    t_first = None
    n_cells = 0
    t1 = time.perf_counter()
    for rows in steps:
        read(rows)
        n_cells += len(rows)
        if t_first is None:
            t_first = time.perf_counter() - t0
    epoch = time.perf_counter() - t1
    return {
        "engine": args.engine,
        "files": len(paths),
        "cells": n_cells,
        "build_s": built,
        "first_s": t_first,
        "cells_per_s": n_cells / epoch,
        "peak_mb": peak_mb(),
        "cached": bool(dm.alignment_report["cached"].all()),
    }


def run_worker(engine: str, paths, args, cache_dir) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--engine",
        engine,
        "--files",
        json.dumps([str(p) for p in paths]),
        "--cache-dir",
        str(cache_dir),
        "--max-cells",
        str(args.max_cells),
        "--seed",
        str(args.seed),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        return {"engine": engine, "files": len(paths), "error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cells", type=int, default=200_000, help="cells in all files")
    parser.add_argument("--n-files", type=int, default=4)
    parser.add_argument("--n-genes", type=int, default=2_000, help="genes per file")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--max-cells", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp dir)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(machine_info())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        paths = write_corpus(
            folder, args.n_files, args.n_cells, args.n_genes, args.density, args.seed
        )
        size = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"generated {args.n_files} files, {args.n_cells:,} cells in all, {args.n_genes} genes "
            f"per file, density {args.density}: {size:.0f} MB in {time.perf_counter() - t0:.0f} s"
        )
        cache = folder / "cache"
        rows = [run_worker("corpus", paths, args, cache)]  # cold tissue cache
        rows.append(run_worker("corpus", paths[:1], args, cache))
        for engine in args.engines.split(","):
            rows.append(run_worker(engine, paths, args, cache))  # warm cache
        header = "engine | files | cache | cells/s | first batch (s) | build (s) | peak RSS (MB)"
        print(f"\n| {header} |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['engine']} | {r['files']} | - | error: {r['error']} | | | |")
                continue
            print(
                f"| {r['engine']} | {r['files']} | {'warm' if r['cached'] else 'cold'} | "
                f"{r['cells_per_s']:,.0f} | {r['first_s']:.2f} | {r['build_s']:.2f} | "
                f"{r['peak_mb']:.0f} |"
            )
    print(load_line())


if __name__ == "__main__":
    main()
