"""Scores of perturbation predictions and the simple baselines they must beat.

A prediction is an AnnData with one row per condition (``obs_names`` = condition names in
GEARS/Norman naming), ``var_names`` = genes and a dense ``X`` holding the mean over cells of
``log1p(counts / total * 1e4)`` under that condition: what
``CellPLM.predict_perturbation(conditions)`` returns and what :func:`condition_means` computes
from observed cells.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = [
    "condition_means",
    "evaluate_perturbation",
    "perturbation_baselines",
    "summarize_perturbation",
]

BASELINES = ("no-change", "train-mean", "additive", "linear")
METRICS = ("pearson_delta", "pearson_delta_top", "mse", "mse_top")
_TARGET_SUM = 1e4
_LINEAR_COMPONENTS = 10  # Ahlmann-Eltze et al.: K = 10 principal components
_LINEAR_RIDGE = 0.1  # and ridge penalty lambda = 0.1


# ------------------------------------------------------------------------------ conditions
def perturbed_genes(condition: str, control_category: str = "ctrl") -> tuple[str, ...]:
    """The genes a condition name perturbs: ``"ctrl"`` -> ``()``, ``"A+ctrl"``,
    ``"ctrl+A"`` and ``"A"`` -> ``("A",)``, ``"A+B"`` -> ``("A", "B")``.

    Raises
    ------
    ValueError
        If the name has an empty part (``"A+"``), more than two genes, or a gene twice.
    """
    if condition == control_category:
        return ()
    parts = str(condition).split("+")
    genes = tuple(p for p in parts if p != control_category)
    if any(p.strip() == "" for p in parts) or not genes or len(genes) > 2 or len(parts) > 2:
        raise ValueError(
            f"Malformed condition {condition!r}: expected {control_category!r}, 'A+"
            f"{control_category}' (or 'A') for a single and 'A+B' for a double perturbation."
        )
    if len(set(genes)) < len(genes):
        raise ValueError(f"Malformed condition {condition!r}: a gene is named twice.")
    return genes


class _Screen:
    """The conditions of a screen, their split and the per-condition means (built once)."""

    def __init__(
        self,
        adata: AnnData,
        perturbation_key: str,
        control_category: str,
        split_key: str,
        layer: str | None,
    ) -> None:
        for key, name in ((perturbation_key, "perturbation_key"), (split_key, "split_key")):
            if key not in adata.obs:
                raise KeyError(
                    f"{name}={key!r} is not a column of adata.obs "
                    f"(available: {list(adata.obs.columns)})."
                )
        for key in (perturbation_key, split_key):
            if adata.obs[key].isna().any():
                raise ValueError(f"adata.obs[{key!r}] has missing values.")
        condition = adata.obs[perturbation_key].astype(str).to_numpy()
        if not (condition == control_category).any():
            raise ValueError(
                f"No control cells: no cell has adata.obs[{perturbation_key!r}] == "
                f"{control_category!r}. Pass the control label as `control_category`."
            )
        split = adata.obs[split_key].astype(str).to_numpy()
        unknown = sorted(set(split) - {"train", "test"})
        if unknown:
            raise ValueError(
                f"adata.obs[{split_key!r}] must hold 'train' or 'test', found {unknown[:5]}."
            )
        self.names = list(pd.unique(condition))
        self.genes = {c: perturbed_genes(c, control_category) for c in self.names}
        self.control = control_category
        mixed = [c for c in self.names if len(set(split[condition == c])) > 1]
        if mixed:
            raise ValueError(
                f"Conditions split between train and test cells: {mixed[:5]}. Every cell of a "
                f"condition must have the same adata.obs[{split_key!r}]."
            )
        split_of = dict(zip(condition, split))
        self.train = [c for c in self.names if c != control_category and split_of[c] == "train"]
        self.test = [c for c in self.names if c != control_category and split_of[c] == "test"]
        self.var_names = adata.var_names.copy()
        self.means = _group_means(_counts(adata, layer), condition, self.names)
        self.control_mean = self.means.loc[control_category].to_numpy()
        # training single of each gene
        self.train_single = {self.genes[c][0]: c for c in self.train if len(self.genes[c]) == 1}

    def check(self, conditions: Sequence[str]) -> list[str]:
        conditions = [str(c) for c in conditions]
        unknown = [c for c in conditions if c not in self.genes]
        if unknown:
            raise ValueError(
                f"Unknown conditions {unknown[:5]}: not values of the perturbation key "
                f"(known: {self.names[:5]}{', ...' if len(self.names) > 5 else ''})."
            )
        return conditions

    def condition_type(self, condition: str) -> str:
        """``ctrl``, ``single_seen``/``single_unseen``, ``double_seen``/``double_unseen`` (both
        singles in training)/``double_unseen_gene`` (a single not in training)."""
        genes = self.genes[condition]
        if not genes:
            return "ctrl"
        seen = "seen" if condition in self.train else "unseen"
        if len(genes) == 1:
            return f"single_{seen}"
        if seen == "unseen" and not all(g in self.train_single for g in genes):
            return "double_unseen_gene"
        return f"double_{seen}"


def _counts(adata: AnnData, layer: str | None) -> sp.csr_matrix:
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"layer={layer!r} is not a layer of adata (available: {list(adata.layers)})."
        )
    x = adata.X if layer is None else adata.layers[layer]
    x = sp.csr_matrix(x, dtype=np.float64)
    if x.nnz and x.data.min() < 0:
        raise ValueError(
            "Negative values: pass raw counts (e.g. layer='counts'); means are taken of "
            "log1p(counts / total * 1e4)."
        )
    return x


def _group_means(x: sp.csr_matrix, labels: np.ndarray, groups: list[str]) -> pd.DataFrame:
    """Mean of ``log1p(x / total * 1e4)`` over the cells of each group (rows)."""
    total = np.asarray(x.sum(axis=1)).ravel()
    scale = np.where(total > 0, _TARGET_SUM / np.where(total > 0, total, 1.0), 0.0)
    normalised = sp.csr_matrix(sp.diags(scale) @ x)
    normalised.data = np.log1p(normalised.data)
    codes = pd.Categorical(labels, categories=groups).codes
    membership = sp.csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(groups), len(codes))
    )
    sums = np.asarray((membership @ normalised).todense())
    sizes = np.asarray(membership.sum(axis=1)).ravel()
    return pd.DataFrame(sums / sizes[:, None], index=groups)


def _as_prediction(values: np.ndarray, conditions: list[str], var_names: pd.Index) -> AnnData:
    return AnnData(
        X=np.asarray(values, dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index(conditions, dtype=str)),
        var=pd.DataFrame(index=var_names.copy()),
    )


# ------------------------------------------------------------------------------ public
def condition_means(
    adata: AnnData,
    perturbation_key: str = "condition",
    conditions: Sequence[str] | None = None,
    layer: str | None = None,
) -> AnnData:
    """Observed mean of ``log1p(counts / total * 1e4)`` per condition, in the format of a
    prediction.

    Parameters
    ----------
    adata
        Cells with raw counts in ``X`` or ``layers[layer]``.
    perturbation_key
        Column of ``adata.obs`` with the condition of each cell.
    conditions
        Conditions to return, in this order; default: all, in order of appearance.
    layer
        Layer with the counts; ``None`` uses ``X``.

    Returns
    -------
    AnnData
        One row per condition (``obs_names``), ``var_names`` of ``adata``, dense ``X``.

    Raises
    ------
    KeyError
        If ``perturbation_key`` or ``layer`` is missing.
    ValueError
        If a requested condition has no cells.
    """
    if perturbation_key not in adata.obs:
        raise KeyError(
            f"perturbation_key={perturbation_key!r} is not a column of adata.obs "
            f"(available: {list(adata.obs.columns)})."
        )
    labels = adata.obs[perturbation_key].astype(str).to_numpy()
    names = list(pd.unique(labels)) if conditions is None else [str(c) for c in conditions]
    missing = sorted(set(names) - set(labels))
    if missing:
        raise ValueError(f"Unknown conditions {missing[:5]}: no cell has them.")
    keep = np.isin(labels, names)
    means = _group_means(_counts(adata, layer)[keep], labels[keep], names)
    return _as_prediction(means.to_numpy(), names, adata.var_names)


def perturbation_baselines(
    adata: AnnData,
    perturbation_key: str = "condition",
    control_category: str = "ctrl",
    split_key: str = "split",
    conditions: Sequence[str] | None = None,
    layer: str | None = None,
) -> dict[str, AnnData]:
    """Predictions of the four simple baselines, fitted on the training cells only.

    The baselines, on the scale of a prediction (mean ``log1p`` CP10k per condition):

    - ``"no-change"``: the mean of the control cells, for every condition.
    - ``"train-mean"``: the mean over the training perturbations of their means (each
      condition counts once), for every condition (Csendes et al., 2025).
    - ``"additive"``: the control mean plus the sum of the changes (training mean minus control
      mean) of the condition's genes as single perturbations in training (Ahlmann-Eltze et al.,
      2025). A condition with a gene that has no training single gets a row of NaN. A training
      single gets its own training mean.
    - ``"linear"``: the linear model of Ahlmann-Eltze et al. (2025). ``Y`` (genes x training
      perturbations) holds the training means and ``b`` its row means; the gene embeddings
      ``G`` are the top ``K = min(10, n_train - 1)`` principal-component scores of the genes
      in ``Y - b``; a perturbation's embedding ``p`` is the sum of the rows of ``G`` of its
      genes (one row for a single, two for a double, so doubles are additive in embedding
      space; a gene that is not a column of ``adata`` adds zero). ``W`` minimises
      ``|Y - b - G W P^T|² + 0.1 (|W|²)`` in closed form (ridge on both sides), and the
      prediction of a condition is ``b + G W p``.

    Control cells are those with ``obs[perturbation_key] == control_category``, whatever their
    split; training perturbations are the other conditions whose cells have
    ``obs[split_key] == "train"``. No test cell is read.

    Parameters
    ----------
    adata
        Cells with raw counts in ``X`` or ``layers[layer]``.
    perturbation_key
        Column of ``adata.obs`` with the condition (GEARS/Norman naming: ``"ctrl"``,
        ``"A+ctrl"`` or ``"A"``, ``"A+B"``).
    control_category
        The control condition.
    split_key
        Column of ``adata.obs`` with ``"train"`` or ``"test"`` (the same for all cells of a
        condition).
    conditions
        Conditions to predict, in this order; default: the test conditions in order of
        appearance.
    layer
        Layer with the counts; ``None`` uses ``X``.

    Returns
    -------
    dict of str to AnnData
        ``{"no-change", "train-mean", "additive", "linear"}`` -> one row per condition in
        ``conditions``, ``var_names`` of ``adata``, dense ``X``.

    Raises
    ------
    KeyError
        If ``perturbation_key``, ``split_key`` or ``layer`` is missing.
    ValueError
        If there are no control cells, no training perturbation, a malformed or unknown
        condition name, or a split other than ``"train"``/``"test"``.
    """
    screen = _Screen(adata, perturbation_key, control_category, split_key, layer)
    conditions = screen.test if conditions is None else screen.check(conditions)
    values = _baselines(screen, conditions)
    return {k: _as_prediction(v, conditions, screen.var_names) for k, v in values.items()}


def _baselines(screen: _Screen, conditions: list[str]) -> dict[str, np.ndarray]:
    """(conditions x genes) float64 predictions of each baseline."""
    if not screen.train:
        raise ValueError("No training perturbation: no non-control condition has split 'train'.")
    control = screen.control_mean
    train = screen.means.loc[screen.train].to_numpy()
    train_mean = train.mean(axis=0)
    n = len(conditions)

    additive = np.full((n, len(control)), np.nan)
    for row, condition in enumerate(conditions):
        genes = screen.genes[condition]
        if all(g in screen.train_single for g in genes):
            singles = screen.means.loc[[screen.train_single[g] for g in genes]].to_numpy()
            additive[row] = control + (singles - control).sum(axis=0)

    # linear model on PCA gene embeddings
    y = train.T  # genes x training perturbations
    offset = y.mean(axis=1)
    centred = y - offset[:, None]
    n_components = max(1, min(_LINEAR_COMPONENTS, y.shape[1] - 1, y.shape[0]))
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    gene_embedding = u[:, :n_components] * s[:n_components]
    position = {g: i for i, g in enumerate(screen.var_names.astype(str))}

    def embed(condition: str) -> np.ndarray:
        rows = [position[g] for g in screen.genes[condition] if g in position]
        return gene_embedding[rows].sum(axis=0)

    p_train = np.stack([embed(c) for c in screen.train])  # training perturbations x K
    ridge = _LINEAR_RIDGE * np.eye(n_components)
    left = np.linalg.solve(gene_embedding.T @ gene_embedding + ridge, gene_embedding.T @ centred)
    weights = np.linalg.solve(p_train.T @ p_train + ridge, (left @ p_train).T).T
    p_test = np.stack([embed(c) for c in conditions]) if n else np.zeros((0, n_components))
    linear = offset[None, :] + p_test @ (gene_embedding @ weights).T

    return {
        "no-change": np.tile(control, (n, 1)),
        "train-mean": np.tile(train_mean, (n, 1)),
        "additive": additive,
        "linear": linear,
    }


def evaluate_perturbation(
    adata: AnnData,
    predictions: Mapping[str, AnnData],
    perturbation_key: str = "condition",
    control_category: str = "ctrl",
    split_key: str = "split",
    baselines: bool = True,
    n_top_genes: int = 20,
    layer: str | None = None,
) -> pd.DataFrame:
    """Score perturbation predictions on the test conditions, with the simple baselines.

    For each method and each test condition (``obs[split_key] == "test"``), with ``c`` the
    mean of the control cells, ``t`` the observed mean of the condition's cells and ``p`` the
    prediction (all mean ``log1p`` CP10k, see :func:`condition_means`):

    - ``pearson_delta``: Pearson correlation of ``p - c`` and ``t - c`` over all genes;
    - ``pearson_delta_top``: the same over the ``n_top_genes`` genes of largest ``|t - c|``
      (the condition's top differentially expressed genes);
    - ``mse``, ``mse_top``: mean squared error of ``p`` against ``t`` over the same genes.

    A correlation is NaN when either change is constant over the genes (always for
    ``no-change``, whose predicted change is zero). A baseline row that is NaN (``additive``
    for a condition with a gene that has no training single) is left out of the table.
    :func:`summarize_perturbation` averages the table per method and condition type.

    Parameters
    ----------
    adata
        The screen: cells with raw counts in ``X`` or ``layers[layer]``, conditions in
        ``obs[perturbation_key]``, the split in ``obs[split_key]``.
    predictions
        Method name -> prediction: an AnnData with a row for every test condition
        (``obs_names``; rows of training conditions are ignored) and the genes of ``adata``
        as ``var_names`` (in any order).
    perturbation_key
        Column of ``adata.obs`` with the condition of each cell.
    control_category
        The control condition.
    split_key
        Column of ``adata.obs`` with ``"train"`` or ``"test"``.
    baselines
        Add the four baselines of :func:`perturbation_baselines` as methods.
    n_top_genes
        Number of top differentially expressed genes per condition (all genes if there are
        fewer).
    layer
        Layer with the counts; ``None`` uses ``X``.

    Returns
    -------
    pandas.DataFrame
        One row per (method, test condition), methods in the order of ``predictions`` then
        the baselines, conditions in order of appearance in ``adata``; columns ``method``,
        ``condition``, ``condition_type`` (``single_unseen``, ``double_unseen``: both singles
        in training, ``double_unseen_gene``: not), ``pearson_delta``, ``pearson_delta_top``,
        ``mse``, ``mse_top``, ``n_cells``.

    Raises
    ------
    KeyError
        If ``perturbation_key``, ``split_key`` or ``layer`` is missing.
    ValueError
        If there are no control cells or no test conditions; a prediction lacks a test
        condition, names a condition that ``adata`` does not have, has other genes than
        ``adata`` or values that are not finite; a method is named like a baseline; or
        ``n_top_genes < 1``.
    """
    if n_top_genes < 1:
        raise ValueError(f"`n_top_genes` must be >= 1, got {n_top_genes}.")
    screen = _Screen(adata, perturbation_key, control_category, split_key, layer)
    if not screen.test:
        raise ValueError(f"No test conditions: no cell has adata.obs[{split_key!r}] == 'test'.")
    clashes = sorted(set(predictions) & set(BASELINES)) if baselines else []
    if clashes:
        raise ValueError(
            f"Method names {clashes} are baseline names; rename them or pass baselines=False."
        )
    methods = {name: _aligned(name, pred, screen) for name, pred in predictions.items()}
    if baselines:
        methods.update(_baselines(screen, screen.test))

    truth = screen.means.loc[screen.test].to_numpy()
    true_change = truth - screen.control_mean
    top = np.argsort(-np.abs(true_change), axis=1, kind="stable")[
        :, : min(n_top_genes, adata.n_vars)
    ]
    n_cells = adata.obs[perturbation_key].astype(str).value_counts()
    rows = []
    for method, values in methods.items():
        for k, condition in enumerate(screen.test):
            if np.isnan(values[k]).all():
                continue
            change = values[k] - screen.control_mean
            genes = top[k]
            rows.append(
                {
                    "method": method,
                    "condition": condition,
                    "condition_type": screen.condition_type(condition),
                    "pearson_delta": _pearson(change, true_change[k]),
                    "pearson_delta_top": _pearson(change[genes], true_change[k, genes]),
                    "mse": float(np.mean((values[k] - truth[k]) ** 2)),
                    "mse_top": float(np.mean((values[k, genes] - truth[k, genes]) ** 2)),
                    "n_cells": int(n_cells[condition]),
                }
            )
    table = pd.DataFrame(
        rows, columns=["method", "condition", "condition_type", *METRICS, "n_cells"]
    )
    table.attrs["n_top_genes"] = n_top_genes
    return table


def summarize_perturbation(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric of :func:`evaluate_perturbation`'s table per method and condition
    type (NaN correlations are skipped), with the number of conditions.

    Parameters
    ----------
    table
        The table of :func:`evaluate_perturbation` (several tables, e.g. of several splits,
        may be concatenated first).

    Returns
    -------
    pandas.DataFrame
        Index ``(method, condition_type)`` in order of first appearance; columns the metrics
        and ``n_conditions``.
    """
    missing = [c for c in ("method", "condition_type", *METRICS) if c not in table]
    if missing:
        raise KeyError(f"`table` lacks the columns {missing}; pass evaluate_perturbation's table.")
    grouped = table.groupby(["method", "condition_type"], sort=False)
    summary = grouped[list(METRICS)].mean()
    summary["n_conditions"] = grouped.size()
    return summary


def _aligned(name: str, prediction: AnnData, screen: _Screen) -> np.ndarray:
    """The prediction's rows of the test conditions, columns in ``adata``'s gene order."""
    if not isinstance(prediction, AnnData):
        raise ValueError(
            f"Prediction {name!r} must be an AnnData, got {type(prediction).__name__}."
        )
    rows = prediction.obs_names.astype(str)
    if rows.has_duplicates:
        raise ValueError(
            f"Prediction {name!r} has duplicate conditions: {list(rows[rows.duplicated()][:5])}."
        )
    unknown = [c for c in rows if c not in screen.genes]
    if unknown:
        raise ValueError(f"Prediction {name!r} has unknown conditions {unknown[:5]}.")
    missing = [c for c in screen.test if c not in set(rows)]
    if missing:
        raise ValueError(f"Prediction {name!r} lacks the test conditions {missing[:5]}.")
    genes = prediction.var_names.astype(str)
    if genes.has_duplicates or set(genes) != set(screen.var_names.astype(str)):
        extra = sorted(set(genes) - set(screen.var_names.astype(str)))[:5]
        absent = sorted(set(screen.var_names.astype(str)) - set(genes))[:5]
        raise ValueError(
            f"Prediction {name!r} must have the genes of adata as var_names (unique, any "
            f"order); extra: {extra}, missing: {absent}. To score on the prediction's genes "
            "only, pass `adata[:, prediction.var_names]` (the baselines then use those genes "
            "too)."
        )
    x = prediction.X.toarray() if sp.issparse(prediction.X) else np.asarray(prediction.X)
    x = pd.DataFrame(x, index=rows, columns=genes).loc[screen.test, screen.var_names.astype(str)]
    values = x.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"Prediction {name!r} has values that are not finite.")
    return values


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denominator) if denominator > 0 else float("nan")
