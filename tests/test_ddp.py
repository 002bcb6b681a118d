"""Multi-process training through Lightning DDP (gloo on CPU) with the tissue sampler."""

import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest

from cellplm_scvi.data import TissueBatchSampler
from tests._helpers import finish_script, start_script

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def test_sampler_gives_every_rank_the_same_number_of_tissues():
    codes = np.repeat(np.arange(7), [5, 3, 8, 2, 6, 4, 1])
    indices = np.arange(len(codes))
    per_rank = []
    for rank in range(2):
        sampler = TissueBatchSampler(indices, codes, shuffle=True, num_replicas=2, rank=rank)
        steps = list(sampler)
        assert len(steps) == len(sampler) == 4  # 7 tissues padded to 8, split over 2 ranks
        for cells in steps:  # each step is one whole tissue
            assert len(set(codes[cells])) == 1
            assert len(cells) == (codes == codes[cells[0]]).sum()
        per_rank.append({int(codes[s[0]]) for s in steps})
    assert per_rank[0] | per_rank[1] == set(range(7))  # all tissues are seen


def _start(tmp_path: Path, devices: int) -> multiprocessing.Process:
    """Start the training script with ``devices`` processes, in the background (rank 0 in a
    new process, the other ranks in subprocesses Lightning starts)."""
    out = tmp_path / f"loss_{devices}.json"
    return start_script([SCRIPT, out, devices], tmp_path / f"log_{devices}.txt", cwd=tmp_path)


def _loss_curve(process: multiprocessing.Process, tmp_path: Path, devices: int) -> list[float]:
    exitcode, log = finish_script(process, tmp_path / f"log_{devices}.txt")
    assert exitcode == 0, log[-3000:]
    result = json.loads((tmp_path / f"loss_{devices}.json").read_text())
    assert result["world_size"] == devices  # the processes Lightning really ran
    return result["train_loss"]


@pytest.mark.slow
def test_ddp_two_processes_trains_like_one(tmp_path):
    started = {devices: _start(tmp_path, devices) for devices in (1, 2)}  # independent runs
    single, ddp = (_loss_curve(started[devices], tmp_path, devices) for devices in (1, 2))
    assert len(single) == len(ddp) == 6
    assert np.isfinite(ddp).all()
    assert ddp[-1] < ddp[0]  # it learns
    # same data and model; each DDP step averages two tissues, so it takes half the steps per
    # epoch: the curves agree within 15% epoch by epoch and 5% at the end
    np.testing.assert_allclose(ddp, single, rtol=0.15)
    np.testing.assert_allclose(ddp[-1], single[-1], rtol=0.05)


# ------------------------------------------------------------------------ a TissueCorpus


CORPUS_SCRIPT = Path(__file__).parent / "scripts" / "ddp_corpus.py"


@pytest.mark.slow
def test_ddp_over_a_corpus_shares_tissues_and_averages_gradients(
    corpus_files,
    tmp_path,
    monkeypatch,
):
    import torch

    sys.path.insert(0, str(CORPUS_SCRIPT.parent))
    import ddp_corpus  # the script's corpus, model and fixed randomness

    out = tmp_path / "ddp"
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    log = tmp_path / "log.txt"
    process = start_script([CORPUS_SCRIPT, out, 2, *corpus_files], log, env=env)
    exitcode, output = finish_script(process, log)
    assert exitcode == 0, output[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]  # the processes Lightning really ran

    # every epoch: each training tissue on one rank, one repeated to pad 15 tissues to 2 x 8
    dm = ddp_corpus.corpus([str(f) for f in corpus_files], tmp_path / "cache")
    train = set(dm.train_tissues.tolist())
    assert len(train) == 15
    for epoch in ("0", "1"):
        per_rank = [[t for step in r["steps"][epoch] for t in step] for r in ranks]
        assert all(len(steps) == 8 for steps in per_rank)  # one tissue per step, 8 steps each
        seen = per_rank[0] + per_rank[1]
        assert set(seen) == train
        assert len(seen) - len(set(seen)) <= 2 - 1  # padding: at most world_size - 1 repeats
    assert ranks[0]["steps"]["0"] != ranks[0]["steps"]["1"]  # reshuffled each epoch

    # step 0 of 2 ranks x 1 tissue == one process: the mean of the two tissues' gradients, and
    # the two tissues packed in one step (their mean loss), with the same fixed randomness
    ddp_corpus.fix_randomness(monkeypatch.setattr)
    step0 = torch.load(out / "step0.pt", weights_only=True)
    module = ddp_corpus.build_model(dm).module
    rows = [np.flatnonzero(dm.tissue_codes == r["steps"]["0"][0][0]).tolist() for r in ranks]

    def gradients(batch) -> dict:
        module.load_state_dict(step0["weights"])  # also the KL counter: both ranks at step 0
        module.train()
        module.zero_grad()
        _, _, losses = module(batch, loss_kwargs={"kl_weight": 1.0})
        losses.loss.backward()
        return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    one, two = (gradients(dm.dataset[r]) for r in rows)
    mean = {n: (one.get(n, 0) + two.get(n, 0)) / 2 for n in one.keys() | two.keys()}
    packed = gradients(dm.dataset[rows])  # a list of row lists: one packed step
    ddp_grads = step0["grads"]
    for expected in (mean, packed):
        assert set(expected) <= set(ddp_grads) and len(expected) > 10
        largest = max(float(g.abs().max()) for g in expected.values())
        for name, grad in ddp_grads.items():
            if name not in expected:  # a floored GMVAE term: None here, all-reduced zeros
                assert not grad.any(), name
                continue
            # relative to the tensor's largest entry, or 1% of the largest gradient for a
            # tensor whose gradient nearly cancels (the key biases: attention is almost
            # invariant to them), where float32 summation order dominates
            scale = max(float(expected[name].abs().max()), 1e-2 * largest, 1e-12)
            err = float((grad - expected[name]).abs().max()) / scale
            assert err <= 1e-5, (name, err)
