"""The CellPLM network as an scvi-tools module: one forward call = one tissue."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseMinifiedModeModuleClass, LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal

from .._constants import (
    BATCH_COVARIATE_KEY,
    BATCH_KEY,
    CAT_COVS_KEY,
    GENE_INDEX_KEY,
    LABELS_KEY,
    LATENT_QZM_KEY,
    LATENT_QZV_KEY,
    LOSS_MASK_KEY,
    MATCHED_COLUMNS_KEY,
    MEASURED_KEY,
    MEASURED_TABLE_KEY,
    OBSERVED_LIB_SIZE_KEY,
    PERTURBED_GENES_KEY,
    PERTURBED_X_KEY,
    REQUESTED_KEY,
    SIZE_FACTOR_KEY,
    SPATIAL_KEY,
    TISSUE_INDEX_KEY,
    TISSUE_KEY,
    X_KEY,
)
from .._geometry import scale_coordinates
from ..nn import (
    CellEmbedder,
    FlowformerEncoder,
    GMVAELatent,
    LatentStack,
    NBDecoder,
    PerturbationEncoder,
    TissueSegments,
    VAELatent,
)
from ..nn._int8 import Int8InferenceMixin
from ..nn._segments import segment_mean
from ..nn._spatial_kernel import spatial_kernel_features
from ._loss import masked_nb_loss, nb_nll
from ._masking import TissueMask, apply_mask, join_masks, sample_mask

OBJECTIVES = ("pretrain", "imputation", "annotation")


class _PreLatentNorm(nn.Module):
    def __init__(self, n_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(n_hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class CellPLMModule(Int8InferenceMixin, BaseMinifiedModeModuleClass):
    """Embedder -> Flowformer -> LayerNorm -> (GM)VAE latent -> NB decoder.

    A minibatch's columns are the vocabulary unless it carries a gene layout (see
    :class:`~cellplm_scvi._vocabulary.GeneLayout`): ``"gene_index"`` ((G,) long, the vocabulary
    row of each column, -1: outside, ignored) with ``"matched_columns"`` (the columns in the
    vocabulary), ``"measured_genes"`` ((n_batch, G) bool, the genes each batch measured) and
    ``"batch_covariate"`` (``False``: the decoder's batch table does not index these batches).

    Parameters
    ----------
    n_vocab
        Genes in the vocabulary (rows of the gene-embedding table, decoder outputs).
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
    hide_cell_rate
        Fraction of each tissue's cells, among the ``mask_cell_rate`` masked ones, hidden whole
        (all genes zeroed) at each training step: they are reconstructed from their tissue
        alone, which teaches the encoder to read a cell's niche (see :meth:`niche_inference`).
        ``0``: the official objective.
    n_local_heads
        Heads of each encoder layer that attend through a distance-decaying spatial kernel
        (:func:`~cellplm_scvi.nn.spatial_kernel_features` on a ``local_grid`` x ``local_grid``
        lattice) when coordinates are registered. ``0``: every head sees the whole tissue
        evenly (the official model).
    local_grid
        Anchors per side of the kernel's lattice: its width is ``1 / (local_grid - 1)`` of the
        tissue's larger side.
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
    categorical_covariates
        Names of the ``decoder_covariates`` tables fed, in this order, by the columns of the
        registered extra categorical covariates (``setup_anndata(categorical_covariate_keys=)``).
    perturbation
        Add a :class:`~cellplm_scvi.nn.PerturbationEncoder`: a minibatch's ``"perturbed_genes"``
        ((N, 2) vocabulary rows, -1: none) add an offset to the tokens of its cells; the decoder
        is told it too (shifts of its input ``z``, of each gene's log mean and of the perturbed
        genes' own log means: the token path alone, through a latent pulled towards its prior,
        barely learnt in our runs). Its ``"perturbed_x"`` (target counts, one cell per row)
        replace the input counts in the NB loss, taken on every row (no masked-cell selection,
        no DAE term); see :mod:`cellplm_scvi.model._perturbation`.
    objective
        Training loss. ``"pretrain"``: NB loss of the masked cells (+ DAE), latent loss and
        ``classification_ratio`` times the cross-entropy. ``"imputation"`` (official
        ``NBImputationLoss``): NB loss of *all* cells on their measured genes, no DAE term,
        plus the latent loss. ``"annotation"`` (official annotation head): the cross-entropy
        alone. A minibatch's ``"loss_mask"`` (within-tissue split, see
        :class:`~cellplm_scvi.data.TissueDataSplitter`) restricts every term to its rows.
    """

    def __init__(
        self,
        n_vocab: int,
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
        hide_cell_rate: float = 0.0,
        n_local_heads: int = 0,
        local_grid: int = 4,
        dae: bool = True,
        latent_kwargs: dict | None = None,
        n_labels: int = 0,
        classification_ratio: float = 50.0,
        classifier_dropout: float = 0.5,
        categorical_covariates: tuple[str, ...] = (),
        perturbation: bool = False,
        objective: Literal["pretrain", "imputation", "annotation"] = "pretrain",
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}.")
        if objective == "annotation" and n_labels < 2:
            raise ValueError(
                "objective='annotation' needs a classification head: "
                "setup_anndata(labels_key=...) with at least two cell types."
            )
        self.objective = objective
        self.n_latent = n_latent
        self.latent_type = latent
        self.use_batch_covariate = use_batch_covariate
        self.use_spatial_pe = use_spatial_pe
        if not 0 <= hide_cell_rate <= mask_cell_rate:
            raise ValueError(
                f"hide_cell_rate must be in [0, mask_cell_rate={mask_cell_rate}] (the hidden "
                f"cells are part of the masked ones), got {hide_cell_rate}."
            )
        self.mask_cell_rate, self.mask_gene_rate, self.dae = mask_cell_rate, mask_gene_rate, dae
        self.hide_cell_rate = hide_cell_rate
        self.n_local_heads, self.local_grid = n_local_heads, local_grid
        self.n_vocab = n_vocab
        self.categorical_covariates = tuple(categorical_covariates)
        self.gene_likelihood = "nb"
        self._sample_posterior = False

        self.embedder = CellEmbedder(n_vocab, n_hidden, dropout)
        self.encoder = FlowformerEncoder(n_hidden, n_layers, n_heads, dropout, n_local_heads)
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
        self.perturbation_encoder = None
        if perturbation:
            self.perturbation_encoder = PerturbationEncoder(n_hidden, n_latent, n_vocab)
        self.n_labels, self.classification_ratio = n_labels, classification_ratio
        self.classifier = None
        if n_labels > 1:
            self.classifier = nn.Sequential(
                nn.Linear(n_hidden, n_latent),
                nn.Dropout(classifier_dropout),
                nn.Linear(n_latent, n_labels),
            )

    def unused_parameter_names(self) -> list[str]:
        """Parameters the forward never differentiates: the missing-coordinate vector without
        the spatial encoding, and the embedding tables of decoder covariates that are not fed
        (official checkpoints' pretraining tables, used through their detached mean)."""
        names = [] if self.use_spatial_pe else ["embedder.pe_enc.missing_pe"]
        fed = set(self.categorical_covariates) | ({"batch"} if self.use_batch_covariate else set())
        for i, tables in enumerate(self.decoder.covariate_layers):
            names += [
                f"decoder.covariate_layers.{i}.{key}.0.weight" for key in tables if key not in fed
            ]
        return names

    # ------------------------------------------------------------------ scvi API
    def _get_inference_input(self, tensors: dict, **kwargs) -> dict:
        if self.minified_data_type is not None and LATENT_QZM_KEY in tensors:
            rows = _requested_rows(tensors)
            return {"qzm": tensors[LATENT_QZM_KEY][rows], "qzv": tensors[LATENT_QZV_KEY][rows]}
        return {
            "x": tensors[X_KEY],
            "coords": tensors.get(SPATIAL_KEY),
            "requested": tensors.get(REQUESTED_KEY),
            "tissue_index": tensors.get(TISSUE_INDEX_KEY),
            "gene_index": tensors.get(GENE_INDEX_KEY),
            "perturbed_genes": tensors.get(PERTURBED_GENES_KEY),
        }

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        rows = _requested_rows(tensors)
        batch = tensors.get(BATCH_KEY)
        batch = batch.view(-1).long()[rows] if batch is not None else None
        cat_covs = tensors.get(CAT_COVS_KEY)
        size_factor = tensors.get(SIZE_FACTOR_KEY)
        batch_covariate = self.use_batch_covariate and bool(tensors.get(BATCH_COVARIATE_KEY, True))
        inputs = {
            "z": inference_outputs["z"],
            "perturbation": inference_outputs.get("perturbation"),
            "perturbed_genes": inference_outputs.get("perturbed_genes"),
            "batch_index": batch if batch_covariate else None,
            "cat_covs": None if cat_covs is None else cat_covs.long()[rows],
            "gene_index": tensors.get(GENE_INDEX_KEY),
            "matched_columns": tensors.get(MATCHED_COLUMNS_KEY),
            "batch_covariate": batch_covariate,
        }
        if self.training:  # the training loss reads the decoder's outputs, not `px`
            return inputs
        return {
            **inputs,
            "library": self.library_counts(tensors),
            "measured": self.measured_weights(tensors),
            "size_factor": None if size_factor is None else size_factor.view(-1, 1)[rows],
        }

    @auto_move_data
    def _regular_inference(
        self,
        x: torch.Tensor,
        coords: torch.Tensor | None = None,
        requested: torch.Tensor | None = None,
        n_samples: int = 1,
        hidden: torch.Tensor | None = None,
        tissue_index: torch.Tensor | None = None,
        gene_index: torch.Tensor | None = None,
        perturbed_genes: torch.Tensor | None = None,
    ) -> dict:
        """Encode one tissue of N cells; keep the ``requested`` rows (R of them) after the encoder.

        ``gene_index`` ((G,) long): the vocabulary row of each column of ``x`` (-1: ignored);
        ``None``: the columns are the vocabulary.

        ``hidden`` ((N,) bool, evaluation): cells whose counts are zeroed before the encoder, so
        their outputs come from their tissue alone (the niche read-out).

        Returns ``qz`` (a :class:`torch.distributions.Normal`, (R, L)), ``z`` ((R, L); in
        evaluation the posterior mean for ``n_samples=1``, else ``n_samples`` draws,
        (S, R, L)), ``qz_m``/``qz_v``, the pre-latent state ``h`` (R, d), the latent ``loss``,
        per-cell ``kl``, class ``logits`` (with a head) and, in training, the input ``mask``.

        ``tissue_index`` ((N,) long, 0..T-1; a packed training step of T tissues): every tissue
        is masked, scaled, attended over and given its latent loss as if it were alone (the
        latent ``loss`` is the mean over tissues).

        ``perturbed_genes`` ((N, P) long, vocabulary rows, -1: none): the perturbation each
        cell is put under, added to its token before the encoder.
        """
        if x.layout == torch.sparse_csc or x.layout == torch.sparse_coo:
            x = x.to_sparse_csr()
        tissues = None
        if tissue_index is not None:
            if requested is not None:
                raise ValueError(
                    "A packed minibatch (tissue_index) cannot select requested rows: inference "
                    "reads one tissue per step."
                )
            tissues = TissueSegments.from_index(tissue_index.to(x.device))
        mask = None
        if self.training and self.mask_cell_rate > 0 and self.mask_gene_rate > 0:
            rates = (self.mask_cell_rate, self.mask_gene_rate, x.device, self.hide_cell_rate)
            if tissues is None:
                mask = sample_mask(x.shape[0], x.shape[1], *rates)
            else:  # one mask per tissue, drawn as for it alone
                rows = tissues.rows()
                mask = join_masks([sample_mask(len(r), x.shape[1], *rates) for r in rows], rows)
            x = apply_mask(x, mask)
        if hidden is not None:
            cells = hidden.view(-1).bool().nonzero().view(-1)  # (M,)
            entries = torch.ones(len(cells), x.shape[1], dtype=torch.bool, device=x.device)
            x = apply_mask(x, TissueMask(cells, entries, len(cells)))
        pe_coords = None
        if self.use_spatial_pe and coords is not None:
            pe_coords = scale_coordinates(coords.float(), tissues)
        spatial = None  # (N, grid^2) kernel features of the local heads
        if self.n_local_heads and coords is not None:
            spatial = spatial_kernel_features(coords, self.local_grid, tissues)
        h = self.embedder(x, gene_index, pe_coords)  # (N, d)
        offset = None
        if perturbed_genes is not None:  # the cells' tokens under the perturbation
            offset = self.perturbation_encoder(self.embedder.feat_enc.emb, perturbed_genes)
            h = h + offset  # (N, d)
        h = self.encode(h, tissues, spatial)  # (N, d): each cell saw its tissue
        if requested is not None:
            h = h[requested.view(-1).bool()]  # (R, d)
            if offset is not None:
                offset = offset[requested.view(-1).bool()]
                perturbed_genes = perturbed_genes[requested.view(-1).bool()]
        out = self.latent(h, tissues)
        if offset is not None:  # (R, d), (R, P): the decoder is told the perturbation too
            out["perturbation"], out["perturbed_genes"] = offset, perturbed_genes
        out["h"] = h
        out["mask"] = mask
        if self.classifier is not None:
            out["logits"] = self.classifier(h)
        return self._posterior(out, n_samples)

    def encode_float(
        self,
        h: torch.Tensor,
        tissues: TissueSegments | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, d) embeddings -> (N, d) pre-latent states: Flowformer, then LayerNorm. The
        forward calls it through :meth:`encode` (which runs the int8 wrapper instead inside
        :meth:`int8_inference`, see :mod:`cellplm_scvi.nn._int8`)."""
        return self.pre_latent_norm(self.encoder(h, tissues, spatial))

    @torch.inference_mode()
    def niche_inference(self, tensors: dict, seed: int = 0) -> torch.Tensor:
        """(R, L) niche latent of the requested rows of one tissue minibatch.

        A cell's niche latent is its posterior mean when its own counts are hidden, so it is
        read from the rest of its tissue through the encoder's attention (the state the hidden
        cells of the training objective are reconstructed from). The tissue's N cells are
        dealt into ``max(2, ceil(1 / hide_cell_rate))`` disjoint random groups; pass ``k`` hides
        group ``k`` and keeps the latents of its cells. The random draws are seeded by ``seed``
        and the tissue code (the same for any requested subset).
        """
        inputs = self._get_inference_input(tensors)
        requested = inputs.pop("requested")
        inputs.pop("tissue_index", None)
        n_cells = tensors[X_KEY].shape[0]
        n_passes = max(2, math.ceil(1.0 / self.hide_cell_rate)) if self.hide_cell_rate else 2
        code = int(tensors[TISSUE_KEY].view(-1)[0]) if TISSUE_KEY in tensors else 0
        rng = np.random.default_rng([int(seed), code])
        group = torch.from_numpy(rng.permutation(n_cells) % n_passes)  # (N,)
        niche = None
        for k in range(n_passes):
            hidden = group == k
            qz_m = self._regular_inference(**inputs, hidden=hidden)["qz_m"]
            niche = torch.zeros_like(qz_m) if niche is None else niche
            rows = hidden.to(qz_m.device)
            niche[rows] = qz_m[rows]  # (N, L)
        return niche if requested is None else niche[requested.view(-1).bool().to(niche.device)]

    @auto_move_data
    def _cached_inference(self, qzm: torch.Tensor, qzv: torch.Tensor, n_samples: int = 1) -> dict:
        """Minified data: the stored posterior of each cell replaces the encoder."""
        return self._posterior({"qz_m": qzm, "qz_v": qzv, "z": qzm}, n_samples)

    def _posterior(self, out: dict, n_samples: int) -> dict:
        """Add ``qz``. Evaluation decodes the posterior mean (CellPLM's read-out) unless
        ``n_samples > 1`` or :meth:`sampling_posterior` is active."""
        for key in ("qz_m", "qz_v", "z", "h", "logits"):  # float32 results under autocast
            if key in out:
                out[key] = out[key].float()
        out["qz"] = Normal(out["qz_m"], out["qz_v"].sqrt())
        if not self.training and (n_samples > 1 or self._sample_posterior):
            z = out["qz"].sample((n_samples,))  # (S, R, L)
            out["z"] = z[0] if n_samples == 1 else z
        return out

    @contextmanager
    def sampling_posterior(self):
        """In evaluation, draw ``z ~ q(z|x)`` instead of using its mean (``give_mean=False``)."""
        previous, self._sample_posterior = self._sample_posterior, True
        try:
            yield
        finally:
            self._sample_posterior = previous

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
        measured: torch.Tensor | None = None,
        size_factor: torch.Tensor | None = None,
        transform_batch: int | None = None,
        gene_index: torch.Tensor | None = None,
        matched_columns: torch.Tensor | None = None,
        batch_covariate: bool = True,
        perturbation: torch.Tensor | None = None,
        perturbed_genes: torch.Tensor | None = None,
    ) -> dict:
        """Decode ``z`` ((R, L) or (S, R, L)) to the NB of every input gene.

        ``perturbation`` ((R, d)): the token offset of the perturbation the cells are under, and
        ``perturbed_genes`` ((R, P)) its genes; they shift ``z`` and each gene's log mean (see
        :class:`~cellplm_scvi.nn.PerturbationEncoder`).

        ``gene_index``/``matched_columns``: the minibatch's gene layout (``None``: the columns
        are the vocabulary); ``batch_covariate=False``: its batches are not the decoder's.

        Returns ``px`` (in evaluation: :class:`scvi.distributions.NegativeBinomial` over the
        input columns, float32: ``scale`` sums to one over the decoded genes,
        ``mu = scale * library size``; genes outside the vocabulary have ``mu = 0``; ``None``
        in training, whose loss needs only the rest), and the decoder's own ``px_mean``
        (.., G_matched) and ``px_theta`` (G_matched,).
        """
        if perturbation is not None:
            z = z + self.perturbation_encoder.to_latent(perturbation).to(z.dtype)  # (.., R, L)
        n_rows = z.shape[-2]
        if transform_batch is not None:
            if not (self.use_batch_covariate and batch_covariate):
                raise ValueError(
                    "transform_batch needs a decoder batch covariate; this model has none (one "
                    "batch, or official weights whose batch table indexes pretraining samples)."
                )
            batch_index = torch.full((n_rows,), int(transform_batch), device=z.device)
        covariates = {}
        if batch_index is not None:
            covariates["batch"] = batch_index
        decoder_index = None if gene_index is None else gene_index[matched_columns]
        if cat_covs is not None:
            covariates.update(
                {k: cat_covs[:, i] for i, k in enumerate(self.categorical_covariates)}
            )
        if z.dim() == 3:  # posterior samples: decode (S * R, L), the decoder's norms are 2-D
            n_samples = z.shape[0]
            covariates = {k: v.repeat(n_samples) for k, v in covariates.items()}
            mean, theta = self.decoder(z.reshape(-1, z.shape[-1]), covariates, decoder_index)
            mean = mean.view(n_samples, n_rows, -1)
        else:
            mean, theta = self.decoder(z, covariates or None, decoder_index)
        if perturbation is not None:  # (R, G_matched) shift of each gene's log mean
            shift = self.perturbation_encoder.gene_shift(
                perturbation, perturbed_genes.to(perturbation.device), decoder_index
            )
            mean = (mean * shift.exp().to(mean.dtype)).clamp(1e-5, 1e6)
        px = None  # training: the loss needs only the decoder's mean and dispersion
        if not self.training:
            columns = None if gene_index is None else (len(gene_index), matched_columns)
            px = self._px(mean.float(), theta.float(), library, measured, size_factor, columns)
        return {
            "px": px,
            "px_mean": mean,
            "px_theta": theta,
        }

    def _px(self, mean, theta, library, measured, size_factor, columns) -> NegativeBinomial:
        """NB of the input columns, mean rescaled as in :func:`masked_nb_loss`. ``columns``:
        ``(G, matched_columns)`` of the minibatch's gene layout, or ``None``."""
        scale = mean / mean.sum(-1, keepdim=True)
        if size_factor is not None:
            lib = size_factor
        elif library is None:
            lib = torch.ones_like(scale[..., :1])
        elif measured is None:
            lib = library
        else:  # the measured genes' share of the mean carries the observed total
            lib = library / (scale * measured.to(scale.dtype)).sum(-1, keepdim=True).clamp_min(
                1e-12
            )
        mu = scale * lib
        if columns is not None:  # back to the input columns, 0 outside the vocabulary
            n_genes, matched = columns
            full = mean.new_zeros((*mean.shape[:-1], n_genes))
            scale, mu = (full.index_copy(-1, matched, t) for t in (scale, mu))
            theta = theta.new_ones(n_genes).index_copy(0, matched, theta)
        return NegativeBinomial(mu=mu, theta=theta.expand_as(mu), scale=scale)

    def observed_counts(
        self, x: torch.Tensor, matched_columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense counts of the input columns that the decoder reconstructs (``matched_columns``
        of the minibatch's gene layout; ``None``: all)."""
        x = x.to_dense() if x.is_sparse or x.layout != torch.strided else x
        return x if matched_columns is None else x[:, matched_columns.to(x.device)]

    def library_counts(self, tensors: dict) -> torch.Tensor:
        """(R, 1) observed count total of each requested cell over its measured decoded genes."""
        if OBSERVED_LIB_SIZE_KEY in tensors:  # minified data: stored by `minify_adata`
            return tensors[OBSERVED_LIB_SIZE_KEY].view(-1, 1).float()[_requested_rows(tensors)]
        x = self.observed_counts(tensors[X_KEY], tensors.get(MATCHED_COLUMNS_KEY))
        x = x.float()[_requested_rows(tensors)]
        measured = self.measured_weights(tensors)
        if measured is not None:
            x = x * measured.to(x.device, x.dtype)
        return x.sum(1, keepdim=True)

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """The ``objective``'s loss (see the class docstring).

        ``"pretrain"``: masked NB loss on masked cells (+ DAE term), latent loss and, with
        labels, the cross-entropy of labelled cells. In evaluation (no mask) every requested
        cell enters the NB loss and there is no DAE term. Rows outside a minibatch's
        ``"loss_mask"`` enter no term. A packed step (``"tissue_index"``, T tissues) gets the
        mean over tissues of these losses, each tissue's NB and cross-entropy terms averaged over
        its own cells (the latent loss is already per tissue, see the latent layers).
        """
        rows = _requested_rows(tensors)
        # float32 even under autocast: bf16 holds integers exactly only up to 256
        matched = tensors.get(MATCHED_COLUMNS_KEY)
        perturbed = PERTURBED_X_KEY in tensors  # target: cells of the condition, all rows
        x = tensors[PERTURBED_X_KEY] if perturbed else tensors[X_KEY]
        x = self.observed_counts(x, matched).float()[rows]
        mean, theta = generative_outputs["px_mean"].float(), generative_outputs["px_theta"].float()
        if mean.dim() == 3:
            raise ValueError("loss() takes one posterior sample (n_samples=1).")
        measured = self.measured_weights(tensors)  # (R, G_matched) or None
        mask: TissueMask | None = inference_outputs.get("mask")
        in_loss = self.loss_rows(tensors)  # (R,) bool or None
        cells = None  # rows in the NB loss (None: all)
        if mask is not None and self.objective == "pretrain" and not perturbed:
            cells = mask.cells
        if in_loss is not None:
            cells = in_loss if cells is None else cells[in_loss[cells]]  # masked, in the loss
        cells = slice(None) if cells is None else cells
        entries = None  # hidden entries of the masked cells, for the DAE term
        if mask is not None and self.dae and self.objective == "pretrain" and not perturbed:
            entries = mask.entries
            if matched is not None:
                entries = entries[:, matched.to(entries.device)]
            if in_loss is not None:
                entries = entries[in_loss[mask.cells]]
        if measured is not None:
            measured = measured[cells]
            entries = None if entries is None else entries & measured
        recon = masked_nb_loss(x[cells], mean[cells], theta, entries, measured)
        kl = inference_outputs.get("kl")
        if kl is None:  # evaluation: one-sample estimate of KL(q(z|x) || p(z)) per cell
            z = inference_outputs["qz"].sample()
            kl = inference_outputs["qz"].log_prob(z).sum(-1) - self.log_prior(z)
        kl = kl[cells]
        latent_loss = inference_outputs.get("loss", torch.zeros((), device=recon.device))
        extra = {"latent_loss": latent_loss.detach()}
        ce = self.classification_loss(tensors, inference_outputs)
        if self.objective == "annotation":  # official head: its cross-entropy is the loss
            logits = inference_outputs["logits"]
            loss = logits.sum() * 0.0 if ce is None else ce  # no labelled row: no gradient
            recon, kl = recon.detach(), kl.detach()
        else:
            tissue_index = tensors.get(TISSUE_INDEX_KEY)
            if tissue_index is None:
                recon_mean = recon.mean() if recon.numel() else recon.sum()
            else:  # packed step: the mean over tissues of each one's mean over its cells
                tissue_index = tissue_index.view(-1).long().to(recon.device)
                n_tissues = int(tissue_index.max()) + 1
                recon_mean = segment_mean(recon, tissue_index[cells], n_tissues).mean()
            loss = recon_mean + kl_weight * latent_loss
            if ce is not None:
                loss = loss + self.classification_ratio * ce
        if ce is not None:
            extra["classification_loss"] = ce.detach()
        return LossOutput(loss=loss, reconstruction_loss=recon, kl_local=kl, extra_metrics=extra)

    def loss_rows(self, tensors: dict) -> torch.Tensor | None:
        """(R,) bool: the requested rows inside the minibatch's ``"loss_mask"``, or ``None``."""
        loss_mask = tensors.get(LOSS_MASK_KEY)
        if loss_mask is None:
            return None
        return loss_mask.view(-1).bool()[_requested_rows(tensors)]

    def measured_weights(self, tensors: dict) -> torch.Tensor | None:
        """(R, G_matched) bool: the genes each requested cell measured, or ``None``: the
        minibatch's own ``"measured"`` mask ((G,) for all its cells, or (N, G); corpus files;
        (T, G), one row per tissue, in a packed step), else the row of the cell's batch in
        its gene layout's ``"measured_genes"``."""
        matched = tensors.get(MATCHED_COLUMNS_KEY)
        measured = tensors.get(MEASURED_KEY)
        if measured is not None:
            measured = measured.bool()
            if TISSUE_INDEX_KEY in tensors and measured.dim() == 2:  # packed: (T, G)
                measured = measured[tensors[TISSUE_INDEX_KEY].view(-1).long()]
            elif measured.dim() == 1 or measured.shape[0] == 1:
                n = tensors[X_KEY].shape[0]
                measured = measured.view(1, -1).expand(n, -1)
            rows = measured[_requested_rows(tensors)]
            return rows if matched is None else rows[:, matched.to(rows.device)]
        table = tensors.get(MEASURED_TABLE_KEY)
        if table is None:
            return None
        batch = tensors[BATCH_KEY].view(-1).long()[_requested_rows(tensors)]
        rows = table.bool()[batch.to(table.device)]
        return rows if matched is None else rows[:, matched.to(rows.device)]

    def classification_loss(self, tensors: dict, inference_outputs: dict) -> torch.Tensor | None:
        """Mean cross-entropy over cells with a known label (code < n_labels) inside the
        ``"loss_mask"``, or ``None``."""
        if self.classifier is None or LABELS_KEY not in tensors:
            return None
        labels = tensors[LABELS_KEY].view(-1).long()[_requested_rows(tensors)]
        known = labels < self.n_labels
        in_loss = self.loss_rows(tensors)
        if in_loss is not None:
            known = known & in_loss.to(known.device)
        if not known.any():
            return None
        logits = inference_outputs["logits"][known]
        tissue_index = tensors.get(TISSUE_INDEX_KEY)
        if tissue_index is None:
            return nn.functional.cross_entropy(logits, labels[known])
        # packed step: the mean over tissues of each one's cross-entropy (0 with no label)
        tissue_index = tissue_index.view(-1).long().to(known.device)
        per_cell = nn.functional.cross_entropy(logits, labels[known], reduction="none")
        n_tissues = int(tissue_index.max()) + 1
        return segment_mean(per_cell, tissue_index[known], n_tissues).mean()

    @torch.inference_mode()
    def sample(
        self, tensors: dict, n_samples: int = 1, generative_kwargs: dict | None = None
    ) -> torch.Tensor:
        """Posterior predictive counts of the requested cells at the library-rescaled NB mean:
        (R, G) for ``n_samples=1``, else (R, G, n_samples) (scvi-tools' layout)."""
        _, gen = self.forward(
            tensors,
            inference_kwargs={"n_samples": n_samples},
            generative_kwargs=generative_kwargs,
            compute_loss=False,
        )
        counts = gen["px"].sample().cpu()
        return counts if n_samples == 1 else counts.permute(1, 2, 0)

    @torch.inference_mode()
    def marginal_ll(
        self, tensors: dict, n_mc_samples: int = 1000, return_mean: bool = False, **kwargs
    ) -> torch.Tensor | float:
        """Importance-sampled ``log p(x)`` of the requested cells, proposal ``q(z|x)`` (for the
        GMVAE, the Gaussian of the most likely cluster) and the model's prior on ``z``."""
        inf, _ = self.forward(tensors, compute_loss=False)
        qz = inf["qz"]
        gen_inputs = self._get_generative_input(tensors, inf)
        cols = tensors.get(MATCHED_COLUMNS_KEY)
        x = self.observed_counts(tensors[X_KEY], cols).float()[_requested_rows(tensors)]
        log_w = []
        for _ in range(n_mc_samples):
            z = qz.sample()
            px = self.generative(**{**gen_inputs, "z": z})["px"]
            mu, theta = px.mu, px.theta
            if cols is not None:
                mu, theta = mu[:, cols.to(mu.device)], theta[:, cols.to(mu.device)]
            log_px = -nb_nll(x, mu, theta)
            measured = gen_inputs["measured"]
            log_px = (log_px if measured is None else log_px * measured.to(x.dtype)).sum(-1)
            log_w.append(log_px + self.log_prior(z) - qz.log_prob(z).sum(-1))
        log_w = torch.stack(log_w)  # (n_mc, R)
        ll = torch.logsumexp(log_w, 0) - math.log(n_mc_samples)
        return ll.mean().item() if return_mean else ll.cpu()

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """(R, L) -> (R,) ``log p(z)``: N(0, I) for the VAE; for the GMVAE the uniform mixture
        of the K cluster priors ``p(z|y=k)``."""
        layer = self.latent.layers[1]
        if self.latent_type == "vae":
            return Normal(0.0, 1.0).log_prob(z).sum(-1)
        onehot = torch.eye(layer.n_clusters, device=z.device, dtype=z.dtype)  # (K, K)
        mu, var = layer.prior(onehot)  # (K, L) each
        log_k = Normal(mu, var.sqrt()).log_prob(z[:, None, :]).sum(-1)  # (R, K)
        return torch.logsumexp(log_k, 1) - math.log(layer.n_clusters)


def _requested_rows(tensors: dict) -> torch.Tensor | slice:
    """Rows of a minibatch that the caller asked for (all rows in training)."""
    requested = tensors.get(REQUESTED_KEY)
    return slice(None) if requested is None else requested.view(-1).bool()
