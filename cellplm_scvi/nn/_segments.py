"""Several tissues in one step ("packed sentences"): which rows belong to which tissue.

A packed minibatch stacks the cells of T tissues; its ``"tissue_index"`` (N,) says which tissue
each row belongs to (0..T-1). :class:`TissueSegments` is built from it once per forward pass and
gives the per-tissue reductions the network and the loss need: sums and means over each
tissue's rows, and a padded (T, n_max) layout in which flow attention reduces over each tissue
alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TissueSegments:
    """Rows of T tissues stacked in one minibatch.

    Attributes
    ----------
    index
        (N,) long: the tissue of each row, 0..T-1 (rows need not be grouped).
    counts
        (T,) long: rows per tissue, all > 0.
    position
        (N,) long: rank of each row among its tissue's rows (in row order).
    n_max
        Rows of the largest tissue.
    """

    index: torch.Tensor
    counts: torch.Tensor
    position: torch.Tensor
    n_max: int

    @classmethod
    def from_index(cls, tissue_index: torch.Tensor) -> TissueSegments:
        """Build from a (N,) or (N, 1) tensor of tissue ids 0..T-1 (every id present)."""
        index = tissue_index.reshape(-1).long()
        if index.numel() == 0:
            raise ValueError("tissue_index is empty.")
        counts = torch.bincount(index.clamp_min(0))  # (T,)
        if bool(index.min() < 0) or bool((counts == 0).any()):
            raise ValueError(
                "tissue_index must number the tissues of a packed minibatch 0..T-1, each with "
                f"at least one row; got ids {torch.unique(index).tolist()[:10]}."
            )
        order = torch.argsort(index, stable=True)
        starts = torch.cumsum(counts, 0) - counts  # (T,)
        position = torch.empty_like(index)
        position[order] = torch.arange(len(index), device=index.device) - starts[index[order]]
        return cls(index, counts, position, int(counts.max()))

    @property
    def n_tissues(self) -> int:
        """T."""
        return len(self.counts)

    def rows(self) -> list[torch.Tensor]:
        """The row indices of each tissue, in row order: T tensors."""
        order = torch.argsort(self.index, stable=True)
        return list(torch.split(order, self.counts.tolist()))

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) -> (T,): the mean over each tissue's rows."""
        return segment_mean(values, self.index, self.n_tissues)

    def valid(self) -> torch.Tensor:
        """(T, n_max) bool: the padded slots that hold a row."""
        slots = torch.arange(self.n_max, device=self.counts.device)
        return slots[None, :] < self.counts[:, None]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(H, N, d) -> (H, T, n_max, d), zeros in the slots past each tissue's rows."""
        out = x.new_zeros(x.shape[0], self.n_tissues, self.n_max, x.shape[-1])
        out[:, self.index, self.position] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(H, T, n_max, d) -> (H, N, d)."""
        return x[:, self.index, self.position]


def segment_mean(values: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(M,) values and their (M,) segment ids -> (n_segments,) means (0 for an empty segment)."""
    sums = values.new_zeros(n_segments).index_add(0, index, values)
    counts = torch.bincount(index, minlength=n_segments).clamp_min(1)
    return sums / counts.to(values.dtype)
