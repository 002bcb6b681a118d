"""Named presets: the defaults of ``CellPLM(adata)`` that depend on the registered data.

A preset fills the arguments left at ``None`` (and the module's local heads when not given);
an explicit argument always wins. ``CellPLM(adata)`` resolves it once, in ``__init__``, records
its name in ``init_params_`` (so a saved model is rebuilt with the same one) and shows it in the
model summary:

- ``"official"``: the authors' objective. 75% of a tissue's cells masked, none hidden whole
  (``hide_cell_rate=0``), the Gaussian-mixture latent (``"gmvae"``), no local heads, the
  registered tissues in every epoch, learning rate 5e-4 held to the end. The preset of
  :meth:`CellPLM.load_official`, and the default on coordinates with ``hide_cell_rate=0``.
- ``"dissociated"``: a from-scratch model of cells without coordinates (scRNA-seq): every cell
  masked (``mask_cell_rate=1``, so every cell enters the loss), the Gaussian latent, a learning
  rate of 2e-3 falling to 10% over the last 20% of the run. The default without coordinates.
- ``"spatial"``: a from-scratch model that reads niches (benchmarks/README.md, "Niche
  context"). Every cell masked, 30% of them hidden whole and reconstructed from their tissue,
  the Gaussian latent (the mixture cost cell identity there), half of the heads attending
  through a spatial kernel of 7 anchors per side, training tissues redrawn every epoch where
  the slides are known, and the learning rate of ``"dissociated"``. The default on registered
  coordinates, unless ``hide_cell_rate=0`` is given.

A from-scratch Gaussian latent's KL weight rises to 0.5 over the first 75% of the run
(:func:`cellplm_scvi.model._training.kl_warmup_kwargs`). Why these values, and what they gave
against SCVI: docs/user_guide.md, "Presets", and benchmarks/results/2026-12-07-defaults.md.

The spatial encoding (``spatial_pe=None``) is on where coordinates are registered and no cell
is hidden, whatever the preset: it degraded the niche read-out of cell-hiding models.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._constants import SPATIAL_KEY


@dataclass(frozen=True)
class Preset:
    """The data-dependent defaults of one named configuration.

    Attributes
    ----------
    name
        ``"official"``, ``"dissociated"`` or ``"spatial"``.
    mask_cell_rate
        Default fraction of a tissue's cells masked at a training step
        (``CellPLM(mask_cell_rate=None)``).
    hide_cell_rate
        Default fraction of the masked cells hidden whole (``CellPLM(hide_cell_rate=None)``).
    latent
        Default latent layer (``CellPLM(latent=None)``).
    local_heads
        Whether half of the heads attend through the spatial kernel (module arguments
        ``n_local_heads``, ``local_grid`` when not given).
    local_grid
        Anchors per side of that kernel's lattice.
    redraw_tissues
        Default of ``train(redraw_tissues=None)`` where the slides are known.
    lr
        Default of ``train(lr=None)``.
    lr_decay_share
        Share of the run's last steps over which the learning rate falls linearly to 10%
        (``train(plan_kwargs={"lr_decay_share": ...})`` replaces it).
    """

    name: str
    mask_cell_rate: float
    hide_cell_rate: float
    latent: str
    local_heads: bool
    local_grid: int | None
    redraw_tissues: bool
    lr: float
    lr_decay_share: float


PRESETS = {
    "official": Preset("official", 0.75, 0.0, "gmvae", False, None, False, 5e-4, 0.0),
    "dissociated": Preset("dissociated", 1.0, 0.0, "vae", False, None, False, 2e-3, 0.2),
    "spatial": Preset("spatial", 1.0, 0.3, "vae", True, 7, True, 2e-3, 0.2),
}


def resolve_preset(preset: str | None, has_coords: bool, hide_cell_rate: float | None) -> Preset:
    """The preset of a model: ``preset`` by name, or for ``None`` the one the data call for
    (on registered coordinates ``"spatial"``, or ``"official"`` with ``hide_cell_rate=0``;
    without them ``"dissociated"``)."""
    if preset is None and not has_coords:
        preset = "dissociated"
    elif preset is None:
        preset = "official" if hide_cell_rate == 0 else "spatial"
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}.")
    if preset == "spatial" and not has_coords:
        raise ValueError(
            'preset="spatial" needs coordinates: call setup_anndata(spatial_key=...), or use '
            'preset="official".'
        )
    return PRESETS[preset]


def module_defaults(
    preset: Preset, n_heads: int, module_kwargs: dict, latent: str | None = None
) -> dict:
    """``module_kwargs`` with the preset's local heads filled in where not given, and, for a
    ``"vae"`` latent outside the ``"official"`` preset, the official 10,000-step KL warm-up
    off (``kl_warmup_steps=0``) unless given: ``train`` then warms the KL up over a share of
    the run's own length (:func:`cellplm_scvi.model._training.kl_warmup_kwargs`)."""
    if preset.local_heads:  # half of the heads attend through the spatial kernel
        module_kwargs.setdefault("n_local_heads", n_heads // 2)
        module_kwargs.setdefault("local_grid", preset.local_grid)
    if latent == "vae" and preset.name != "official":
        latent_kwargs = dict(module_kwargs.get("latent_kwargs") or {})
        latent_kwargs.setdefault("kl_warmup_steps", 0)
        module_kwargs["latent_kwargs"] = latent_kwargs
    return module_kwargs


def resolve_spatial_pe(spatial_pe: bool | None, has_coords: bool, hide_cell_rate: float) -> bool:
    """``CellPLM(spatial_pe=None)`` resolved: on where coordinates are registered and no cell is
    hidden (the encoding hurt the niche read-out of cell-hiding models)."""
    if spatial_pe is None:
        return has_coords and not hide_cell_rate
    if spatial_pe and not has_coords:
        raise ValueError("spatial_pe=True needs coordinates: call setup_anndata(spatial_key=...).")
    return spatial_pe


def resolve_redraw_tissues(
    preset: Preset, setup_args: dict, redraw_tissues: bool | int | None
) -> bool | int:
    """``train(redraw_tissues=...)`` resolved: ``None`` is the preset's choice where the slides
    are known (``library_key``, or computed tissues: one slide), else off."""
    has_coords = setup_args.get("spatial_key") is not None
    if redraw_tissues is None:
        slides = setup_args.get("library_key") is not None or setup_args.get("tissue_key") is None
        redraw_tissues = preset.redraw_tissues and slides
    if redraw_tissues and not has_coords:
        raise ValueError(
            "redraw_tissues=True needs coordinates: call setup_anndata(spatial_key=...)."
        )
    return redraw_tissues if redraw_tissues else False


def saved_init_params(attributes: dict) -> dict:
    """Attributes read from a model file, with the ``init_params_`` of a file saved before
    presets completed: such a file records no preset, and the local heads only where its model
    had them (files older than the local heads have none), so ``n_local_heads`` defaults to 0
    there and the preset is resolved as it was then (without coordinates: ``"official"``)."""
    params = attributes.get("init_params_")
    if not isinstance(params, dict) or not isinstance(params.get("kwargs"), dict):
        return attributes
    if params.get("non_kwargs", {}).get("preset") is None:
        params["kwargs"].setdefault("module_kwargs", {}).setdefault("n_local_heads", 0)
        fields = (attributes.get("registry_") or {}).get("field_registries", {})
        if SPATIAL_KEY not in fields:
            params.setdefault("non_kwargs", {})["preset"] = "official"
    return attributes
