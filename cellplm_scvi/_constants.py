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
SIZE_FACTOR_KEY = _SCVI_KEYS.SIZE_FACTOR_KEY  # optional library size that rescales the NB mean
CAT_COVS_KEY = _SCVI_KEYS.CAT_COVS_KEY  # extra categorical decoder covariates
LATENT_QZM_KEY = _SCVI_KEYS.LATENT_QZM_KEY  # minified data: cached posterior mean
LATENT_QZV_KEY = _SCVI_KEYS.LATENT_QZV_KEY  # minified data: cached posterior variance
OBSERVED_LIB_SIZE_KEY = _SCVI_KEYS.OBSERVED_LIB_SIZE  # minified data: cached library size
REQUESTED_KEY = "requested"  # inference: which rows of a whole tissue the caller asked for
MEASURED_KEY = "measured"  # corpus minibatches: the genes their file measured, (G,) bool
LOSS_MASK_KEY = "loss_mask"  # within-tissue split: (N,) bool, the rows that enter the loss
TISSUE_INDEX_KEY = "tissue_index"  # packed steps: (N,) long, the tissue of each row, 0..T-1

# the gene layout of an AnnData read by a model with a vocabulary (see ``_vocabulary.GeneLayout``);
# the same for every minibatch of one AnnData; absent: the columns are the vocabulary
GENE_INDEX_KEY = "gene_index"  # (G,) long: vocabulary row of each column, -1 outside
MATCHED_COLUMNS_KEY = "matched_columns"  # (G_matched,) long: the columns in the vocabulary
MEASURED_TABLE_KEY = "measured_genes"  # (n_batch, G) bool: the genes each batch measured
BATCH_COVARIATE_KEY = "batch_covariate"  # () bool False: the decoder's batches are not these
LAYOUT_KEYS = (GENE_INDEX_KEY, MATCHED_COLUMNS_KEY, MEASURED_TABLE_KEY, BATCH_COVARIATE_KEY)

# perturbation prediction (``setup_anndata(perturbation_key=...)``, see model/_perturbation.py)
PERTURBATION_KEY = "perturbation"  # categorical: the condition of each cell ("ctrl", "A+B", ...)
PERTURBED_GENES_KEY = "perturbed_genes"  # (N, 2) long: vocabulary rows of the perturbed genes
PERTURBED_X_KEY = "perturbed_x"  # (N, G) target counts: cells of the condition the input is under
