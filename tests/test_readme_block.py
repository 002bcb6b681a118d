"""The README's "Use" block as a user runs it: a plain script (no logging set-up) on a small
simulated tissue. Its console holds the package's own lines and the progress bar only, a
package warning reaches it, every slide trains and validation figures exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the README block's calls, on 400 simulated cells in 2 slides; a tiny network and 2 epochs
# (the block itself trains for the default length, tests/test_train_length.py)
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import cellplm_scvi as cp

    adata = cp.datasets.simulate_tissue(n_cells=400, n_slides=2, seed=0)
    adata.layers["counts"] = adata.X.copy()

    cp.pp.assign_tissues(adata, spatial_key="spatial", library_key="slide", max_cells=1000)
    cp.CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", tissue_key="cellplm_tissue"
    )
    model = cp.CellPLM(adata, n_hidden=16, n_layers=1, n_heads=4, n_latent=4)
    model.train(max_epochs=2, check_val_every_n_epoch=1)
    adata.obsm["X_cellplm"] = model.get_latent_representation()

    # a user-relevant package warning: the tissue column is recomputed
    cp.CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial")

    slides = adata.obs["slide"].astype(str)
    json.dump(
        {
            "slides": sorted(set(slides)),
            "trained_slides": sorted(set(slides.iloc[model.train_indices])),
            "history": {k: v.iloc[:, 0].tolist() for k, v in model.history.items()},
        },
        open(sys.argv[1], "w"),
    )
    """
)

# third-party lines the package triggers and hides (cellplm_scvi._quiet); one coming back fails
KNOWN_FOREIGN = [
    r".*litlogger.*",
    r".*💡 Tip.*",
    r".*LeafSpec.*",
    r".*log_every_n_steps.*",
    r".*`Trainer\.fit` stopped.*",
    r".*(GPU|TPU|HPU) available.*",
    r".*is not a valid key!.*",  # docrep, on squidpy's import
    r".*Generating sequential column names.*",
]
PROGRESS = re.compile(r"(Training|Epoch \d+/\d+): +\d+%\|.*")
PACKAGE_LINE = re.compile(r"cellplm_scvi (INFO|WARNING): .*")


def test_readme_block_is_quiet_trains_every_slide_and_validates(tmp_path):
    script, result = tmp_path / "use.py", tmp_path / "result.json"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), str(result)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    lines = [part.strip() for line in console.splitlines() for part in line.split("\r")]
    lines = [line for line in lines if line]
    known = [line for line in lines if any(re.fullmatch(p, line) for p in KNOWN_FOREIGN)]
    assert not known, "third-party lines on the console:\n" + "\n".join(known)
    other = [line for line in lines if not (PROGRESS.fullmatch(line) or PACKAGE_LINE.match(line))]
    assert not other, "neither the package's lines nor the progress bar:\n" + "\n".join(other)
    assert any(PROGRESS.fullmatch(line) for line in lines)  # the progress bar still shows
    assert any("is recomputed" in line for line in proc.stderr.splitlines())  # the warning

    summary = json.loads(result.read_text())
    assert summary["trained_slides"] == summary["slides"]  # no slide is held out
    for key in ("elbo_train", "elbo_validation"):  # scVI's early-stopping monitor
        values = summary["history"].get(key)
        assert values and len(values) == 2, (key, sorted(summary["history"]))
