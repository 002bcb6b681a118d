import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import squidpy as sq
from scipy.sparse.csgraph import connected_components

from cellplm_scvi.pp import assign_tissues, random_chunks
from cellplm_scvi.pp._tissues import _bisect

KEY = "cellplm_tissue"


def _ring(rng, n, r_in=0.75, r_out=1.0, scale=1000.0):
    theta = rng.uniform(0, 2 * np.pi, n)
    r = np.sqrt(rng.uniform(r_in**2, r_out**2, n))
    return scale * np.c_[r * np.cos(theta), r * np.sin(theta)]


def _u_shape(rng, n):
    """Concave "U" (600 wide, 1000 tall, 100 thick): a median cut through the arms."""
    pts = rng.uniform([0, 0], [600, 1000], (4 * n, 2))
    keep = (pts[:, 1] < 100) | (pts[:, 0] < 100) | (pts[:, 0] > 500)
    return pts[keep][:n]


def _adata(seed=0):
    """Two uniform slides, a ring and a U-shaped slide; cells interleaved, coords overlap."""
    rng = np.random.default_rng(seed)
    xy = np.r_[
        rng.uniform(0, 1000, (2500, 2)),
        rng.uniform(0, 1000, (2000, 2)),
        _ring(rng, 2000),
        _u_shape(rng, 3000),
    ]
    slide = np.repeat(["s1", "s2", "ring", "U"], [2500, 2000, 2000, 3000])
    perm = rng.permutation(xy.shape[0])
    adata = ad.AnnData(
        X=sp.random(xy.shape[0], 5, density=0.2, format="csr", random_state=0),
        obs=pd.DataFrame(
            {"slide": pd.Categorical(slide[perm])}, index=[f"c{i}" for i in range(xy.shape[0])]
        ),
        obsm={"spatial": xy[perm], "X_pca": rng.normal(size=(xy.shape[0], 3))},
    )
    adata.uns["note"] = "keep"
    return adata


def _sym_graph(adata, library_key, n_neighs=6):
    res = sq.gr.spatial_neighbors_knn(
        adata, spatial_key="spatial", library_key=library_key, n_neighs=n_neighs, copy=True
    )
    g = sp.csr_matrix(res.connectivities)
    return ((g + g.T) > 0).tocsr()


def _n_disconnected(graph, codes):
    """Number of groups whose induced subgraph is not connected."""
    coo = graph.tocoo()
    keep = codes[coo.row] == codes[coo.col]
    n = graph.shape[0]
    sub = sp.csr_matrix((np.ones(keep.sum()), (coo.row[keep], coo.col[keep])), shape=(n, n))
    _, comp = connected_components(sub, directed=False)
    n_comp_per_group = pd.Series(comp).groupby(codes).nunique().to_numpy()
    return int((n_comp_per_group > 1).sum())


@pytest.mark.parametrize("max_cells", [300, 1000])
def test_spatial_invariants(max_cells):
    adata = _adata()
    assign_tissues(adata, library_key="slide", max_cells=max_cells)
    lab = adata.obs[KEY]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert not lab.isna().any()  # every cell in exactly one group
    sizes = lab.value_counts()
    assert (sizes > 0).all()  # no empty categories
    assert sizes.max() <= max_cells
    # no group spans slides, and labels carry the slide name
    per_group = adata.obs.groupby(KEY, observed=True)["slide"].nunique()
    assert (per_group == 1).all()
    prefix = lab.astype(str).str.rsplit("/", n=1).str[0]
    assert (prefix == adata.obs["slide"].astype(str)).all()
    # each group connected in the symmetrised squidpy kNN graph
    graph = _sym_graph(adata, "slide")
    assert _n_disconnected(graph, lab.cat.codes.to_numpy()) == 0
    # balanced: bisection leaves hold more than max_cells / 2 cells; only a few small fragments
    assert (sizes < max_cells // 10).sum() <= 0.05 * sizes.size


@pytest.mark.parametrize("max_cells", [200, 500])
def test_concave_slide_exercises_connectivity_and_merge(max_cells):
    """On the U, bisection alone leaves disconnected groups and many tiny fragments."""
    adata = _adata()
    u = adata[adata.obs["slide"] == "U"].copy()
    graph = _sym_graph(u, None)
    leaves = _bisect(u.obsm["spatial"], np.zeros(u.n_obs, dtype=np.int64), max_cells)
    assert _n_disconnected(graph, leaves) > 0
    coo = graph.tocoo()
    keep = leaves[coo.row] == leaves[coo.col]
    sub = sp.csr_matrix((np.ones(keep.sum()), (coo.row[keep], coo.col[keep])), shape=graph.shape)
    _, comp = connected_components(sub, directed=False)
    min_size = max(2, max_cells // 10)
    assert (np.bincount(comp) < min_size).sum() >= 5  # fragments that need merging

    assign_tissues(u, max_cells=max_cells)
    sizes = u.obs[KEY].value_counts()
    assert _n_disconnected(graph, u.obs[KEY].cat.codes.to_numpy()) == 0
    assert sizes.max() <= max_cells
    assert sizes.min() >= min_size  # all fragments were merged into neighbours


def test_deterministic():
    a, b = _adata(), _adata()
    assign_tissues(a, library_key="slide", max_cells=400)
    assign_tissues(b, library_key="slide", max_cells=400, seed=123)  # seed-independent
    pd.testing.assert_series_equal(a.obs[KEY], b.obs[KEY])
    c1 = assign_tissues(a, spatial_key=None, batch_key="slide", max_cells=400, seed=1, copy=True)
    c2 = assign_tissues(a, spatial_key=None, batch_key="slide", max_cells=400, seed=1, copy=True)
    c3 = assign_tissues(a, spatial_key=None, batch_key="slide", max_cells=400, seed=2, copy=True)
    pd.testing.assert_series_equal(c1.obs[KEY], c2.obs[KEY])
    assert not c1.obs[KEY].equals(c3.obs[KEY])


def test_only_outputs_written():
    adata = _adata()
    ref = adata.copy()
    out = assign_tissues(adata, library_key="slide", max_cells=500)
    assert out is None
    assert set(adata.obsm) == set(ref.obsm)
    assert set(adata.obsp) == set(ref.obsp) == set()
    assert set(adata.uns) == set(ref.uns) | {KEY}
    assert set(adata.obs.columns) == set(ref.obs.columns) | {KEY}
    assert set(adata.layers) == set(ref.layers)
    pd.testing.assert_frame_equal(adata.obs.drop(columns=KEY), ref.obs)
    np.testing.assert_array_equal(adata.obsm["spatial"], ref.obsm["spatial"])
    assert (adata.X != ref.X).nnz == 0
    assert adata.uns["note"] == "keep"
    assert adata.uns[KEY]["params"] == {
        "spatial_key": "spatial",
        "library_key": "slide",
        "batch_key": None,
        "max_cells": 500,
        "n_neighs": 6,
        "seed": 0,
        "method": "bisect+components",
    }


def test_copy_leaves_input_untouched():
    adata = _adata()
    ref = adata.copy()
    out = assign_tissues(adata, library_key="slide", max_cells=500, copy=True)
    assert isinstance(out, ad.AnnData) and out is not adata
    assert KEY in out.obs and KEY in out.uns
    assert KEY not in adata.obs and KEY not in adata.uns
    pd.testing.assert_frame_equal(adata.obs, ref.obs)
    assert set(adata.uns) == set(ref.uns) and set(adata.obsp) == set()


def test_batch_key_not_crossed_with_coordinates():
    """Overlapping coordinates of two samples without library_key must not be mixed."""
    adata = _adata()
    assign_tissues(adata, batch_key="slide", max_cells=500)
    per_group = adata.obs.groupby(KEY, observed=True)["slide"].nunique()
    assert (per_group == 1).all()


def test_extra_coordinate_columns_ignored():
    adata = _adata()
    assign_tissues(adata, library_key="slide", max_cells=500)
    adata.obsm["xyz"] = np.c_[adata.obsm["spatial"], np.arange(adata.n_obs)]
    out = assign_tissues(adata, spatial_key="xyz", library_key="slide", max_cells=500, copy=True)
    pd.testing.assert_series_equal(out.obs[KEY], adata.obs[KEY])


def test_tiny_slides():
    """Slides with fewer cells than n_neighs (complete graph) and a single-cell slide."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(obsm={"spatial": rng.uniform(size=(60, 2))})
    adata.obs["slide"] = pd.Categorical(["a"] * 50 + ["b"] * 5 + ["c"] * 4 + ["d"])
    assign_tissues(adata, library_key="slide", max_cells=2)
    sizes = adata.obs[KEY].value_counts()
    assert sizes.max() <= 2
    assert (adata.obs.groupby(KEY, observed=True)["slide"].nunique() == 1).all()
    assert adata.obs.loc[adata.obs["slide"] == "d", KEY].tolist() == ["d/0"]


@pytest.mark.parametrize(
    ("n_per_sample", "expected"),
    [
        ({"A": 1001, "B": 2500, "C": 3}, {"A": [501, 500], "B": [834, 833, 833], "C": [3]}),
        ({"A": 1000}, {"A": [1000]}),
    ],
)
def test_no_coordinates_by_batch(n_per_sample, expected):
    batch = np.concatenate([[k] * v for k, v in n_per_sample.items()])
    batch = np.random.default_rng(0).permutation(batch)
    adata = ad.AnnData(
        obs=pd.DataFrame({"sample": batch}, index=[f"c{i}" for i in range(batch.size)])
    )
    assign_tissues(adata, spatial_key=None, batch_key="sample", max_cells=1000)
    lab = adata.obs[KEY]
    assert not lab.isna().any()
    assert (adata.obs.groupby(KEY, observed=True)["sample"].nunique() == 1).all()
    for s, exp in expected.items():
        got = lab[adata.obs["sample"] == s].value_counts()
        got = got[got > 0]
        assert sorted(got.tolist(), reverse=True) == exp
        assert sorted(got.index) == [f"{s}/{k}" for k in range(len(exp))]
    assert adata.uns[KEY]["params"]["method"] == "random_chunks"


def test_no_coordinates_no_batch():
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(2001)]))
    assign_tissues(adata, spatial_key=None, max_cells=1000)
    assert adata.obs[KEY].value_counts().sort_index().tolist() == [667, 667, 667]
    assert list(adata.obs[KEY].cat.categories) == ["all/0", "all/1", "all/2"]


def _samples_adata(n_per_sample: dict[str, int], seed: int = 0) -> ad.AnnData:
    """Cells of several samples, interleaved, on two slides (``"lib"``: every other cell)."""
    batch = np.concatenate([[k] * v for k, v in n_per_sample.items()])
    batch = np.random.default_rng(seed).permutation(batch)
    obs = pd.DataFrame(
        {"sample": pd.Categorical(batch), "lib": np.where(np.arange(batch.size) % 2, "L2", "L1")},
        index=[f"c{i}" for i in range(batch.size)],
    )
    return ad.AnnData(obs=obs)


def test_no_coordinates_default_is_whole_samples():
    """Without coordinates and without max_cells, each sample is one tissue, however large
    (the official zero-shot pipeline embeds each obs["batch"] value in one pass)."""
    sizes = {"A": 2500, "B": 1001, "C": 3}
    adata = _samples_adata(sizes)
    assign_tissues(adata, spatial_key=None, batch_key="sample")
    lab = adata.obs[KEY]
    assert list(lab.cat.categories) == ["A/0", "B/0", "C/0"]
    pd.testing.assert_series_equal(
        lab.astype(str), (adata.obs["sample"].astype(str) + "/0"), check_names=False
    )
    assert lab.value_counts().to_dict() == {"A/0": 2500, "B/0": 1001, "C/0": 3}
    params = adata.uns[KEY]["params"]
    assert params["max_cells"] is None and params["method"] == "whole_samples"
    # deterministic: the seed and the row order play no part
    again = assign_tissues(adata, spatial_key=None, batch_key="sample", seed=7, copy=True)
    pd.testing.assert_series_equal(again.obs[KEY], lab)
    shuffled = adata[np.random.default_rng(1).permutation(adata.n_obs)].copy()
    assign_tissues(shuffled, spatial_key=None, batch_key="sample")
    pd.testing.assert_series_equal(shuffled.obs[KEY], lab.loc[shuffled.obs_names])


def test_no_coordinates_default_per_library_and_batch():
    adata = _samples_adata({"A": 1500, "B": 700})
    assign_tissues(adata, spatial_key=None, library_key="lib")
    assert adata.obs[KEY].value_counts().sort_index().to_dict() == {"L1/0": 1100, "L2/0": 1100}
    pd.testing.assert_series_equal(
        adata.obs[KEY].astype(str), adata.obs["lib"] + "/0", check_names=False
    )
    assign_tissues(adata, spatial_key=None, library_key="lib", batch_key="sample")
    expected = adata.obs.groupby(["lib", "sample"], observed=True).size()
    got = adata.obs[KEY].value_counts()
    assert len(got) == 4
    for (lib, sample), n in expected.items():
        assert got[f"{lib}/{sample}/0"] == n
    assert (adata.obs.groupby(KEY, observed=True)[["lib", "sample"]].nunique() == 1).all().all()


def test_no_coordinates_no_keys_default_is_one_tissue():
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(2001)]))
    assign_tissues(adata, spatial_key=None)
    assert adata.obs[KEY].astype(str).unique().tolist() == ["all/0"]


def test_no_coordinates_cap_still_cuts_large_samples():
    adata = _samples_adata({"A": 2500, "B": 1001, "C": 3})
    assign_tissues(adata, spatial_key=None, batch_key="sample", max_cells=1000)
    sizes = adata.obs[KEY].value_counts()
    assert sizes.max() <= 1000 and len(sizes) == 3 + 2 + 1
    assert (adata.obs.groupby(KEY, observed=True)["sample"].nunique() == 1).all()
    params = adata.uns[KEY]["params"]
    assert params["max_cells"] == 1000 and params["method"] == "random_chunks"


def test_spatial_default_is_still_1000():
    adata = _adata()  # slides of 2000-3000 cells
    assign_tissues(adata, library_key="slide")
    explicit = assign_tissues(adata, library_key="slide", max_cells=1000, copy=True)
    pd.testing.assert_series_equal(adata.obs[KEY], explicit.obs[KEY])
    assert adata.obs[KEY].value_counts().max() <= 1000
    assert adata.obs[KEY].nunique() > adata.obs["slide"].nunique()
    assert adata.uns[KEY]["params"]["max_cells"] == 1000


@pytest.mark.parametrize(
    ("max_cells", "exc"),
    [("100", TypeError), (True, TypeError), (2.5, TypeError), (1, ValueError)],
)
@pytest.mark.parametrize("spatial_key", ["spatial", None])
def test_max_cells_validation(max_cells, exc, spatial_key):
    adata = ad.AnnData(
        obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]),
        obsm={"spatial": np.random.default_rng(0).uniform(size=(20, 2))},
    )
    with pytest.raises(exc, match="max_cells"):
        assign_tissues(adata, spatial_key=spatial_key, max_cells=max_cells)
    assert KEY not in adata.obs and KEY not in adata.uns


def test_whole_samples_roundtrip_h5ad(tmp_path):
    adata = _samples_adata({"A": 30, "B": 20})
    assign_tissues(adata, spatial_key=None, batch_key="sample")
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_series_equal(back.obs[KEY], adata.obs[KEY])
    assert back.uns[KEY]["params"]["method"] == "whole_samples"
    assert back.uns[KEY]["params"].get("max_cells") is None


def test_random_chunks():
    groups = np.array([2] * 7 + [0] * 3 + [5] * 10)
    ids = random_chunks(groups, 4, seed=0)
    # groups sorted: 0 (1 chunk of 3), 2 (2 chunks 4/3), 5 (3 chunks 4/3/3)
    assert np.bincount(ids).tolist() == [3, 4, 3, 4, 3, 3]
    assert set(ids[groups == 0]) == {0} and set(ids[groups == 2]) == {1, 2}
    assert set(ids[groups == 5]) == {3, 4, 5}
    np.testing.assert_array_equal(ids, random_chunks(groups, 4, seed=0))
    assert random_chunks(np.array([], dtype=int), 4).size == 0


def _with(adata, fn):
    fn(adata)
    return adata


@pytest.mark.parametrize(
    ("kwargs", "mutate", "exc", "match"),
    [
        ({"spatial_key": "xy"}, None, KeyError, r"spatial_key='xy'.*'spatial'"),
        ({"library_key": "nope"}, None, KeyError, r"library_key='nope'.*'slide'"),
        ({"batch_key": "nope"}, None, KeyError, r"batch_key='nope'"),
        ({"spatial_key": None, "batch_key": "nope"}, None, KeyError, r"batch_key='nope'"),
        ({}, lambda a: a.obsm["spatial"].__setitem__((3, 0), np.nan), ValueError, "NaN"),
        ({}, lambda a: a.obsm["spatial"].__setitem__((4, 1), np.inf), ValueError, "spatial"),
        (
            {},
            lambda a: a.obsm.__setitem__("spatial", a.obsm["spatial"][:, :1]),
            ValueError,
            "shape",
        ),
        ({"max_cells": 1}, None, ValueError, "max_cells"),
        ({"n_neighs": 0}, None, ValueError, "n_neighs"),
        (
            {"library_key": "slide"},
            lambda a: a.obs.__setitem__(
                "slide", a.obs["slide"].astype(object).where(a.obs.index != "c5")
            ),
            ValueError,
            r"missing value",
        ),
        (
            {"spatial_key": None, "batch_key": "slide"},
            lambda a: a.obs.__setitem__(
                "slide", a.obs["slide"].astype(object).where(a.obs.index != "c5")
            ),
            ValueError,
            r"batch_key",
        ),
    ],
)
def test_validation(kwargs, mutate, exc, match):
    adata = ad.AnnData(
        obs=pd.DataFrame(
            {"slide": pd.Categorical(["a", "b"] * 10)}, index=[f"c{i}" for i in range(20)]
        ),
        obsm={"spatial": np.random.default_rng(0).uniform(size=(20, 2))},
    )
    if mutate is not None:
        mutate(adata)
    with pytest.raises(exc, match=match):
        assign_tissues(adata, **kwargs)
    assert KEY not in adata.obs and KEY not in adata.uns


def test_empty_raises():
    adata = ad.AnnData(obsm={"spatial": np.zeros((0, 2))})
    with pytest.raises(ValueError, match="empty"):
        assign_tissues(adata)


def test_100k_cells_runs():
    rng = np.random.default_rng(0)
    n = 100_000
    adata = ad.AnnData(obsm={"spatial": rng.uniform(0, 5000, (n, 2))})
    adata.obs["slide"] = pd.Categorical(rng.choice(["a", "b"], n))
    t0 = time.perf_counter()
    assign_tissues(adata, library_key="slide", max_cells=1000)
    print(f"assign_tissues on {n} cells: {time.perf_counter() - t0:.2f} s")
    assert adata.obs[KEY].value_counts().max() <= 1000


def test_outputs_roundtrip_h5ad(tmp_path):
    adata = _adata()
    assign_tissues(adata, library_key="slide", max_cells=500)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_series_equal(back.obs[KEY], adata.obs[KEY])
    assert back.uns[KEY]["params"]["batch_key"] is None


def test_chunks_without_coordinates_do_not_depend_on_row_order():
    rng = np.random.default_rng(3)
    adata = ad.AnnData(np.zeros((530, 2), dtype=np.float32))
    adata.obs_names = [f"cell{i}" for i in range(530)]
    adata.obs["sample"] = pd.Categorical(rng.choice(["a", "b"], 530))
    shuffled = adata[rng.permutation(530)].copy()
    for data in (adata, shuffled):
        assign_tissues(data, spatial_key=None, batch_key="sample", max_cells=100)

    def tissue_sets(data):
        labels = data.obs["cellplm_tissue"]
        return {frozenset(data.obs_names[labels == t]) for t in labels.unique()}

    assert tissue_sets(adata) == tissue_sets(shuffled)
    assert len(tissue_sets(adata)) >= 6


def test_squidpys_graph_log_line_is_not_shown():
    """squidpy logs "Creating graph using ..." (through spatialdata's logger) on every graph;
    inside assign_tissues that graph is an internal step, so the line is hidden there, and the
    logger's level is restored afterwards."""
    import logging

    logger = logging.getLogger("spatialdata._logging")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    try:
        adata = _adata()
        _sym_graph(adata, "slide")  # squidpy called directly: the line is logged
        assert any("Creating graph" in r.getMessage() for r in records)
        records.clear()
        assign_tissues(adata, spatial_key="spatial", library_key="slide", max_cells=500)
        assert not [r.getMessage() for r in records if r.levelno < logging.WARNING]
        assert logger.level == level and not logger.filters
    finally:
        logger.removeHandler(handler)


def test_hidden_info_lines_are_the_calling_threads_only():
    """The INFO lines are hidden by a filter on the calling thread, not by the logger's level:
    another thread's lines still show, warnings always do."""
    import logging
    import threading

    from cellplm_scvi.pp._tissues import _without_info

    logger = logging.getLogger("cellplm_scvi.test_without_info")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with _without_info(logger.name):
            logger.info("this thread")
            logger.warning("a warning")
            other = threading.Thread(target=lambda: logger.info("another thread"))
            other.start()
            other.join()
        logger.info("after")
    finally:
        logger.removeHandler(handler)
    assert messages == ["a warning", "another thread", "after"]
