"""The CellPLM network as an scvi-tools module: one forward call = one tissue."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from .._constants import BATCH_KEY, LABELS_KEY, SPATIAL_KEY, X_KEY
from ..nn import CellEmbedder, FlowformerEncoder, GMVAELatent, LatentStack, NBDecoder, VAELatent
from ._loss import masked_nb_loss
from ._masking import TissueMask, apply_mask, sample_mask


class _PreLatentNorm(nn.Module):
    def __init__(self, n_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(n_hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


def scale_coordinates(coords: torch.Tensor) -> torch.Tensor:
    """Min-max scale (N, 2) coordinates of one tissue to [0, 1] per axis (NaN rows kept)."""
    finite = ~coords.isnan().any(1)
    if not finite.any():
        return coords
    lo = coords[finite].min(0).values
    span = (coords[finite].max(0).values - lo).clamp_min(1e-12)
    return (coords - lo) / span


class CellPLMModule(BaseModuleClass):
    """Embedder -> Flowformer -> LayerNorm -> (GM)VAE latent -> NB decoder.

    Parameters
    ----------
    n_vocab
        Genes in the vocabulary (rows of the gene-embedding table, decoder outputs).
    gene_index
        Vocabulary row of each input column (-1: gene outside the vocabulary, ignored), or
        ``None`` when the input columns are exactly the vocabulary.
    n_hidden, n_layers, n_heads
        Token width, Flowformer layers and heads.
    n_latent
        Latent (embedding) width.
    latent
        ``"gmvae"`` (Gaussian mixture with ``n_clusters`` components) or ``"vae"``.
    dropout
        Dropout of the embedder, encoder and decoder.
    n_dec_hidden, n_dec_layers
        Decoder width and depth (layers including the NB head).
    decoder_covariates
        Levels per decoder covariate, e.g. ``{"batch": 3}``.
    use_batch_covariate
        Feed the registered batch index to the decoder's ``"batch"`` table. Off for official
        checkpoints, whose table indexes pretraining samples: they use the mean embedding.
    use_spatial_pe
        Add the 2-D sinusoidal encoding of coordinates (scaled to [0, 1] per tissue).
    mask_cell_rate, mask_gene_rate
        Fraction of cells masked per training step, and of the entries of a masked cell.
    dae
        Add the masked-entry ("denoising") NB term.
    latent_kwargs
        Passed to the latent layer (``lamda``, ``w_li``, ``w_en``).
    n_labels
        Cell-type classes. With ``n_labels > 1`` a head ``Linear -> Dropout -> Linear`` on the
        pre-latent state predicts them (the official fine-tuning head).
    classification_ratio
        Weight of the cross-entropy of labelled cells relative to the reconstruction loss.
    classifier_dropout
        Dropout inside the head (official fine-tuning: 0.5).
    measured_genes
        (n_batch, G_in) bool: the genes each batch measured (e.g. a spatial panel). The NB loss
        and the library size use only a cell's measured genes. ``None``: all genes everywhere.
    """

    def __init__(
        self,
        n_vocab: int,
        gene_index: np.ndarray | None = None,
        n_hidden: int = 256,
        n_layers: int = 2,
        n_heads: int = 8,
        n_latent: int = 32,
        latent: Literal["gmvae", "vae"] = "gmvae",
        n_clusters: int = 16,
        dropout: float = 0.1,
        n_dec_hidden: int | None = None,
        n_dec_layers: int = 2,
        decoder_covariates: dict[str, int] | None = None,
        use_batch_covariate: bool = True,
        use_spatial_pe: bool = False,
        mask_cell_rate: float = 0.75,
        mask_gene_rate: float = 0.25,
        dae: bool = True,
        latent_kwargs: dict | None = None,
        n_labels: int = 0,
        classification_ratio: float = 50.0,
        classifier_dropout: float = 0.5,
        measured_genes: np.ndarray | None = None,
    ):
        super().__init__()
        self.n_latent = n_latent
        self.latent_type = latent
        self.use_batch_covariate = use_batch_covariate
        self.use_spatial_pe = use_spatial_pe
        self.mask_cell_rate, self.mask_gene_rate, self.dae = mask_cell_rate, mask_gene_rate, dae
        self._set_gene_index(n_vocab, gene_index)

        self.embedder = CellEmbedder(n_vocab, n_hidden, dropout)
        self.encoder = FlowformerEncoder(n_hidden, n_layers, n_heads, dropout)
        self.pre_latent_norm = _PreLatentNorm(n_hidden)
        latent_kwargs = latent_kwargs or {}
        if latent == "gmvae":
            layer = GMVAELatent(n_hidden, n_latent, n_clusters, **latent_kwargs)
        elif latent == "vae":
            layer = VAELatent(n_hidden, n_latent, **latent_kwargs)
        else:
            raise ValueError(f"latent must be 'gmvae' or 'vae', got {latent!r}.")
        self.latent = LatentStack(layer)
        self.decoder = NBDecoder(
            n_latent, n_dec_hidden or n_hidden, n_vocab, n_dec_layers, dropout, decoder_covariates
        )
        self.n_labels, self.classification_ratio = n_labels, classification_ratio
        self.classifier = None
        if n_labels > 1:
            self.classifier = nn.Sequential(
                nn.Linear(n_hidden, n_latent),
                nn.Dropout(classifier_dropout),
                nn.Linear(n_latent, n_labels),
            )
        if measured_genes is not None:
            measured_genes = torch.as_tensor(np.asarray(measured_genes, dtype=bool))
        self.register_buffer("measured_genes", measured_genes, persistent=False)

    # ------------------------------------------------------------------ genes
    def _set_gene_index(self, n_vocab: int, gene_index: np.ndarray | None) -> None:
        """Store how input columns map to the vocabulary (non-persistent buffers)."""
        self.n_vocab = n_vocab
        if gene_index is None or np.array_equal(gene_index, np.arange(n_vocab)):
            self.register_buffer("embed_index", None, persistent=False)
            self.register_buffer("matched_columns", None, persistent=False)
            self.register_buffer("decoder_index", None, persistent=False)
            return
        gene_index = np.asarray(gene_index, dtype=np.int64)
        matched = np.flatnonzero(gene_index >= 0)
        self.register_buffer("embed_index", torch.as_tensor(gene_index), persistent=False)
        self.register_buffer("matched_columns", torch.as_tensor(matched), persistent=False)
        self.register_buffer(
            "decoder_index", torch.as_tensor(gene_index[matched]), persistent=False
        )

    # ------------------------------------------------------------------ scvi API
    def _get_inference_input(self, tensors: dict, **kwargs) -> dict:
        return {"x": tensors[X_KEY], "coords": tensors.get(SPATIAL_KEY)}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        batch = tensors.get(BATCH_KEY)
        if batch is not None and self.use_batch_covariate:
            batch = batch.view(-1).long()
        else:
            batch = None
        return {"z": inference_outputs["z"], "batch_index": batch}

    @auto_move_data
    def inference(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> dict:
        """Encode one tissue of N cells.

        Returns ``z``, ``qz_m``, ``qz_v``, the pre-latent state ``h`` (N, d), the latent loss and,
        in training, the ``mask`` that was applied to the input.
        """
        if x.layout == torch.sparse_csc or x.layout == torch.sparse_coo:
            x = x.to_sparse_csr()
        mask = None
        if self.training and self.mask_cell_rate > 0 and self.mask_gene_rate > 0:
            mask = sample_mask(
                x.shape[0], x.shape[1], self.mask_cell_rate, self.mask_gene_rate, x.device
            )
            x = apply_mask(x, mask)
        pe_coords = None
        if self.use_spatial_pe and coords is not None:
            pe_coords = scale_coordinates(coords.float())
        h = self.embedder(x, self.embed_index, pe_coords)  # (N, d)
        h = self.pre_latent_norm(self.encoder(h))  # (N, d)
        out = self.latent(h)
        out["h"] = h
        out["mask"] = mask
        if self.classifier is not None:
            out["logits"] = self.classifier(h)
        return out

    @auto_move_data
    def generative(self, z: torch.Tensor, batch_index: torch.Tensor | None = None) -> dict:
        """Decode to the NB mean (N, G_matched) and inverse dispersion (G_matched,)."""
        covariates = {"batch": batch_index} if batch_index is not None else None
        mean, theta = self.decoder(z, covariates, self.decoder_index)
        return {"px_mean": mean, "px_theta": theta}

    def observed_counts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense counts of the input columns that the decoder reconstructs."""
        x = x.to_dense() if x.is_sparse or x.layout != torch.strided else x
        return x if self.matched_columns is None else x[:, self.matched_columns]

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Masked NB loss on masked cells (+ DAE term), latent loss and, with labels, the
        cross-entropy of labelled cells.

        In evaluation (no mask) every cell enters the NB loss and there is no DAE term.
        """
        # float32 even under autocast: bf16 holds integers exactly only up to 256
        x = self.observed_counts(tensors[X_KEY]).float()
        mean, theta = generative_outputs["px_mean"].float(), generative_outputs["px_theta"].float()
        measured = self.measured_weights(tensors)  # (N, G_matched) or None
        mask: TissueMask | None = inference_outputs["mask"]
        cells = slice(None) if mask is None else mask.cells
        entries = None  # hidden entries of the masked cells, for the DAE term
        if mask is not None and self.dae:
            entries = mask.entries
            if self.matched_columns is not None:
                entries = entries[:, self.matched_columns]
        if measured is not None:
            measured = measured[cells]
            entries = None if entries is None else entries & measured
        recon = masked_nb_loss(x[cells], mean[cells], theta, entries, measured)
        kl = inference_outputs.get("kl")
        kl = torch.zeros_like(recon) if kl is None else kl[cells]
        latent_loss = inference_outputs.get("loss", torch.zeros((), device=recon.device))
        loss = recon.mean() + kl_weight * latent_loss
        extra = {"latent_loss": latent_loss.detach()}
        ce = self.classification_loss(tensors, inference_outputs)
        if ce is not None:
            loss = loss + self.classification_ratio * ce
            extra["classification_loss"] = ce.detach()
        return LossOutput(loss=loss, reconstruction_loss=recon, kl_local=kl, extra_metrics=extra)

    def measured_weights(self, tensors: dict) -> torch.Tensor | None:
        """(N, G_matched) bool: the genes each cell's batch measured, or ``None``."""
        if self.measured_genes is None:
            return None
        rows = self.measured_genes[tensors[BATCH_KEY].view(-1).long()]
        return rows if self.matched_columns is None else rows[:, self.matched_columns]

    def classification_loss(self, tensors: dict, inference_outputs: dict) -> torch.Tensor | None:
        """Mean cross-entropy over cells with a known label (code < n_labels), or ``None``."""
        if self.classifier is None or LABELS_KEY not in tensors:
            return None
        labels = tensors[LABELS_KEY].view(-1).long()
        known = labels < self.n_labels
        if not known.any():
            return None
        logits = inference_outputs["logits"][known]
        return nn.functional.cross_entropy(logits, labels[known])

    @torch.inference_mode()
    def sample(self, tensors: dict, n_samples: int = 1) -> torch.Tensor:
        """Draw counts from the NB posterior predictive of one tissue, (n_samples, N, G)."""
        from scvi.distributions import NegativeBinomial

        inf = self.inference(**self._get_inference_input(tensors))
        gen = self.generative(**self._get_generative_input(tensors, inf))
        dist = NegativeBinomial(mu=gen["px_mean"], theta=gen["px_theta"].expand_as(gen["px_mean"]))
        return dist.sample((n_samples,))
