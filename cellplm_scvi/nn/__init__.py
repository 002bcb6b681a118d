"""Building blocks of the CellPLM network (pure torch)."""

from ._decoder import NBDecoder, NBHead
from ._embedder import CellEmbedder, Sinusoidal2dPE, sinusoidal_2d_table
from ._flowformer import FlowAttention, FlowformerEncoder, FlowformerLayer
from ._latent import GMVAELatent, LatentStack, VAELatent
from ._perturbation import PerturbationEncoder
from ._segments import TissueSegments
from ._spatial_kernel import spatial_kernel_features

__all__ = [
    "CellEmbedder",
    "FlowAttention",
    "FlowformerEncoder",
    "FlowformerLayer",
    "GMVAELatent",
    "LatentStack",
    "NBDecoder",
    "NBHead",
    "PerturbationEncoder",
    "Sinusoidal2dPE",
    "TissueSegments",
    "VAELatent",
    "sinusoidal_2d_table",
    "spatial_kernel_features",
]
