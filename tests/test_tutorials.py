"""Execute every tutorial notebook in ``tutorials/`` (offline, a temporary working directory).

Run ``python tests/test_tutorials.py --write`` to execute the notebooks and store their outputs
in place (the documentation shows the stored outputs; it never executes notebooks).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; each notebook takes well under a minute on 2 idle cores
KERNEL = "cellplm-scvi-tests"


def _kernel_dir(root: Path) -> Path:
    """A kernelspec that runs *this* interpreter, so the notebooks see the tested install."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "cellplm-scvi tests",
                "language": "python",
            }
        )
    )
    return root


def execute(path: Path, workdir: Path):
    """Run ``path`` in ``workdir`` with one thread per library; return (notebook, seconds)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {
        "JUPYTER_PATH": str(_kernel_dir(workdir / "_jupyter")),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = NotebookClient(
            nb,
            timeout=CELL_TIMEOUT,
            kernel_name=KERNEL,
            resources={"metadata": {"path": str(workdir)}},
        )
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb, seconds


def test_notebooks_found():
    assert [p.name for p in NOTEBOOKS] == [
        "01_spatial_quickstart.ipynb",
        "02_pretrained.ipynb",
        "03_annotation.ipynb",
        "04_spatial_imputation.ipynb",
        "05_pretraining.ipynb",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path):
    pytest.importorskip("nbclient", reason="nbclient is needed to execute the tutorials")
    pytest.importorskip("ipykernel", reason="ipykernel is needed to execute the tutorials")
    nb, seconds = execute(path, tmp_path)  # an error in any cell raises CellExecutionError
    print(f"{path.name}: {seconds:.1f} s")
    # every plotting notebook produced figures
    n_figures = sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert n_figures >= 1


def main(argv: list[str]) -> None:
    """``--write``: execute the notebooks and store their outputs in place."""
    import nbformat

    write = "--write" in argv
    names = [a for a in argv if not a.startswith("--")]
    for path in NOTEBOOKS:
        if names and path.stem not in names and path.name not in names:
            continue
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with tempfile.TemporaryDirectory() as tmp:
            nb, seconds = execute(path, Path(tmp))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(f"{path.name}: {seconds:.1f} s wall, {cpu:.1f} s CPU (kernel)")
        if write:
            nbformat.write(nb, path)


if __name__ == "__main__":
    main(sys.argv[1:])
