"""Offline gene-name handling: the CellPLM vocabulary and symbol -> Ensembl mapping.

CellPLM's pretrained checkpoints embed a fixed vocabulary of 19,374 human Ensembl gene IDs
(sorted, version-free). This module ships that vocabulary (inside the official model config)
and a GENCODE release 44 symbol table restricted to it, so that AnnData objects whose genes are
Ensembl IDs (with or without a version suffix) or HGNC symbols can be aligned to the vocabulary
without network access. See ``cellplm_scvi/resources/README.md`` for sources and licences.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("cellplm_scvi")

_RESOURCES = Path(__file__).resolve().parent / "resources"
_SYMBOL_TABLE = _RESOURCES / "gencode_v44_symbols.tsv.gz"
_CONFIG_SUFFIX = ".config.json.gz"

# An Ensembl gene ID (any species prefix: ENSG, ENSMUSG, ...), optionally followed by a version
# (".17") and GENCODE's pseudo-autosomal Y tag ("_PAR_Y"). Group 1 is the bare, stable ID.
_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?(?:_PAR_Y)?$")

__all__ = [
    "GeneAlignment",
    "align_genes",
    "available_configs",
    "official_config",
    "symbol_table",
    "to_ensembl",
]


# --------------------------------------------------------------------------------------------
# Vendored resources
# --------------------------------------------------------------------------------------------


def available_configs() -> list[str]:
    """Names of the official CellPLM configs vendored with the package.

    Returns
    -------
    list of str
        Sorted config names, e.g. ``["20230926_85M"]``.
    """
    return sorted(p.name[: -len(_CONFIG_SUFFIX)] for p in _RESOURCES.glob(f"*{_CONFIG_SUFFIX}"))


@lru_cache(maxsize=4)
def _load_config(name: str) -> dict[str, Any]:
    with gzip.open(_RESOURCES / f"{name}{_CONFIG_SUFFIX}", "rt", encoding="utf-8") as fh:
        return json.load(fh)


def official_config(name: str = "20230926_85M") -> dict[str, Any]:
    """Official CellPLM model configuration, as published next to the checkpoint.

    Parameters
    ----------
    name
        Checkpoint name; see :func:`available_configs`.

    Returns
    -------
    dict
        The full config: constructor arguments of the CellPLM model plus ``"gene_list"``, the
        checkpoint's gene vocabulary (sorted human Ensembl IDs without version). A fresh copy is
        returned on every call, so it may be modified freely.

    Raises
    ------
    ValueError
        If no config called ``name`` is vendored.
    """
    names = available_configs()
    if name not in names:
        raise ValueError(f"Unknown CellPLM config {name!r}; available: {names}.")
    return copy.deepcopy(_load_config(name))


@lru_cache(maxsize=1)
def _symbol_table() -> pd.DataFrame:
    return pd.read_csv(_SYMBOL_TABLE, sep="\t", dtype=str, keep_default_na=False, na_filter=False)


def symbol_table() -> pd.DataFrame:
    """GENCODE v44 gene symbol table restricted to the CellPLM vocabulary.

    Returns
    -------
    pandas.DataFrame
        Columns ``ensembl_id`` (version-free human Ensembl gene ID) and ``symbol`` (GENCODE
        gene name), one row per vocabulary gene, in GENCODE annotation order. A few genes
        without a name carry their Ensembl ID as ``symbol``; one symbol may occur on several
        rows (e.g. ``MKKS``). The file is parsed once and cached; a copy is returned.
    """
    return _symbol_table().copy()


@lru_cache(maxsize=1)
def _symbol_maps() -> tuple[dict[str, str], dict[str, str]]:
    """``symbol -> ensembl_id`` (exact) and ``SYMBOL.upper() -> ensembl_id``; first row wins."""
    table = _symbol_table()
    exact: dict[str, str] = {}
    upper: dict[str, str] = {}
    for ens, sym in zip(table["ensembl_id"], table["symbol"]):
        exact.setdefault(sym, ens)
        upper.setdefault(sym.upper(), ens)
    return exact, upper


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------


def _strip_ensembl(gene: str) -> str | None:
    match = _ENSEMBL_RE.match(gene.upper())
    return match.group(1) if match else None


def to_ensembl(genes: Sequence[str]) -> np.ndarray:
    """Map gene names to version-free Ensembl gene IDs, offline.

    Each entry is resolved independently:

    1. An Ensembl gene ID (``ENSG00000141510``, ``ENSG00000141510.17``,
       ``ENSG00000182378.14_PAR_Y``; case-insensitive) is returned without its version or
       ``_PAR_Y`` tag, whether or not it occurs in the symbol table.
    2. Otherwise the (whitespace-stripped) name is looked up as a gene symbol in
       :func:`symbol_table`, first case-sensitively, then by its upper-case form (so ``tp53``
       or ``Tp53`` resolve to human ``TP53``; this is a spelling fallback, not an orthology
       mapping).
    3. Anything else (unknown symbols, non-string entries such as ``NaN``) gives ``None``.

    A symbol that names several Ensembl IDs resolves to the one on the first row of
    :func:`symbol_table` (GENCODE v44 annotation order), e.g. ``MKKS`` -> ``ENSG00000125863``.
    Only symbols of genes in the CellPLM vocabulary are known.

    Parameters
    ----------
    genes
        Gene names, e.g. ``adata.var_names`` or a ``var`` column.

    Returns
    -------
    numpy.ndarray
        Object array of the same length as ``genes`` holding Ensembl IDs (``str``) or ``None``.
    """
    exact, upper = _symbol_maps()
    out = np.empty(len(genes), dtype=object)
    for i, gene in enumerate(genes):
        if not isinstance(gene, str):
            out[i] = None
            continue
        name = gene.strip()
        ens = _strip_ensembl(name)
        if ens is None:
            ens = exact.get(name)
        if ens is None:
            ens = upper.get(name.upper())
        out[i] = ens
    return out


@dataclass(frozen=True, eq=False)
class GeneAlignment:
    """How input genes line up with a model vocabulary (see :func:`align_genes`).

    Attributes
    ----------
    input_index
        ``int64`` positions into the input genes that matched, ascending.
    vocab_index
        ``int64`` rows of the vocabulary, same length: input gene ``input_index[k]`` is
        vocabulary entry ``vocab_index[k]``. Values are unique.
    n_input
        Number of input genes.
    n_matched
        Number of matched genes, ``len(input_index)``.
    unmatched
        Input names (as ``str``) that were not used, in input order: unknown genes, genes
        outside the vocabulary, and genes whose vocabulary ID was already taken by an earlier
        input gene.
    """

    input_index: np.ndarray
    vocab_index: np.ndarray
    n_input: int
    n_matched: int
    unmatched: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("input_index", "vocab_index"):
            arr = np.array(getattr(self, name), dtype=np.int64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    def __repr__(self) -> str:
        return (
            f"GeneAlignment(n_matched={self.n_matched}, n_input={self.n_input}, "
            f"n_unmatched={len(self.unmatched)})"
        )


def _preview(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(repr(str(x)) for x in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def align_genes(genes: Sequence[str], vocabulary: Sequence[str]) -> GeneAlignment:
    """Match input genes to a model vocabulary.

    A gene matches if its name is a vocabulary entry as is, or else if its :func:`to_ensembl`
    mapping is (so Ensembl IDs with a version suffix and gene symbols both work). Genes may come
    in any order and cover any subset of the vocabulary. If several distinct input genes map to
    the same vocabulary entry (e.g. a symbol and its Ensembl ID, or two aliases), the first one
    in input order is kept and the others are reported in ``unmatched`` with a warning.

    Parameters
    ----------
    genes
        Input gene names, e.g. ``adata.var_names`` or a ``var`` column; must be unique.
    vocabulary
        Model vocabulary, e.g. ``official_config()["gene_list"]``; must be unique.

    Returns
    -------
    GeneAlignment
        Matched ``(input_index, vocab_index)`` pairs in input order, plus the unmatched names.

    Raises
    ------
    ValueError
        If ``genes`` or ``vocabulary`` contains duplicates, or if no gene matches.

    Warns
    -----
    UserWarning
        If some input genes were dropped because an earlier gene mapped to the same entry.
    """
    names = pd.Index(genes, dtype=object)
    if names.has_duplicates:
        dups = names[names.duplicated()].unique()
        raise ValueError(
            f"{len(dups)} gene name(s) occur more than once: {_preview(dups)}. Gene names must "
            "be unique: call `adata.var_names_make_unique()`, or pass a `gene_key` var column "
            "holding unique Ensembl IDs."
        )
    vocab = pd.Index(vocabulary, dtype=object)
    if vocab.has_duplicates:
        dups = vocab[vocab.duplicated()].unique()
        raise ValueError(f"The vocabulary has duplicate entries: {_preview(dups)}.")
    vocab_pos = {v: i for i, v in enumerate(vocab)}

    mapped = to_ensembl(list(names))
    input_index: list[int] = []
    vocab_index: list[int] = []
    unmatched: list[str] = []
    taken: dict[int, int] = {}  # vocabulary row -> input position that claimed it
    clashes: list[str] = []
    for i, (gene, ens) in enumerate(zip(names, mapped)):
        row = vocab_pos.get(gene) if isinstance(gene, str) else None
        if row is None and ens is not None:
            row = vocab_pos.get(ens)
        if row is None:
            unmatched.append(str(gene))
        elif row in taken:
            unmatched.append(str(gene))
            clashes.append(f"{gene!s} -> {vocab[row]} (kept {names[taken[row]]!s})")
        else:
            taken[row] = i
            input_index.append(i)
            vocab_index.append(row)

    n_input, n_matched = len(names), len(input_index)
    if n_matched == 0:
        example = f"e.g. {_preview(vocab, 3)}" if len(vocab) else "it is empty"
        raise ValueError(
            f"None of the {n_input} input genes matched the vocabulary of {len(vocab)} entries "
            f"({example}). Input genes look like: {_preview(names, 5) or 'nothing'}. The "
            "CellPLM vocabulary holds human Ensembl gene IDs like ENSG00000000003; inputs may be "
            "such IDs (a version suffix such as '.17' is fine) or HGNC symbols like TP53. If "
            "the gene names are in a var column rather than var_names, pass it as `gene_key`. "
            "Mouse genes: map them to human orthologs first with "
            "`cellplm_scvi.pp.map_orthologs(adata)` and pass `gene_key='human_ensembl_id'`."
        )
    if clashes:
        warnings.warn(
            f"{len(clashes)} input gene(s) map to a vocabulary entry already matched by an "
            f"earlier gene and were dropped: {_preview(clashes)}.",
            UserWarning,
            stacklevel=2,
        )
    logger.info("%d of %d genes matched the vocabulary", n_matched, n_input)
    return GeneAlignment(
        input_index=np.asarray(input_index, dtype=np.int64),
        vocab_index=np.asarray(vocab_index, dtype=np.int64),
        n_input=n_input,
        n_matched=n_matched,
        unmatched=unmatched,
    )
