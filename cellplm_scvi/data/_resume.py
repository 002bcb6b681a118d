"""A training loader whose place within the epoch goes into Lightning checkpoints.

Lightning 2.x saves ``loader.state_dict()`` in every checkpoint for each training loader that
has ``state_dict`` / ``load_state_dict`` (``CombinedLoader._state_dicts``), and on resume calls
``load_state_dict`` before it creates the epoch's iterator. A plain ``DataLoader`` has neither, so
a run resumed mid-epoch starts the epoch's tissues from the first one again (Lightning warns
"your dataloader is not resumable"). :class:`ResumableLoader` (the training loader of
:class:`~cellplm_scvi.data.TissueCorpus`, and the base of
:class:`~cellplm_scvi.data.TissueDataLoader`, the AnnData path's) keeps ``(epoch, position)``:
the steps it has handed to the trainer, counted where they leave the loader (DataLoader workers
read ahead of the trainer, so the sampler's own count would be ahead), and on resume skips that
many steps of the same epoch's order (the sampler's ``start``: see
:class:`~cellplm_scvi.data.TissueBatchSampler`). Skipping reads no data: the sampler's order is
a function of ``(seed, epoch)`` only.

Under DDP the checkpoint holds rank 0's state; every rank has the same number of steps per
epoch (:class:`~cellplm_scvi.data.TissueBatchSampler` pads), so rank 0's position is every
rank's, and each rank skips its own share.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableLoader(DataLoader):
    """``DataLoader`` over a tissue sampler (``batch_size=None``: the sampler yields whole
    steps) that Lightning can checkpoint and resume mid-epoch.

    Parameters
    ----------
    dataset
        Reads one step's rows (:class:`~cellplm_scvi.data._corpus.CorpusDataset`; for
        :class:`~cellplm_scvi.data.TissueDataLoader`, a subclass,
        :class:`~cellplm_scvi.data.TissueDataset`).
    sampler
        A sampler with ``set_epoch``, ``epoch`` and ``start`` (its next iteration begins that
        many steps into the epoch) whose order depends on the epoch only
        (:class:`~cellplm_scvi.data.TissueBatchSampler`).
    **kwargs
        Passed to :class:`torch.utils.data.DataLoader` (``num_workers``, ...).
    """

    def __init__(self, dataset: Dataset, sampler: Sampler, **kwargs):
        # a generator of its own: starting an epoch's iterator then draws nothing from the
        # global torch generator, whose state checkpoints restore (masks and dropout)
        kwargs.setdefault(
            "generator", torch.Generator().manual_seed(int(getattr(sampler, "seed", 0)))
        )
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)
        self.position = 0  # steps of the current epoch handed out so far

    @property
    def tissue_sampler(self) -> Sampler:
        """The tissue sampler (``self.sampler``)."""
        return self.sampler

    def __iter__(self):
        self.position = self.sampler.start
        batches = super().__iter__()  # its sampler iteration skips `start` steps
        # only the first epoch after a resume skips (a multi-process iterator iterates the
        # sampler twice while it is built, so `start` is reset once it exists)
        self.sampler.start = 0
        for batch in batches:
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "n_steps"}``: where the epoch stands (saved by Lightning)."""
        return {"epoch": self.sampler.epoch, "position": self.position, "n_steps": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after ``state["position"]`` steps of ``state["epoch"]`` (a checkpoint saved
        after an epoch's last step continues with the next epoch's first)."""
        if state.get("n_steps", len(self)) != len(self):
            raise ValueError(
                f"The checkpoint was saved with {state['n_steps']} training steps per epoch, this "
                f"loader has {len(self)}: resume with the same corpus, split, seed, "
                "max_cells_per_step and number of processes (devices x num_nodes)."
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if position >= len(self):
            epoch, position = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = position
        self.position = position
