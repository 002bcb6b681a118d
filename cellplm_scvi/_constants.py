"""Registry keys and obs/obsm names shared across the package."""

from scvi import REGISTRY_KEYS as _SCVI_KEYS

X_KEY = _SCVI_KEYS.X_KEY  # counts
BATCH_KEY = _SCVI_KEYS.BATCH_KEY
LABELS_KEY = _SCVI_KEYS.LABELS_KEY
INDICES_KEY = _SCVI_KEYS.INDICES_KEY  # row position, used to restore AnnData order
TISSUE_KEY = "tissue"  # integer tissue code: the cells of one tissue attend to each other
SPATIAL_KEY = "spatial"  # (n_cells, 2) coordinates; NaN-free, optional

# obs columns written by ``CellPLM.setup_anndata``
INDICES_OBS = "_cellplm_indices"
TISSUE_CODE_OBS = "_cellplm_tissue_code"
DEFAULT_TISSUE_OBS = "cellplm_tissue"
