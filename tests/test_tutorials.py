"""Execute every tutorial notebook in ``tutorials/`` (offline, a temporary working directory).

The tests train each model for 2 epochs instead of the notebook's number (``TEST_EPOCHS``): the
same code runs, in a fraction of the time. Run ``python tests/test_tutorials.py --write`` to
execute the notebooks as written and store their outputs in place (the documentation shows the
stored outputs; it never executes notebooks).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; each notebook takes well under a minute on 2 idle cores
PARALLEL = 2  # notebooks run at once
KERNEL = "cellplm-scvi-tests"
KERNEL_START = threading.Lock()  # one kernel starts at a time (run_notebook)
# notebook -> the training calls' epoch arguments as written, and in the tests: 2 epochs
TEST_EPOCHS = {
    "01_spatial_quickstart": {"model.train(max_epochs=15,": "model.train(max_epochs=2,"},
    "03_annotation": {"model.train(max_epochs=25,": "model.train(max_epochs=2,"},
    "04_spatial_imputation": {"model.train(max_epochs=20,": "model.train(max_epochs=2,"},
    "05_pretraining": {"max_epochs=8,": "max_epochs=2,"},
    "06_perturbation": {"max_epochs=20,": "max_epochs=2,"},
}


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


@contextmanager
def notebook_environment(root: Path):
    """One thread per library and a kernelspec that runs this interpreter, for the kernels
    started inside the block (they inherit the environment)."""
    env = {
        "JUPYTER_PATH": str(_kernel_dir(root / "_jupyter")),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shorten_training(nb, replacements: dict[str, str]) -> None:
    """Replace each key of ``replacements`` (found exactly once in the code cells) by its value."""
    for old, new in replacements.items():
        cells = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert len(cells) == 1 and cells[0].source.count(old) == 1, (
            f"{old!r} is not in exactly one place of the notebook: update TEST_EPOCHS"
        )
        cells[0].source = cells[0].source.replace(old, new)


def run_notebook(path: Path, workdir: Path, short: bool = False):
    """Run ``path`` in ``workdir`` (inside :func:`notebook_environment`), with the training of
    ``TEST_EPOCHS`` if ``short``; return (notebook, seconds)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if short:
        shorten_training(nb, TEST_EPOCHS.get(path.stem, {}))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    with KERNEL_START:  # kernels started at once can pick the same free ports
        client.km = client.create_kernel_manager()
        client.start_new_kernel()
        client.start_new_kernel_client()  # waits until the kernel replies
    client.execute()  # in the kernel started above
    seconds = time.perf_counter() - start
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb, seconds


def execute(path: Path, workdir: Path):
    """Run ``path`` in ``workdir`` with one thread per library; return (notebook, seconds)."""
    with notebook_environment(workdir):
        return run_notebook(path, workdir)


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[Path, Future]:
    """Every tutorial run once (``TEST_EPOCHS``), two at a time: each kernel uses one thread, so
    two kernels use the two cores of a small CI machine. Notebook -> future of (notebook,
    seconds); its test re-raises the notebook's error."""
    pytest.importorskip("nbclient", reason="nbclient is needed to execute the tutorials")
    pytest.importorskip("ipykernel", reason="ipykernel is needed to execute the tutorials")
    root = tmp_path_factory.mktemp("tutorials")
    futures = {}
    with notebook_environment(root), ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        for path in NOTEBOOKS:
            workdir = root / path.stem
            workdir.mkdir()
            futures[path] = pool.submit(run_notebook, path, workdir, True)
    return futures  # the pool has waited for all of them


def test_notebooks_found():
    assert set(TEST_EPOCHS) <= {p.stem for p in NOTEBOOKS}
    assert [p.name for p in NOTEBOOKS] == [
        "01_spatial_quickstart.ipynb",
        "02_pretrained.ipynb",
        "03_annotation.ipynb",
        "04_spatial_imputation.ipynb",
        "05_pretraining.ipynb",
        "06_perturbation.ipynb",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_tutorial_runs(path, executed):
    nb, seconds = executed[path].result()  # an error in any cell: CellExecutionError
    print(f"{path.name}: {seconds:.1f} s (two notebooks at a time)")
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
