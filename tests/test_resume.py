"""Checkpoints every N steps and resume after a crash (issue 13 item 2).

The slow test kills a training process with SIGKILL mid-epoch, after it wrote a checkpoint,
resumes it from ``last.ckpt`` and compares with an uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

import cellplm_scvi as cp
from cellplm_scvi.data._resume import ResumableLoader
from tests._helpers import corpus, finish_script, start_script

SCRIPT = Path(__file__).parent / "scripts" / "resume_train.py"


def _steps(loader) -> list[tuple[int, ...]]:
    return [tuple(sorted(rows)) for rows in loader.sampler]


def test_loader_state_skips_the_steps_taken(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    loader.sampler.set_epoch(1)
    epoch = _steps(loader)  # the whole epoch 1, in order
    n = len(loader)
    assert len(epoch) == n > 3

    loader.sampler.set_epoch(1)
    taken = []
    for k, batch in enumerate(loader):  # a run that stops after 3 steps
        taken.append(tuple(np.unique(batch["ind_x"].view(-1).numpy()).tolist()))
        if k == 2:
            break
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 3, "n_steps": n}

    resumed = corpus(corpus_files, cache_dir=tmp_path).train_dataloader()  # a new process
    resumed.load_state_dict(state)
    rest = [tuple(np.unique(b["ind_x"].view(-1).numpy()).tolist()) for b in resumed]
    assert taken + rest == epoch  # the epoch, each step once, in the same order
    assert resumed.state_dict()["position"] == n
    # the next iteration is a whole epoch again
    assert len(list(resumed.sampler)) == n

    # DataLoader workers read ahead of the trainer: the position is still the trainer's
    workers = corpus(corpus_files, cache_dir=tmp_path, num_workers=2).train_dataloader()
    workers.load_state_dict(state)
    rest = [tuple(np.unique(b["ind_x"].view(-1).numpy()).tolist()) for b in workers]
    assert taken + rest == epoch

    # a checkpoint after an epoch's last step continues with the next epoch's first
    after_last = corpus(corpus_files, cache_dir=tmp_path).train_dataloader()
    after_last.load_state_dict({"epoch": 1, "position": n, "n_steps": n})
    loader.sampler.set_epoch(2)
    assert _steps(after_last) == _steps(loader)

    with pytest.raises(ValueError, match="training steps per epoch"):
        after_last.load_state_dict({"epoch": 0, "position": 1, "n_steps": n + 1})


def _anndata_splitter(**kwargs) -> cp.data.TissueDataSplitter:
    """24 tissues of 10 cells in one AnnData, set up for CellPLM."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (240, 30)).astype(np.float32)))
    adata.var_names = cp._genes.official_config()["gene_list"][:30]
    adata.obs["tissue"] = [f"t{i // 10}" for i in range(240)]
    cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
    manager = cp.CellPLM(adata, n_hidden=8, n_layers=1, n_latent=2).adata_manager
    return cp.data.TissueDataSplitter(
        manager, train_size=0.75, shuffle_set_split=False, split_by="tissues", **kwargs
    )


def _rows(batch) -> tuple[int, ...]:
    return tuple(np.unique(batch["ind_x"].view(-1).numpy()).tolist())


@pytest.mark.parametrize("pack", [False, True])
def test_anndata_loader_state_skips_the_steps_taken(pack):
    kwargs = {"max_cells_per_step": 25, "drop_node_rate": 0.3, "pack_tissues": pack}
    loader = _anndata_splitter(**kwargs).train_dataloader()
    assert isinstance(loader, ResumableLoader)
    loader.sampler.set_epoch(1)
    epoch = [_rows(b) for b in loader]  # the whole epoch 1, in order
    n = len(loader)
    assert len(epoch) == n >= 6

    loader.sampler.set_epoch(1)
    taken = []
    for k, batch in enumerate(loader):  # a run that stops after 4 steps
        taken.append(_rows(batch))
        if k == 3:
            break
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 4, "n_steps": n}

    resumed = _anndata_splitter(**kwargs).train_dataloader()  # a new process
    resumed.load_state_dict(state)
    assert taken + [_rows(b) for b in resumed] == epoch  # each step once, in the same order
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == n  # the next epoch is whole again
    with pytest.raises(ValueError, match="training steps per epoch"):
        resumed.load_state_dict({"epoch": 0, "position": 1, "n_steps": n + 1})

    # inference loaders: whole tissues in registered order, emission_order unchanged
    splitter = _anndata_splitter(**kwargs)
    val = splitter.val_dataloader()
    assert val.generator is None and val.sampler.start == 0
    assert [len(r) for r in val.sampler] == [10] * 6


def test_train_refuses_resume_arguments_that_would_do_nothing(corpus_files, tmp_path):
    dm = corpus(corpus_files, cache_dir=tmp_path)
    model = cp.CellPLM(adata=None, registry=dm.registry, n_hidden=8, n_layers=1, n_latent=2)
    kwargs = {"datamodule": dm, "max_epochs": 1, "accelerator": "cpu"}
    with pytest.raises(ValueError, match="checkpoint_every_n_steps"):
        model.train(ckpt_path="last", **kwargs)
    with pytest.raises(ValueError, match="checkpoint_every_n_steps"):
        model.train(checkpoint_dir=tmp_path / "ck", **kwargs)
    with pytest.raises(ValueError, match="not a file"):
        model.train(ckpt_path=tmp_path / "missing.ckpt", **kwargs)
    with pytest.raises(ValueError, match="positive int"):
        model.train(checkpoint_every_n_steps=0, **kwargs)


def _start(mode: str, out: Path, ckpt_dir: Path, files) -> multiprocessing.Process:
    """Start the training script (one thread) in the background, in a new process."""
    out.mkdir()
    return start_script(
        [SCRIPT, mode, out, ckpt_dir, *files], out / "log.txt", env={"OMP_NUM_THREADS": "1"}
    )


def _finish(process: multiprocessing.Process, out: Path) -> tuple[int, str]:
    """The exit code and the output of a run of :func:`_start`."""
    return finish_script(process, out / "log.txt")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["corpus", "anndata"])
def test_killed_run_resumes_where_its_checkpoint_stopped(data, corpus_files, tmp_path):
    # a TissueCorpus, or one AnnData (the tissue splitter); both have 16 training steps per
    # epoch. Uninterrupted: 2 epochs of 16 steps; checkpoints every 3 steps
    files = corpus_files if data == "corpus" else ["anndata"]
    # the uninterrupted run and the killed one are independent: both run at once
    full = _start("full", tmp_path / "full", tmp_path / "ck_full", files)
    # killed at the end of step 20 (epoch 1, its 5th step); the last checkpoint is step 18
    crash = _start("crash:20", tmp_path / "crash", tmp_path / "ck", files)
    full_code, full_log = _finish(full, tmp_path / "full")
    crash_code, crash_log = _finish(crash, tmp_path / "crash")
    assert full_code == 0, full_log[-3000:]
    assert crash_code == -9, crash_log[-3000:]  # SIGKILL
    assert not (tmp_path / "crash" / "result.json").exists()
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)  # Lightning's way
    assert checkpoint["global_step"] == 18
    assert checkpoint["state_dict"]["module.latent.layers.1.kl_step_count"] == 18
    adam = checkpoint["optimizer_states"][0]["state"]
    assert {float(s["step"]) for s in adam.values()} == {18.0}
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in adam.values())  # real moments
    n_per_epoch = 16
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": 1, "position": 18 - n_per_epoch, "n_steps": n_per_epoch}]

    code, log = _finish(
        _start("resume", tmp_path / "resumed", tmp_path / "ck", files), tmp_path / "resumed"
    )
    assert code == 0, log[-3000:]
    assert "Restored all states from the checkpoint" in log
    start = json.loads((tmp_path / "resumed" / "start.json").read_text())
    assert start["global_step"] == 18 and start["epoch"] == 1
    assert start["adam_step"] == 18.0 and start["kl_step_count"] == 18
    assert start["loader_state"]["epoch"] == 1  # the first resumed step is epoch 1's third
    assert start["loader_state"]["position"] == 18 - n_per_epoch + 1

    want = _records(tmp_path / "full" / "steps.jsonl")
    crashed = [r for r in _records(tmp_path / "crash" / "steps.jsonl") if r["global_step"] < 18]
    got = _records(tmp_path / "resumed" / "steps.jsonl")
    assert got[0]["global_step"] == 18 and got[0]["batch_idx"] == 2
    # the interrupted epoch is not replayed: saved steps + resumed steps = the uninterrupted run
    assert [r["tissues"] for r in crashed + got] == [r["tissues"] for r in want]
    epoch_1 = [tuple(r["tissues"]) for r in crashed + got if r["epoch"] == 1]
    result = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert sorted(t for step in epoch_1 for t in step) == result["train_tissues"]

    # same seed, random generators restored: the resumed run is the uninterrupted one (CPU,
    # one process: identical floats)
    reference = json.loads((tmp_path / "full" / "result.json").read_text())
    assert reference["n_steps_per_epoch"] == n_per_epoch
    assert result["global_step"] == reference["global_step"] == 2 * n_per_epoch
    assert result["kl_step_count"] == reference["kl_step_count"] == 2 * n_per_epoch
    losses = {r["global_step"]: r["loss"] for r in _records(tmp_path / "full" / "losses.jsonl")}
    resumed_losses = _records(tmp_path / "resumed" / "losses.jsonl")
    assert [r["global_step"] for r in resumed_losses] == list(range(18, 2 * n_per_epoch))
    for r in resumed_losses:
        np.testing.assert_allclose(r["loss"], losses[r["global_step"]], rtol=1e-6)
    np.testing.assert_allclose(result["weights"], reference["weights"], rtol=0, atol=1e-6)
