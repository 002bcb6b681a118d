"""Build the documentation with warnings as errors (offline; notebooks are not executed)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests._helpers import finish_script, start_script

REPO = Path(__file__).resolve().parents[1]
# build artefacts that must not be copied into the fresh source tree
IGNORE = shutil.ignore_patterns("_build", "generated", "notebooks", "tissues.png", "*.pyc")


def test_docs_build(tmp_path):
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install -e '.[docs]')")
    # build from a copy, so the working tree gets no generated files
    src = tmp_path / "src"
    shutil.copytree(REPO / "docs", src / "docs", ignore=IGNORE)
    shutil.copytree(REPO / "tutorials", src / "tutorials", ignore=IGNORE)
    out = tmp_path / "html"
    # never fetch inventories in the tests (CELLPLM_DOCS_INTERSPHINX unset)
    env = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "CELLPLM_DOCS_INTERSPHINX": None}
    args = ["-W", "--keep-going", "-b", "html", "-q", src / "docs", out]
    log = tmp_path / "sphinx.log"
    start = time.perf_counter()
    # a process forked from a server that has imported cellplm_scvi (autodoc imports it)
    exitcode, output = finish_script(start_script(["-m", "sphinx", *args], log, env=env), log)
    seconds = time.perf_counter() - start
    print(f"sphinx-build: {seconds:.1f} s")
    assert exitcode == 0, f"sphinx-build failed:\n{output[-10000:]}"
    # the user-guide figure was drawn by docs/make_figures.py during the build
    assert (src / "docs" / "_static" / "tissues.png").stat().st_size > 10_000
    assert (out / "_images" / "tissues.png").exists()
    for page in [
        "index.html",
        "api.html",
        "user_guide.html",
        "references.html",
        "generated/cellplm_scvi.CellPLM.html",
        "generated/cellplm_scvi.pp.assign_tissues.html",
        "tutorials/notebooks/01_spatial_quickstart.html",
        "tutorials/notebooks/04_spatial_imputation.html",
    ]:
        assert (out / page).exists(), page
    # the CellPLM docstring cites Wen2024 through the bibliography
    cellplm_page = (out / "generated" / "cellplm_scvi.CellPLM.html").read_text()
    assert "Wen" in cellplm_page
    # methods the package's mixins give CellPLM are on its page, scvi-tools' generic ones not
    for method in ("train", "save", "load", "load_official", "minify_adata", "load_query_data"):
        assert f'id="cellplm_scvi.CellPLM.{method}"' in cellplm_page, method
    assert 'id="cellplm_scvi.CellPLM.differential_expression"' not in cellplm_page
