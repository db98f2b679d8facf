"""What leaves a client: an Update holds what the method uploads (its GLOBAL tensors unless it
declares otherwise) and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Update:
    """One client's reply to a round: the uploaded tensors, its sample count n_i and its
    metrics."""

    client_id: int
    round: int
    tensors: dict[str, Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
