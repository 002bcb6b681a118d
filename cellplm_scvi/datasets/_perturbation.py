"""A controlled Perturb-seq benchmark: CRISPRi knock-downs acting through a simulated gene
network on real PBMC counts, with single and double perturbations and a Norman-style split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._genes import official_config, to_ensembl
from ._pbmc import pbmc68k_counts
from ._simulate import _integer_counts

CONTROL = "ctrl"
INTERACTIONS = ("additive", "synergistic", "buffering")
CONDITION_TYPES = (
    "ctrl",
    "single_seen",
    "single_unseen",
    "double_seen",
    "double_unseen",
    "double_unseen_gene",
)

# Fixed before any model was run on the data (issue 25); changing them changes the benchmark.
_MIN_TARGET_DETECTION = 0.5  # a perturbed gene is detected in >= 50% of the real cells
_MIN_RESPONSE_DETECTION = 0.05  # a network target is detected in >= 5% of the real cells
_MEAN_EXTRA_TARGETS = 10  # targets per regulator: 3 + Poisson(10)
_MIN_TARGETS = 3
_REGULATOR_EDGE_PROBABILITY = 0.15  # edge to each later regulator (a DAG: effects propagate)
_WEIGHT_RANGE = (0.3, 0.8)  # |log-space weight| of an edge, uniform; sign +/- with prob. 1/2
_ACTIVITY_SD = 0.4  # sd of a regulator's natural log-activity in every cell
_EFFICIENCY_RANGE = (0.6, 0.9)  # mean knock-down efficiency of each gene, uniform
_EFFICIENCY_CELL_SD = 0.1  # per-cell spread of the efficiency (clipped to [0, 0.98])
_SYNERGY_RANGE = (1.6, 2.4)  # factor on the downstream change of a synergistic double
_BUFFERING_RANGE = (0.2, 0.5)  # factor on the downstream change of a buffering double


def simulate_perturbation(
    cells: AnnData | None = None,
    n_perturbed_genes: int = 24,
    n_doubles: int = 36,
    cells_per_condition: int = 100,
    n_control_cells: int = 500,
    interaction_mix: tuple[float, float, float] = (0.5, 0.25, 0.25),
    held_out_single_fraction: float = 0.25,
    train_double_fraction: float = 0.5,
    thinning: float = 0.8,
    seed: int = 0,
    split_seed: int = 0,
) -> AnnData:
    """Simulate a CRISPRi Perturb-seq screen with single and double knock-downs.

    Real PBMC counts are resampled and pushed through a random sparse gene-regulatory network
    in log space. The default arguments and the constants below were fixed before any model
    was run on the data, so that the benchmark is not tuned to a model: 24 perturbed genes,
    36 doubles (18 additive, 9 synergistic, 9 buffering), 100 cells per perturbation, 500
    controls, 6 singles held out, half of the eligible doubles in training, ``seed=0``; the
    benchmark varies ``split_seed`` only.

    **What is simulated**

    1. *Cells.* Every simulated cell copies a random real cell of ``cells`` (with
       replacement) and thins its counts binomially with probability ``thinning``, so copies
       differ and there can be more cells than real ones. Library sizes are those of the real
       cells. The copies are drawn per cell type (``obs["cell_type"]`` of ``cells``, if any)
       in proportion to the types' sizes, so every condition has the same cell-type
       composition, as in a screen of one cell line.
    2. *Perturbed genes.* ``n_perturbed_genes`` genes are drawn among those of ``cells`` that
       are in the official CellPLM vocabulary (symbols matched to Ensembl IDs offline, as
       ``setup_anndata`` matches genes) and are detected in at least 50% of the real cells,
       so a knock-down is visible.
    3. *Network.* Each perturbed gene is a regulator with ``3 + Poisson(10)`` target genes
       among the genes detected in >= 5% of the real cells, and an edge to each regulator
       after it in a random order with probability 0.15 (a directed acyclic graph: effects
       propagate along chains of regulators). Edge weights are log-fold changes per unit of
       the regulator's log-activity, ``±U(0.3, 0.8)`` with a random sign. A cell's log-fold
       change of all genes is ``z = (I - W)^{-1} u`` for the matrix ``W`` of edge weights
       (``W[target, regulator]``) and a vector ``u`` of exogenous inputs on the regulators.
    4. *Natural activity.* In every cell, controls included, each regulator gets an
       independent input ``N(0, 0.4²)``, so regulators and their targets co-vary across
       control cells: co-expression carries the network.
    5. *Knock-down (CRISPRi).* Each perturbed gene has a mean efficiency ``U(0.6, 0.9)``;
       each perturbed cell its own efficiency ``e`` (that mean plus ``N(0, 0.1²)``, clipped
       to ``[0, 0.98]``), and the gene's input gets ``log(1 - e)``, which then propagates to
       its targets and their targets.
    6. *Doubles.* ``n_doubles`` distinct pairs of perturbed genes. Both inputs are set, so the
       network alone makes a double additive in log space. A double's interaction type is
       drawn in the proportions ``interaction_mix`` (additive, synergistic, buffering; exact
       counts, remainders to the first types): the change of every gene other than the two
       targets is multiplied by a factor ``U(1.6, 2.4)`` (synergistic) or ``U(0.2, 0.5)``
       (buffering) drawn per double; the two targets' own knock-down is unchanged.
    7. *Counts.* The fold change ``f = exp(z)`` of each gene is applied to the thinned counts
       ``x``: ``Binomial(x, min(f, 1)) + Poisson(max(f - 1, 0) x)``, whose mean is ``f x``.

    **What is not simulated:** cells that escape the guide or carry two guides by accident,
    guide-specific off-target effects, cell-cycle or stress responses to the perturbation,
    changes of cell-type composition, batch or lane effects, feedback loops (the network is
    acyclic), non-linear dose responses other than the interaction factors, effects on genes
    a cell does not express at all (a zero count stays zero; means still scale by ``f``), and
    any resemblance of the network to real PBMC biology.

    **Split** (Norman-style, drawn with ``split_seed`` alone, so the cells stay the same):
    ``round(held_out_single_fraction * n_perturbed_genes)`` singles are held out; of the
    doubles whose two singles are both in training, ``train_double_fraction`` (rounded) go to
    training. Training: all controls, the other singles, those doubles. Test: the held-out
    singles and all other doubles.

    Parameters
    ----------
    cells
        Real cells with integer counts in ``layers["counts"]`` (or ``X``) and gene symbols as
        ``var_names``. Defaults to :func:`pbmc68k_counts` (700 cells x 765 genes).
    n_perturbed_genes
        Number of perturbed genes (each gets a single perturbation), at least 2.
    n_doubles
        Number of double perturbations (distinct pairs of perturbed genes).
    cells_per_condition
        Cells of each single and double perturbation.
    n_control_cells
        Control cells (condition ``"ctrl"``).
    interaction_mix
        Shares of additive, synergistic and buffering doubles (non-negative, summing to 1).
    held_out_single_fraction
        Share of the singles held out for testing, in ``[0, 1)``.
    train_double_fraction
        Share of the doubles of two training singles that go to training, in ``[0, 1]``.
    thinning
        Binomial capture probability in ``(0, 1]`` applied to the copied counts.
    seed
        Seed of the network, the genes, the doubles and the cells.
    split_seed
        Seed of the train/test split only.

    Returns
    -------
    AnnData
        Cells x the genes of ``cells``, controls first, then the conditions in order, with

        - ``X`` and ``layers["counts"]``: the counts, CSR ``float32`` holding integers;
        - ``obs["condition"]`` (categorical, GEARS/Norman naming): ``"ctrl"``, ``"A+ctrl"``
          for a single knock-down of gene ``A``, ``"A+B"`` for a double with ``A < B``
          (sorted as strings);
        - ``obs["split"]`` (categorical): ``"train"`` or ``"test"``;
        - ``obs["condition_type"]`` (categorical): ``"ctrl"``; ``"single_seen"`` (a training
          single) or ``"single_unseen"`` (held out); ``"double_seen"`` (a training double);
          ``"double_unseen"`` (a test double whose two singles are in training: the setting of
          Norman et al. and of the additive baseline); ``"double_unseen_gene"`` (a test
          double with at least one held-out single);
        - ``obs["interaction"]`` (categorical): ``"additive"``, ``"synergistic"``,
          ``"buffering"`` for doubles, ``"none"`` otherwise;
        - ``obs["cell_type"]`` (if ``cells`` has one) and ``obs["source_cell"]``: the copied
          real cell;
        - ``uns["perturbation_simulation"]``: every argument and constant, ``perturbed_genes``,
          the knock-down ``efficiency`` of each, ``held_out_genes``, the doubles with their
          ``interaction`` and ``interaction_factor``, and the ``network`` (``regulator``,
          ``target``, ``weight`` arrays).

    Raises
    ------
    ValueError
        If an argument is out of range, or ``cells`` has too few eligible genes.

    Examples
    --------
    The benchmark's three partitions of the same cells:

    >>> import cellplm_scvi as cp
    >>> screens = [cp.datasets.simulate_perturbation(split_seed=s) for s in range(3)]
    >>> test = screens[0].obs.query("split == 'test'")["condition"].unique()
    """
    _check_arguments(
        n_perturbed_genes,
        n_doubles,
        cells_per_condition,
        n_control_cells,
        interaction_mix,
        held_out_single_fraction,
        train_double_fraction,
        thinning,
    )
    if cells is None:
        cells = pbmc68k_counts()
    counts = _integer_counts(cells)
    genes = np.asarray(cells.var_names, dtype=str)
    bad = [g for g in genes if "+" in g or g == CONTROL]
    if bad:
        raise ValueError(
            f"Gene names may not contain '+' or be {CONTROL!r} (condition names use them): "
            f"{bad[:5]}."
        )
    n_genes = len(genes)
    rng = np.random.default_rng(seed)

    detection = np.asarray((counts > 0).mean(axis=0)).ravel()
    in_vocabulary = np.isin(to_ensembl(list(genes)), official_config()["gene_list"])
    eligible = np.flatnonzero(in_vocabulary & (detection >= _MIN_TARGET_DETECTION))
    if eligible.size < n_perturbed_genes:
        raise ValueError(
            f"Only {eligible.size} genes of `cells` are in the CellPLM vocabulary and detected "
            f"in >= {_MIN_TARGET_DETECTION:.0%} of cells; cannot perturb "
            f"n_perturbed_genes={n_perturbed_genes}."
        )
    regulators = np.sort(rng.choice(eligible, size=n_perturbed_genes, replace=False))
    # targets of the network: detected genes that are not regulators themselves
    candidates = np.setdiff1d(np.flatnonzero(detection >= _MIN_RESPONSE_DETECTION), regulators)

    # --- the network: W[target, regulator], acyclic
    weights = np.zeros((n_genes, n_genes))
    order = rng.permutation(regulators)
    for rank, regulator in enumerate(order):
        n_targets = min(_MIN_TARGETS + rng.poisson(_MEAN_EXTRA_TARGETS), candidates.size)
        targets = rng.choice(candidates, size=n_targets, replace=False)
        later = order[rank + 1 :]
        targets = np.concatenate(
            [targets, later[rng.random(later.size) < _REGULATOR_EDGE_PROBABILITY]]
        )
        magnitude = rng.uniform(*_WEIGHT_RANGE, size=targets.size)
        sign = np.where(rng.random(targets.size) < 0.5, -1.0, 1.0)
        weights[targets, regulator] = sign * magnitude
    propagate = np.linalg.inv(np.eye(n_genes) - weights)  # z = propagate @ u

    # --- knock-down efficiencies, doubles and their interactions
    efficiency = rng.uniform(*_EFFICIENCY_RANGE, size=n_perturbed_genes)
    pairs = np.array(
        [(i, j) for i in range(n_perturbed_genes) for j in range(i + 1, n_perturbed_genes)]
    )
    pairs = pairs[np.sort(rng.choice(len(pairs), size=n_doubles, replace=False))]
    interaction = rng.permutation(_exact_counts(interaction_mix, n_doubles))
    factor = np.ones(n_doubles)
    factor[interaction == 1] = rng.uniform(*_SYNERGY_RANGE, size=(interaction == 1).sum())
    factor[interaction == 2] = rng.uniform(*_BUFFERING_RANGE, size=(interaction == 2).sum())

    # --- conditions: (name, perturbed regulator positions, interaction factor)
    names = genes[regulators]
    conditions: list[tuple[str, tuple[int, ...], float, str]] = [(CONTROL, (), 1.0, "none")]
    conditions += [(f"{names[i]}+{CONTROL}", (i,), 1.0, "none") for i in range(n_perturbed_genes)]
    for (i, j), kind, f in zip(pairs, interaction, factor):
        a, b = sorted((names[i], names[j]))
        conditions.append((f"{a}+{b}", (i, j), float(f), INTERACTIONS[kind]))

    # --- cells: every condition gets the cell-type composition of `cells`
    groups = _source_groups(cells)
    blocks, sources, labels = [], [], []
    for name, members, f, _ in conditions:
        n = n_control_cells if name == CONTROL else cells_per_condition
        source = _stratified_sources(groups, n, rng)
        inputs = np.zeros((n, n_genes))
        inputs[:, regulators] = rng.normal(0.0, _ACTIVITY_SD, size=(n, n_perturbed_genes))
        natural = inputs @ propagate.T
        shocks = np.zeros((n, n_genes))
        for k in members:
            cell_efficiency = efficiency[k] + rng.normal(0.0, _EFFICIENCY_CELL_SD, size=n)
            shocks[:, regulators[k]] = np.log1p(-np.clip(cell_efficiency, 0.0, 0.98))
        change = shocks @ propagate.T
        if f != 1.0:
            targets = regulators[list(members)]
            downstream = np.ones(n_genes, dtype=bool)
            downstream[targets] = False
            change[:, downstream] *= f
        blocks.append(_apply_fold_changes(counts[source], natural + change, thinning, rng))
        sources.append(source)
        labels.append(np.full(n, name, dtype=object))
    x = sp.vstack(blocks, format="csr")
    source = np.concatenate(sources)
    condition = np.concatenate(labels)

    # --- the split (its own generator: the cells do not depend on it)
    split_of, type_of, held_out = _norman_split(
        conditions, names, held_out_single_fraction, train_double_fraction, split_seed
    )
    interaction_of = {name: kind for name, _, _, kind in conditions}
    condition_names = [name for name, *_ in conditions]
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(condition, categories=condition_names),
            "split": pd.Categorical(
                [split_of[c] for c in condition], categories=["train", "test"]
            ),
            "condition_type": pd.Categorical(
                [type_of[c] for c in condition], categories=list(CONDITION_TYPES)
            ),
            "interaction": pd.Categorical(
                [interaction_of[c] for c in condition], categories=["none", *INTERACTIONS]
            ),
        },
        index=pd.Index([f"cell{i}" for i in range(x.shape[0])]),
    )
    if "cell_type" in cells.obs:
        obs["cell_type"] = pd.Categorical(np.asarray(cells.obs["cell_type"])[source])
    obs["source_cell"] = np.asarray(cells.obs_names[source], dtype=str)

    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.layers["counts"] = x.copy()
    rows, cols = np.nonzero(weights)
    adata.uns["perturbation_simulation"] = {
        "n_perturbed_genes": n_perturbed_genes,
        "n_doubles": n_doubles,
        "cells_per_condition": cells_per_condition,
        "n_control_cells": n_control_cells,
        "interaction_mix": np.asarray(interaction_mix, dtype=float),
        "held_out_single_fraction": held_out_single_fraction,
        "train_double_fraction": train_double_fraction,
        "thinning": thinning,
        "seed": seed,
        "split_seed": split_seed,
        "min_target_detection": _MIN_TARGET_DETECTION,
        "min_response_detection": _MIN_RESPONSE_DETECTION,
        "targets_per_regulator": f"{_MIN_TARGETS} + Poisson({_MEAN_EXTRA_TARGETS})",
        "regulator_edge_probability": _REGULATOR_EDGE_PROBABILITY,
        "weight_range": np.asarray(_WEIGHT_RANGE),
        "activity_sd": _ACTIVITY_SD,
        "efficiency_range": np.asarray(_EFFICIENCY_RANGE),
        "efficiency_cell_sd": _EFFICIENCY_CELL_SD,
        "synergy_range": np.asarray(_SYNERGY_RANGE),
        "buffering_range": np.asarray(_BUFFERING_RANGE),
        "perturbed_genes": names.astype(str),
        "efficiency": efficiency,
        "held_out_genes": np.asarray(sorted(held_out), dtype=str),
        "doubles": np.asarray([c[0] for c in conditions[1 + n_perturbed_genes :]], dtype=str),
        "interaction": np.asarray([INTERACTIONS[k] for k in interaction], dtype=str),
        "interaction_factor": factor,
        "network": {
            "regulator": genes[cols].astype(str),
            "target": genes[rows].astype(str),
            "weight": weights[rows, cols],
        },
    }
    return adata


def _check_arguments(
    n_perturbed_genes: int,
    n_doubles: int,
    cells_per_condition: int,
    n_control_cells: int,
    interaction_mix: tuple[float, float, float],
    held_out_single_fraction: float,
    train_double_fraction: float,
    thinning: float,
) -> None:
    if n_perturbed_genes < 2:
        raise ValueError(f"`n_perturbed_genes` must be >= 2, got {n_perturbed_genes}.")
    if n_doubles < 0:
        raise ValueError(f"`n_doubles` must be >= 0, got {n_doubles}.")
    max_doubles = n_perturbed_genes * (n_perturbed_genes - 1) // 2
    if n_doubles > max_doubles:
        raise ValueError(
            f"n_doubles={n_doubles} exceeds the {max_doubles} pairs of "
            f"{n_perturbed_genes} perturbed genes."
        )
    if cells_per_condition < 1 or n_control_cells < 1:
        raise ValueError(
            "`cells_per_condition` and `n_control_cells` must be >= 1, got "
            f"{cells_per_condition} and {n_control_cells}."
        )
    mix = np.asarray(interaction_mix, dtype=float)
    if mix.shape != (3,) or (mix < 0).any() or not np.isclose(mix.sum(), 1.0):
        raise ValueError(
            "`interaction_mix` must be three non-negative shares (additive, synergistic, "
            f"buffering) summing to 1, got {interaction_mix}."
        )
    if not 0 <= held_out_single_fraction < 1:
        raise ValueError(
            f"`held_out_single_fraction` must be in [0, 1), got {held_out_single_fraction}."
        )
    if not 0 <= train_double_fraction <= 1:
        raise ValueError(
            f"`train_double_fraction` must be in [0, 1], got {train_double_fraction}."
        )
    if not 0 < thinning <= 1:
        raise ValueError(f"`thinning` must be in (0, 1], got {thinning}.")


def _exact_counts(shares: tuple[float, float, float], n: int) -> np.ndarray:
    """``n`` type codes in the given shares: floors first, the remainder to the first types."""
    counts = np.floor(np.asarray(shares) * n + 1e-9).astype(int)
    for k in range(n - counts.sum()):
        counts[k % len(counts)] += 1
    return np.repeat(np.arange(len(counts)), counts)


def _source_groups(cells: AnnData) -> list[np.ndarray]:
    """Row positions of ``cells`` per cell type (one group without ``obs["cell_type"]``)."""
    if "cell_type" not in cells.obs:
        return [np.arange(cells.n_obs)]
    codes = pd.Categorical(cells.obs["cell_type"].astype(str)).codes
    return [np.flatnonzero(codes == k) for k in np.unique(codes)]


def _stratified_sources(groups: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` real cells drawn with replacement, each group getting its proportional share
    (largest remainders), so conditions do not differ in composition."""
    sizes = np.array([len(g) for g in groups], dtype=float)
    quota = sizes / sizes.sum() * n
    counts = np.floor(quota).astype(int)
    counts[np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]] += 1
    source = np.concatenate([rng.choice(g, size=k) for g, k in zip(groups, counts)])
    return rng.permutation(source)


def _apply_fold_changes(
    counts: sp.csr_matrix, log_fold: np.ndarray, thinning: float, rng: np.random.Generator
) -> sp.csr_matrix:
    """Thin ``counts`` binomially, then scale each entry by ``exp(log_fold)`` in expectation."""
    x = counts.copy()
    x.data = rng.binomial(x.data, thinning)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    fold = np.exp(log_fold[rows, x.indices])
    x.data = rng.binomial(x.data, np.minimum(fold, 1.0)) + rng.poisson(
        np.maximum(fold - 1.0, 0.0) * x.data
    )
    x = sp.csr_matrix(x, dtype=np.float32)
    x.eliminate_zeros()
    return x


def _norman_split(
    conditions: list[tuple[str, tuple[int, ...], float, str]],
    names: np.ndarray,
    held_out_single_fraction: float,
    train_double_fraction: float,
    split_seed: int,
) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """Split and type of each condition name, and the held-out single genes."""
    rng = np.random.default_rng(split_seed)
    n_held_out = int(round(held_out_single_fraction * len(names)))
    held_out = set(rng.choice(names, size=n_held_out, replace=False).tolist())
    split_of, type_of = {CONTROL: "train"}, {CONTROL: "ctrl"}
    eligible_doubles = []
    for name, members, _, _ in conditions:
        if len(members) == 1:
            unseen = names[members[0]] in held_out
            split_of[name] = "test" if unseen else "train"
            type_of[name] = "single_unseen" if unseen else "single_seen"
        elif len(members) == 2:
            if any(names[k] in held_out for k in members):
                split_of[name], type_of[name] = "test", "double_unseen_gene"
            else:
                eligible_doubles.append(name)
    n_train = int(round(train_double_fraction * len(eligible_doubles)))
    train = set(rng.permutation(eligible_doubles)[:n_train].tolist())
    for name in eligible_doubles:
        seen = name in train
        split_of[name] = "train" if seen else "test"
        type_of[name] = "double_seen" if seen else "double_unseen"
    return split_of, type_of, held_out
