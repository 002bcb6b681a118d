"""Genes outside a model's vocabulary as new rows: :meth:`CellPLM.extend_vocabulary`.

An extended vocabulary is the old one followed by the new genes. The model built with it reads
its AnnData through a wider :class:`~cellplm_scvi._vocabulary.GeneLayout` (the new genes now
match rows), and its gene-embedding table and decoder have one more row per new gene. The new
rows start so that the model computes what it did on the old genes:

- **embedding rows of zeros.** A cell's token sums its genes' rows weighted by ``log1p`` of
  the counts, so the new genes add exactly nothing: every latent is the old one, bit for bit.
- **decoder rows near the NB head's floor.** Zero weights and the bias
  :data:`NEW_GENE_LOGIT` give each new gene the constant mean ``1.1e-5``, just above the head's
  clamp at ``1e-5`` (at the clamp itself no gradient would reach them). The old genes' means
  are unchanged; their share of the decoded total shrinks by the new genes' share, one common
  factor ``S / (S + 1.1e-5 n_new)`` per cell (``S``: the old genes' summed mean), so their
  expression relative to each other is unchanged.
- **dispersions:** the median of the old genes'.
- **a perturbation model's per-gene shifts:** zero rows (no perturbation moves a new gene).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .._genes import _strip_ensembl, to_ensembl
from .._vocabulary import column_genes
from ..nn._decoder import MEAN_FLOOR
from ..official._mixin import model_vocabulary
from ._query import _freeze

if TYPE_CHECKING:
    from ._cellplm import CellPLM

logger = logging.getLogger("cellplm_scvi")

NEW_GENE_LOGIT = math.log(MEAN_FLOOR) + 0.1  # a new gene's decoder bias: mean 1.1e-5
EMBEDDING = "embedder.feat_enc.emb"
DECODER_WEIGHT = "decoder.out_layer.dec_mean.0.weight"
DECODER_BIAS = "decoder.out_layer.dec_mean.0.bias"
DISPERSION = "decoder.out_layer.dec_disp"
VOCABULARY_ROWS = (EMBEDDING, DECODER_WEIGHT, DECODER_BIAS, DISPERSION)  # one row per gene
# a perturbation model's per-gene log-mean shifts (setup_anndata(perturbation_key=)): zero rows,
# so no perturbation moves a new gene until it is trained
PERTURBATION_ROWS = ("perturbation_encoder.to_genes.weight", "perturbation_encoder.to_genes.bias")
# model attributes the extended model builds anew (it copies the others: training state,
# history, the official config)
_REBUILT = ("init_params_", "registry_", "registry_built_")


def _unmatched(model: CellPLM) -> tuple[list[str], list[str]]:
    """The registered AnnData's genes outside the vocabulary (names as ``column_genes`` gives
    them, in column order), and among them those that name a vocabulary gene another column
    already matched (e.g. a symbol next to its own Ensembl ID)."""
    layout = model._gene_layout
    if layout is None or layout.gene_index is None:  # the columns are the vocabulary
        return [], []
    names = column_genes(model.adata, _gene_key(model))
    unmatched = [names.iloc[i] for i in layout.unmatched_columns if names.iloc[i] is not None]
    in_vocabulary = _in_vocabulary(unmatched, model_vocabulary(model))
    return unmatched, [g for g, known in zip(unmatched, in_vocabulary) if known]


def _gene_key(model: CellPLM) -> str | None:
    """The ``adata.var`` column the model matched its genes by (``None``: ``var_names``)."""
    gene_key = model.init_params_["non_kwargs"].get("gene_key")
    return model.registry_["setup_args"].get("gene_key") if gene_key is None else gene_key


def _in_vocabulary(genes: list[str], vocabulary: list[str]) -> list[bool]:
    """Whether each gene names a vocabulary entry, as :func:`~cellplm_scvi._genes.align_genes`
    matches them: as is, as an Ensembl ID without its version, or as a symbol of one."""
    entries = set(vocabulary)
    return [g in entries or e in entries for g, e in zip(genes, to_ensembl(genes))]


def new_vocabulary_entries(model: CellPLM, genes: Sequence[str] | None) -> list[str]:
    """The vocabulary entries that :meth:`CellPLM.extend_vocabulary` adds for ``genes``
    (``None``: every unmatched gene of the registered AnnData): each gene's name, an Ensembl ID
    without its version. Raises for anything that cannot be added."""
    if model.minified_data_type is not None:
        raise ValueError(
            "extend_vocabulary needs the counts of the new genes, which a minified AnnData has "
            "not. Load the model with the full AnnData: CellPLM.load(dir_path, adata=full_adata)."
        )
    if model.adata is None:
        raise ValueError(
            "This model was built from a data module's registry (e.g. TissueCorpus): its "
            "vocabulary is the corpus' genes and it has no AnnData whose genes could be added. "
            "Build the corpus with the wider vocabulary instead."
        )
    unmatched, known = _unmatched(model)
    key = _gene_key(model)
    where = "adata.var_names" if key is None else f"adata.var[{key!r}]"
    if genes is None:
        genes = [g for g in unmatched if g not in set(known)]
        if known:
            logger.info(
                "%d unmatched gene(s) name a vocabulary gene that another column already "
                "matched and are not added: %s",
                len(known),
                known[:5],
            )
        if not genes:
            raise ValueError(
                f"Every gene of the registered AnnData ({where}) is in the model's vocabulary "
                f"of {model.module.n_vocab} genes: there is no gene to add."
            )
    else:
        if isinstance(genes, str):
            raise TypeError(f"genes must be a list of gene names, not the string {genes!r}.")
        genes = [str(g) for g in genes]
        if not genes:
            raise ValueError(
                "genes is empty: pass the genes to add, or genes=None for every gene of the "
                "registered AnnData outside the vocabulary."
            )
        duplicated = sorted(g for g, n in Counter(genes).items() if n > 1)
        if duplicated:
            raise ValueError(f"genes lists {duplicated[:5]} more than once.")
        already = [g for g, k in zip(genes, _in_vocabulary(genes, model_vocabulary(model))) if k]
        if already:
            raise ValueError(
                f"{already[:5]} ({len(already)} in all) are in the model's vocabulary already: "
                "pass only genes outside it (model.matched_genes lists the matched ones)."
            )
        absent = sorted(set(genes) - set(unmatched))
        if absent:
            raise KeyError(
                f"{absent[:5]} ({len(absent)} in all) are not genes of the registered AnnData "
                f"({where}): the new rows are trained on its counts, so each new gene must be "
                "one of its genes outside the vocabulary."
            )
    entries = [_strip_ensembl(g) or g for g in genes]
    clashes = sorted(g for g, n in Counter(entries).items() if n > 1)
    if clashes:
        raise ValueError(
            f"Several genes are versions of the same Ensembl ID {clashes[:5]}: make "
            f"{where} unique without the version suffixes first."
        )
    return entries


def extend(model: CellPLM, genes: Sequence[str] | None, train_new_genes_only: bool) -> CellPLM:
    """The model with ``genes`` as new vocabulary rows (see :meth:`CellPLM.extend_vocabulary`)."""
    if not isinstance(train_new_genes_only, bool):
        raise ValueError(
            f"train_new_genes_only must be True or False, got {train_new_genes_only!r}."
        )
    entries = new_vocabulary_entries(model, genes)
    old_vocabulary = model_vocabulary(model)
    params = copy.deepcopy(model.init_params_)
    params["non_kwargs"]["vocabulary"] = old_vocabulary + entries
    kwargs = {k: v for group in params["kwargs"].values() for k, v in group.items()}
    extended = type(model)(model.adata, **params["non_kwargs"], **kwargs)
    extended.module.load_state_dict(widened_state(model.module.state_dict(), len(entries)))
    for name, value in vars(model).items():  # training state, history, official config
        if name.endswith("_") and not name.startswith("_") and name not in _REBUILT:
            setattr(extended, name, copy.deepcopy(value))
    if train_new_genes_only:
        n_old = len(old_vocabulary)
        _freeze(extended.module, dict.fromkeys(VOCABULARY_ROWS, n_old), False, False, True)
    extended.to_device(model.device)
    extended.module.eval()
    logger.info(
        "Added %d gene(s) to the vocabulary (%d -> %d rows): %s",
        len(entries),
        len(old_vocabulary),
        len(old_vocabulary) + len(entries),
        entries[:5],
    )
    return extended


def widened_state(state: dict[str, torch.Tensor], n_new: int) -> dict[str, torch.Tensor]:
    """``state`` with ``n_new`` rows appended to each per-gene tensor (see the module
    docstring for their values)."""
    out = dict(state)
    for key in VOCABULARY_ROWS + tuple(k for k in PERTURBATION_ROWS if k in state):
        old = state[key]
        if key == DECODER_BIAS:
            rows = old.new_full((n_new,), NEW_GENE_LOGIT)
        elif key == DISPERSION:
            rows = old.median().expand(n_new).clone()
        else:
            rows = old.new_zeros((n_new, *old.shape[1:]))
        out[key] = torch.cat([old, rows.to(old.dtype)])
    return out
