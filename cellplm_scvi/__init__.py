"""cellplm_scvi: CellPLM for scvi-tools users."""

from . import data, datasets, module, nn, pp
from ._quiet import install_package_handler
from .model import CellPLM

__version__ = "0.1.0"

install_package_handler()  # the package's own lines reach a plain script (as scvi-tools')

__all__ = ["CellPLM", "data", "datasets", "module", "nn", "pp"]
