"""Draw the figures of the user guide into ``docs/_static`` (offline, a few seconds).

Run ``python docs/make_figures.py [OUT_DIR]``; the Sphinx build (``docs/conf.py``) runs it
when a figure is missing, and ``tests/test_docs.py`` runs it before building.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

OUT = Path(__file__).resolve().parent / "_static"
N_CELLS = 3000
MAX_CELLS = 300
SEED = 0


def tissues_figure(path: Path) -> Path:
    """One simulated slide, coloured by simulated niche and by the tissue of every cell."""
    import logging

    import squidpy  # noqa: F401  (used by assign_tissues; imported here to quiet its logger)

    import cellplm_scvi as cp

    logging.getLogger("spatialdata._logging").setLevel(logging.WARNING)

    adata = cp.datasets.simulate_tissue(n_cells=N_CELLS, n_slides=1, seed=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp.pp.assign_tissues(
            adata, spatial_key="spatial", library_key="slide", max_cells=MAX_CELLS
        )
    xy = adata.obsm["spatial"]
    tissue = adata.obs["cellplm_tissue"].cat.codes.to_numpy()
    niche = adata.obs["niche"].cat.codes.to_numpy()
    n_tissues = int(tissue.max()) + 1

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), constrained_layout=True)
    for ax, codes, cmap, title in [
        (axes[0], niche, "Set2", f"simulated niches ({niche.max() + 1})"),
        (axes[1], tissue, "tab20", f"CellPLM tissues ({n_tissues}, <= {MAX_CELLS} cells each)"),
    ]:
        ax.scatter(xy[:, 0], xy[:, 1], c=codes, cmap=cmap, s=4, linewidths=0)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    # label each tissue at its centroid
    for k in range(n_tissues):
        centre = np.median(xy[tissue == k], axis=0)
        axes[1].text(*centre, str(k), ha="center", va="center", fontsize=8, weight="bold")
    fig.suptitle(f"One slide of {N_CELLS} real PBMCs placed in simulated niches")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(out_dir: str | Path = OUT) -> list[Path]:
    """Write every figure into ``out_dir`` and return their paths."""
    out_dir = Path(out_dir)
    return [tissues_figure(out_dir / "tissues.png")]


if __name__ == "__main__":
    for p in main(sys.argv[1] if len(sys.argv) > 1 else OUT):
        print(p)
