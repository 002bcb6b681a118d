"""Scores of a representation: a cross-validated linear probe and a k-means clustering.

Used by the quickstart, the benchmarks and the tests to compare embeddings on one footing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["cluster", "linear_probe"]

N_FOLDS = 5  # folds of the linear probe


def linear_probe(
    features: np.ndarray,
    labels: Sequence,
    seed: int = 0,
    n_folds: int = N_FOLDS,
    positive: str | None = None,
) -> float:
    """Macro-F1 (or the F1 of one label) of a cross-validated linear classifier.

    Features are standardised and a multinomial logistic regression is fitted in each fold of
    a stratified ``n_folds``-fold split (shuffled with ``seed``). The F1 is computed on the
    pooled out-of-fold predictions, so every class counts once.

    Parameters
    ----------
    features
        (n_cells, n_features) representation.
    labels
        Label of each cell.
    seed
        Seed of the fold assignment.
    n_folds
        Number of folds.
    positive
        Score the F1 of this label alone (labels are compared as strings, e.g. ``"True"``)
        instead of the macro-F1 over all labels. The classifier then weights the classes by
        their inverse frequency (otherwise a rare label is hardly ever predicted).

    Returns
    -------
    F1 score in [0, 1].
    """
    labels = np.asarray(labels).astype(str)
    weights = None if positive is None else "balanced"
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, class_weight=weights)
    )
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # rare labels of tiny data sets have fewer members than folds
        warnings.filterwarnings("ignore", message="The least populated class")
        predicted = cross_val_predict(probe, np.asarray(features), labels, cv=folds)
    if positive is None:
        return float(f1_score(labels, predicted, average="macro"))
    if positive not in labels:
        raise ValueError(f"positive={positive!r} is not one of the labels {sorted(set(labels))}.")
    return float(f1_score(labels, predicted, average="binary", pos_label=positive))


def cluster(features: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means clusters of standardised features (e.g. as many as there are niches).

    Parameters
    ----------
    features
        (n_cells, n_features) representation.
    n_clusters
        Number of clusters.
    seed
        Seed of the k-means initialisations (10 of them, the best is kept).

    Returns
    -------
    (n_cells,) integer cluster labels in ``[0, n_clusters)``.
    """
    x = StandardScaler().fit_transform(np.asarray(features, dtype=np.float64))
    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
