"""Sphinx configuration of the cellplm_scvi documentation (cookiecutter-scverse layout).

The build works offline: intersphinx inventories are fetched only when the environment
variable ``CELLPLM_DOCS_INTERSPHINX=1`` is set, and notebooks are rendered without executing
them. The tutorial notebooks live in ``../tutorials``; they are copied into
``tutorials/notebooks/`` (git-ignored) when the build starts, and the user-guide figure is made
by ``make_figures.py`` if it is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # make_figures

# sphinx-autodoc-typehints calls an API that Sphinx 9 deprecates: not our problem, not a
# Sphinx warning (so -W is unaffected), but it floods the build log
warnings.filterwarnings("ignore", message=r".*sphinx_autodoc_typehints.*is deprecated")

# -- Project information -------------------------------------------------------------------

_info = metadata("cellplm-scvi")
project = "cellplm-scvi"
author = "cellplm-scvi developers"
copyright = f"{datetime.now():%Y}, {author}"
version = _info["Version"]
release = version

# -- General configuration -----------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinxcontrib.bibtex",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "make_figures.py"]
source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb", ".md": "myst-nb"}
master_doc = "index"
default_role = "literal"

# autodoc / autosummary / napoleon
autosummary_generate = True
autodoc_member_order = "groupwise"
# no "members" default: Sphinx 9 lets a boolean default replace a directive's explicit member
# list, which _templates/autosummary/class.rst gives (it sets :members: itself)
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "braces"
always_document_param_types = False

# bibliography
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "alpha"

# MyST / myst-nb: notebooks are rendered as stored, never executed here
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image"]
myst_heading_anchors = 3

# intersphinx: offline by default (the build machines have no network)
intersphinx_mapping: dict[str, tuple[str, None]] = {}
if os.environ.get("CELLPLM_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
        "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
    }

# -- HTML ----------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_title = "cellplm-scvi"
html_theme_options = {"navigation_with_keys": False}
pygments_style = "default"


def package_members(package: str = "cellplm_scvi") -> dict[str, list[str]]:
    """Public members of each class of ``package``, by the name it is documented under, that
    the class or one of its bases in ``package`` defines (e.g. ``CellPLM.train`` from its
    training mixin); members inherited from scvi-tools and Lightning are left out (the page
    links those bases). ``_templates/autosummary/class.rst`` documents these."""
    import importlib
    import inspect
    import pkgutil

    root = importlib.import_module(package)
    names = [package] + [info.name for info in pkgutil.walk_packages(root.__path__, f"{package}.")]
    members: dict[str, list[str]] = {}
    for module_name in names:
        module = importlib.import_module(module_name)
        for attribute, cls in vars(module).items():
            if not inspect.isclass(cls) or not cls.__module__.startswith(package):
                continue
            own = []
            for name in dir(cls):
                owner = next((k for k in cls.__mro__ if name in vars(k)), None)
                if not name.startswith("_") and owner and owner.__module__.startswith(package):
                    own.append(name)
            members[f"{module_name}.{attribute}"] = own
    return members


autosummary_context = {"package_members": package_members()}

# -- Build-time hooks ----------------------------------------------------------------------

TUTORIALS_SRC = REPO / "tutorials"
TUTORIALS_DST = HERE / "tutorials" / "notebooks"
FIGURE = HERE / "_static" / "tissues.png"


def copy_tutorials() -> None:
    """Copy ``../tutorials/*.ipynb`` into ``docs/tutorials/notebooks`` (git-ignored)."""
    TUTORIALS_DST.mkdir(parents=True, exist_ok=True)
    for nb in sorted(TUTORIALS_SRC.glob("*.ipynb")):
        target = TUTORIALS_DST / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)


def make_missing_figures() -> None:
    """Draw the user-guide figure with ``make_figures.py`` unless it already exists."""
    if not FIGURE.exists():
        import make_figures

        make_figures.main(HERE / "_static")


# run at configuration time, so that the copied notebooks are found as source files
copy_tutorials()
make_missing_figures()


def setup(app):
    """Nothing else to register (the hooks above already ran)."""
    return {"parallel_read_safe": True}
