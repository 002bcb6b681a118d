"""cellplm_scvi: CellPLM for scvi-tools users."""

import logging

from . import data, datasets, module, nn, pp
from .model import CellPLM

__version__ = "0.1.0"

logging.getLogger("cellplm_scvi").addHandler(logging.NullHandler())

__all__ = ["CellPLM", "data", "datasets", "module", "nn", "pp"]
