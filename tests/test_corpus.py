"""TissueCorpus: many .h5ad files, aligned to one vocabulary, read lazily one tissue at a time."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scvi.data import AnnDataManager

import cellplm_scvi as cp
from cellplm_scvi._genes import official_config, symbol_table
from cellplm_scvi.data import TissueCorpus
from cellplm_scvi.module import CellPLMModule
from tests._helpers import (
    CORPUS_KWARGS,
    CORPUS_VOCAB,
    corpus,
    finish_script,
    poisson_counts,
    start_script,
    write_h5ad,
)


def _expected_vocab_counts(path: Path, gene_key, rows: np.ndarray) -> np.ndarray:
    """(n, n_vocab) dense counts of rows of a file, put in vocabulary columns by hand."""
    adata = ad.read_h5ad(path)
    genes = adata.var_names if gene_key is None else adata.var[gene_key]
    x = adata.X[rows]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    out = np.zeros((len(rows), len(CORPUS_VOCAB)), dtype=np.float32)
    position = {g: i for i, g in enumerate(CORPUS_VOCAB)}
    ens = dict(zip(symbol_table()["symbol"], symbol_table()["ensembl_id"]))
    for j, gene in enumerate(genes):
        gene = ens.get(gene, gene.split(".")[0])
        if gene in position:
            out[:, position[gene]] = x[:, j]
    return out


def _minibatches(dm: TissueCorpus, split: str = "validation"):
    for rows in dm.sampler(split):
        yield dm.dataset[rows]


def test_alignment_report(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path)
    report = dm.alignment_report
    assert list(report["file"]) == [str(f) for f in corpus_files]
    assert list(report["n_genes"]) == [25, 27, 20, 20]
    assert list(report["n_matched"]) == [25, 25, 20, 20]
    assert list(report["n_cells"]) == [300, 200, 400, 150]
    assert list(report["spatial"]) == [False, False, True, False]
    assert dm.n_obs == 1050 and dm.n_vars == 40
    assert dm.batch_names == [
        "f0.h5ad/s1",
        "f0.h5ad/s2",
        "f1.h5ad/a",
        "f2.h5ad/slide",
        "f3.h5ad/b",
    ]
    # tissues: chunks of at most 64 cells per sample; spatial patches of at most 64
    sizes = np.bincount(dm.tissue_codes)
    assert sizes.max() <= 64 and report["n_tissues"].sum() == len(sizes)
    assert report["n_tissues"][0] == 3 + 2  # ceil(180/64) + ceil(120/64)


def test_counts_land_in_vocabulary_columns(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path, validation_size=0.5)
    seen = np.zeros(dm.n_obs, dtype=bool)
    for split in ("train", "validation"):
        sampler = dm.sampler(split)
        sampler.shuffle = False  # whole tissues, no cap
        for rows in sampler:
            batch = dm.dataset[rows]
            rows = batch["ind_x"].view(-1).numpy()
            k = int(np.searchsorted(dm.offsets, rows[0], side="right") - 1)
            local = rows - dm.offsets[k]
            x = batch["X"]
            assert x.layout == torch.sparse_csr and x.shape == (len(rows), 40)
            expected = _expected_vocab_counts(corpus_files[k], CORPUS_KWARGS["gene_key"][k], local)
            np.testing.assert_array_equal(x.to_dense().numpy(), expected)
            measured = batch["measured"].numpy()
            np.testing.assert_array_equal(measured, expected.any(0) | dm.files[k].measured)
            assert (expected[:, ~measured] == 0).all()
            assert (batch["batch"].view(-1).numpy() == dm.batch_codes[rows]).all()
            assert (dm.file_of_batch[batch["batch"].view(-1).numpy()] == k).all()
            assert len(np.unique(batch["tissue"].numpy())) == 1
            coords = batch["spatial"].numpy()
            assert np.isfinite(coords).all() == (k == 2) and np.isnan(coords).all() == (k != 2)
            seen[rows] = True
    assert seen.all()


def test_measured_masks(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path)
    in_file = [set(range(25)), set(range(10, 35)), set(range(20, 40)), set(range(0, 40, 2))]
    for k, genes in enumerate(in_file):
        assert set(np.flatnonzero(dm.files[k].measured)) == genes
    assert dm.measured_genes.shape == (dm.n_batch, 40)
    for b, k in enumerate(dm.file_of_batch):
        assert set(np.flatnonzero(dm.measured_genes[b])) == in_file[k]


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_tissue_cache_deterministic_and_outside_the_files(corpus_files):
    before = [_digest(f) for f in corpus_files]
    cache_dir = corpus_files[0].parent / ".cellplm_tissues"
    first = corpus(corpus_files)
    assert cache_dir.is_dir() and len(list(cache_dir.glob("*.npz"))) == 4
    second = corpus(corpus_files)
    assert not first.alignment_report["cached"].any() or second.alignment_report["cached"].all()
    assert second.alignment_report["cached"].all()
    np.testing.assert_array_equal(first.tissue_codes, second.tissue_codes)
    assert [_digest(f) for f in corpus_files] == before  # the user's files are untouched
    # a fresh computation (other cache folder) gives the same tissues
    fresh = corpus(corpus_files, cache_dir=corpus_files[0].parent / "other_cache")
    assert not fresh.alignment_report["cached"].any()
    np.testing.assert_array_equal(first.tissue_codes, fresh.tissue_codes)
    # other settings are other cache entries
    other = corpus(corpus_files, max_cells=32)
    assert not other.alignment_report["cached"].any()
    assert np.bincount(other.tissue_codes).max() <= 32


def _build_as_a_rank(barrier, queue, files, cache_dir) -> None:
    """One "DDP rank": construct the corpus once all ranks are ready; send back its tissue
    codes and the cache warnings it logged (or the error)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("cellplm_scvi").addHandler(handler)
    barrier.wait()
    try:
        codes = corpus(files, cache_dir=cache_dir).tissue_codes
        queue.put((codes, [r.getMessage() for r in records if "not written" in r.getMessage()]))
    except Exception as e:  # reported by the test
        queue.put((None, [repr(e)]))


def test_concurrent_first_builds_of_one_cache(corpus_files, tmp_path):
    """Ranks constructing the corpus at once, before any cache exists: each writes through a
    temporary file of its own, so none fails and the cache is whole."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # ranks are processes
    for round_ in range(3):
        cache_dir = tmp_path / f"cache{round_}"
        barrier, queue = context.Barrier(4), context.Queue()
        args = (barrier, queue, corpus_files, cache_dir)
        ranks = [context.Process(target=_build_as_a_rank, args=args) for _ in range(4)]
        for rank in ranks:
            rank.start()
        results = [queue.get(timeout=120) for _ in ranks]
        for rank in ranks:
            rank.join(timeout=60)
        assert [problems for _, problems in results] == [[]] * 4  # no error, no failed write
        assert [p.name for p in cache_dir.iterdir() if "tmp" in p.name] == []
        assert len(list(cache_dir.glob("*.npz"))) == 4  # one entry per file
        again = corpus(corpus_files, cache_dir=cache_dir)  # reads the cache whole
        assert again.alignment_report["cached"].all()
        for codes, _ in results:
            np.testing.assert_array_equal(codes, again.tissue_codes)


def test_split_by_whole_tissues_deterministic(corpus_files, tmp_path):
    a, b = corpus(corpus_files, cache_dir=tmp_path), corpus(corpus_files, cache_dir=tmp_path)
    np.testing.assert_array_equal(a.val_tissues, b.val_tissues)
    np.testing.assert_array_equal(a.val_idx, b.val_idx)
    train_tissues = set(a.tissue_codes[a.train_idx])
    val_tissues = set(a.tissue_codes[a.val_idx])
    assert not train_tissues & val_tissues
    assert len(train_tissues | val_tissues) == a.tissue_codes.max() + 1
    assert a.n_train + a.n_val == a.n_obs
    n_tissues = a.tissue_codes.max() + 1
    assert len(val_tissues) == round(0.2 * n_tissues)
    c = corpus(corpus_files, cache_dir=tmp_path, seed=1)
    assert not np.array_equal(a.val_tissues, c.val_tissues)


def _file_of(dm: TissueCorpus, rows) -> int:
    return int(np.searchsorted(dm.offsets, rows[0], side="right") - 1)


def test_shuffling_across_files_per_epoch(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path)
    sampler = dm.sampler("train")
    epoch0 = [sorted(rows) for rows in sampler]
    files0 = [_file_of(dm, rows) for rows in epoch0]
    for rows in epoch0:  # every step is one tissue of one file
        assert len(set(dm.tissue_codes[rows])) == 1
        assert _file_of(dm, rows) == _file_of(dm, [rows[-1]])
    switches = sum(a != b for a, b in zip(files0, files0[1:]))
    assert switches > len(set(files0))  # interleaved, not file after file
    sampler.set_epoch(1)
    epoch1 = [sorted(rows) for rows in sampler]
    assert epoch1 != epoch0
    assert sorted(map(tuple, epoch1)) == sorted(map(tuple, epoch0))  # same tissues
    sampler.set_epoch(0)
    assert [sorted(rows) for rows in sampler] == epoch0  # seeded


def test_ddp_shards_are_disjoint(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path)
    shards = [
        [tuple(sorted(rows)) for rows in dm.sampler("train", num_replicas=2, rank=r)]
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1])
    n_train_tissues = len(dm.train_tissues)
    union = set(shards[0]) | set(shards[1])
    assert len(union) == n_train_tissues
    assert len(set(shards[0]) & set(shards[1])) <= 1  # at most world_size - 1 repeated


def test_max_cells_per_step_and_node_drop(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path, max_cells_per_step=10, drop_node_rate=0.5)
    sizes = [len(rows) for rows in dm.sampler("train")]
    assert max(sizes) <= 10
    val_sizes = [len(rows) for rows in dm.sampler("validation")]
    assert sum(val_sizes) == dm.n_val  # validation: whole tissues


def test_registry_matches_setup_anndata(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path)
    registry = dm.registry
    adata = ad.read_h5ad(corpus_files[2])
    adata.obs["b"] = "x"
    cp.CellPLM.setup_anndata(adata, batch_key="b", spatial_key="spatial")
    real = cp.CellPLM(adata, n_hidden=16, n_layers=1, n_latent=4).adata_manager.registry
    assert set(registry) <= set(real)
    assert registry["setup_method_name"] == real["setup_method_name"] == "setup_anndata"
    assert set(registry["setup_args"]) == set(real["setup_args"])
    assert set(registry["field_registries"]) == set(real["field_registries"])
    for key, field in registry["field_registries"].items():
        assert set(field) == set(real["field_registries"][key])
        assert set(field["state_registry"]) == set(real["field_registries"][key]["state_registry"])
    stats = AnnDataManager._get_summary_stats_from_registry(registry)
    assert stats.n_vars == 40 and stats.n_batch == 5 and stats.n_labels == 1
    assert (
        list(registry["field_registries"]["X"]["state_registry"]["column_names"]) == CORPUS_VOCAB
    )
    cats = registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    assert list(cats) == dm.batch_names


def test_one_epoch_through_the_module(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path, max_cells_per_step=48)
    torch.manual_seed(0)
    module = CellPLMModule(
        n_vocab=dm.n_vars,
        n_hidden=32,
        n_layers=1,
        n_latent=8,
        use_spatial_pe=True,
    )  # the minibatches carry their files' measured genes
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    n_steps = 0
    for tensors in dm.train_dataloader():
        module.train()
        _, _, losses = module(tensors)
        assert torch.isfinite(losses.loss)
        optimizer.zero_grad()
        losses.loss.backward()
        optimizer.step()
        n_steps += 1
    assert n_steps == len(dm.sampler("train"))
    module.eval()
    with torch.no_grad():
        for tensors in dm.val_dataloader():
            _, _, losses = module(tensors)
            assert torch.isfinite(losses.loss)


# ---------------------------------------------------------------------------- bad input


def _bad_setup(tmp_path, corpus_files, bad: Path, **kwargs):
    files = [corpus_files[0], bad]
    kwargs = {"batch_key": "sample", "cache_dir": tmp_path / "cache", **kwargs}
    return TissueCorpus(files, vocabulary=CORPUS_VOCAB, **kwargs)


def test_file_without_vocabulary_genes(corpus_files, tmp_path):
    rng = np.random.default_rng(1)
    obs = pd.DataFrame({"sample": ["a"] * 20})
    bad = write_h5ad(
        tmp_path / "mouse.h5ad", sp.csr_matrix(poisson_counts(rng, 20, 5)), list("vwxyz"), obs
    )
    with pytest.raises(ValueError, match=r"mouse\.h5ad.*None of the 5 input genes"):
        _bad_setup(tmp_path, corpus_files, bad)


def test_non_count_file(corpus_files, tmp_path):
    rng = np.random.default_rng(1)
    x = np.log1p(poisson_counts(rng, 30, 10) * 1.3)
    obs = pd.DataFrame({"sample": ["a"] * 30})
    bad = write_h5ad(tmp_path / "lognorm.h5ad", sp.csr_matrix(x), CORPUS_VOCAB[:10], obs)
    with pytest.raises(ValueError, match=r"lognorm\.h5ad.*non-integer.*layer="):
        _bad_setup(tmp_path, corpus_files, bad)
    neg = write_h5ad(
        tmp_path / "neg.h5ad", -poisson_counts(rng, 30, 10) - 1, CORPUS_VOCAB[:10], obs
    )
    with pytest.raises(ValueError, match=r"neg\.h5ad.*negative"):
        _bad_setup(tmp_path, corpus_files, neg)


def test_missing_key_in_one_file(corpus_files, tmp_path):
    rng = np.random.default_rng(1)
    nokey = write_h5ad(
        tmp_path / "nokey.h5ad", sp.csr_matrix(poisson_counts(rng, 20, 10)), CORPUS_VOCAB[:10]
    )
    with pytest.raises(KeyError, match=r"batch_key='sample'.*nokey\.h5ad.*per-file list"):
        _bad_setup(tmp_path, corpus_files, nokey)
    with pytest.raises(KeyError, match=r"spatial_key='spatial'.*f0\.h5ad.*None"):
        _bad_setup(tmp_path, corpus_files, corpus_files[2], spatial_key="spatial")
    with pytest.raises(KeyError, match=r"gene_key='symbol'.*f0\.h5ad"):
        _bad_setup(tmp_path, corpus_files, corpus_files[1], gene_key="symbol")
    with pytest.raises(KeyError, match=r"layer='counts'.*f0\.h5ad"):
        _bad_setup(tmp_path, corpus_files, corpus_files[1], layer="counts")


def test_unreadable_file(corpus_files, tmp_path):
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ValueError, match=r"broken\.h5ad.*cannot be read as an \.h5ad"):
        _bad_setup(tmp_path, corpus_files, broken)
    with pytest.raises(ValueError, match=r"missing\.h5ad.*cannot be read"):
        _bad_setup(tmp_path, corpus_files, tmp_path / "missing.h5ad")
    with pytest.raises(ValueError, match="per file"):
        TissueCorpus(corpus_files, vocabulary=CORPUS_VOCAB, gene_key=[None, "symbol"])


# ---------------------------------------------------------------------------- memory

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from cellplm_scvi.data import TissueCorpus

    def status_kb(field):
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith(field)).split()[1])

    def high_water_kb():  # VmHWM is per address space (ru_maxrss is not): a fork starts it at
        return status_kb("VmHWM")  # the current RSS, pages shared with the parent included

    files, vocab = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    before = high_water_kb()
    dm = TissueCorpus(files, vocabulary=vocab, max_cells=500, validation_size=0.0,
                      cache_dir=sys.argv[3])
    n = 0
    for batch in dm.train_dataloader():
        n += batch["X"].shape[0]
    print(json.dumps({"cells": n, "before_kb": before, "rss_kb": status_kb("VmRSS"),
                      "peak_kb": high_water_kb()}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_rss_bounded_by_tissues_not_corpus(tmp_path):
    """Peak RSS grows far less than the corpus between a 1-file and a 4-file corpus."""
    rng = np.random.default_rng(0)
    n_cells, n_genes, nnz_per_cell = 50_000, 2_000, 200
    files = []
    for k in range(4):
        indptr = np.arange(0, (n_cells + 1) * nnz_per_cell, nnz_per_cell, dtype=np.int64)
        indices = np.sort(
            rng.integers(0, n_genes, (n_cells, nnz_per_cell), dtype=np.int32), axis=1
        ).ravel()
        data = rng.integers(1, 20, n_cells * nnz_per_cell).astype(np.float32)
        x = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
        x.sum_duplicates()
        files.append(
            write_h5ad(tmp_path / f"big{k}.h5ad", x, official_config()["gene_list"][:n_genes])
        )
    vocab = official_config()["gene_list"][:n_genes]
    stored_bytes = 8 * n_cells * nnz_per_cell  # float32 data + int32 indices of one file
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)

    def start(paths) -> tuple[multiprocessing.Process, Path]:
        args = [json.dumps([str(p) for p in paths]), json.dumps(vocab), str(tmp_path / "c")]
        log = tmp_path / f"rss_{len(paths)}.log"
        return start_script([script, *args], log, env={"OMP_NUM_THREADS": "1"}), log

    def peak_kb(run: tuple[multiprocessing.Process, Path], n_files: int) -> int:
        exitcode, out = finish_script(*run)
        assert exitcode == 0, out[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["cells"] == n_cells * n_files
        return result["peak_kb"]

    # each process measures its own peak, so the two (one thread each) run at once
    runs = start(files[:1]), start(files)
    one, four = peak_kb(runs[0], 1), peak_kb(runs[1], 4)
    growth = (four - one) * 1024
    print(f"peak RSS: 1 file {one / 1024:.0f} MB, 4 files {four / 1024:.0f} MB")
    assert growth < 1024**3
    assert growth < 0.5 * 3 * stored_bytes  # far less than the three extra files' counts


def test_dataloader_workers_open_their_own_files(corpus_files, tmp_path):
    """With workers the dataset is pickled without h5py handles; every row still comes once."""
    dm = corpus(corpus_files, cache_dir=tmp_path, num_workers=2)
    rows = [batch["ind_x"].view(-1) for batch in dm.val_dataloader()]
    np.testing.assert_array_equal(np.sort(torch.cat(rows).numpy()), dm.val_idx)
    assert dm.dataset._handles == {}  # the main process opened nothing


# ------------------------------------------------------------------ training a CellPLM


def test_cellplm_from_the_registry_trains_on_the_corpus(corpus_files, tmp_path):
    """``CellPLM(adata=None, registry=dm.registry)`` + ``train(datamodule=dm)``: the loss of
    each minibatch uses its file's measured genes; the trained model exports to the official
    format and embeds a new AnnData through ``load_official``."""
    dm = corpus(corpus_files, spatial_key=[None, None, "spatial", None], cache_dir=tmp_path)
    model = cp.CellPLM(
        adata=None, registry=dm.registry, n_hidden=32, n_layers=1, n_heads=4, n_latent=8,
        spatial_pe=False,
    )  # fmt: skip
    assert (
        model.module.n_vocab == len(CORPUS_VOCAB) and model._gene_layout is None
    )  # corpus columns
    seen, seen_full = [], []
    measured_weights = model.module.measured_weights

    def spy(tensors):
        out = measured_weights(tensors)
        file_mask = tensors["measured"].bool()
        seen.append(out is not None and bool((out == file_mask).all()))
        seen_full.append(bool(file_mask.all()))
        return out

    model.module.measured_weights = spy
    model.train(datamodule=dm, max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    loss = model.history["train_loss"].to_numpy(dtype=float).ravel()
    assert len(loss) == 2 and np.isfinite(loss).all()
    assert seen and all(seen)  # every cell's loss uses its file's measured genes
    assert not all(seen_full)  # panels: some files did not measure every gene
    with pytest.raises(ValueError, match="not set up"):  # test_corpus_models: set up, it works
        model.get_latent_representation(ad.read_h5ad(corpus_files[0]))
    z_val = model.get_latent_representation(dataloader=dm.val_dataloader())
    assert z_val.shape[1] == 8 and np.isfinite(z_val).all()
    model.save(tmp_path / "scvi_layout")  # no AnnData: genes come from the registry
    saved = torch.load(tmp_path / "scvi_layout" / "model.pt", weights_only=True)
    assert saved["var_names"] == list(CORPUS_VOCAB)
    with pytest.raises(ValueError, match="no AnnData"):
        model.save(tmp_path / "with_adata", save_anndata=True)
    model.save_official(tmp_path / "pretrained")
    new = ad.read_h5ad(corpus_files[0])
    cp.CellPLM.setup_anndata(new)
    again = cp.CellPLM.load_official(tmp_path / "pretrained", new)
    z = again.get_latent_representation()
    assert z.shape == (new.n_obs, 8) and np.isfinite(z).all()
