"""What leaves a client: an Update holds the method's GLOBAL tensors and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Update:
    """One client's reply to a round: GLOBAL tensors, its sample count n_i and its metrics."""

    client_id: int
    round: int
    tensors: dict[str, Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_params(
        cls,
        client_id: int,
        round: int,
        params: Mapping[str, Tensor],
        global_keys: tuple[str, ...],
        num_samples: int,
        metrics: dict[str, float],
    ) -> Update:
        """Copy only the GLOBAL entries of ``params``; PERSONAL ones cannot get in."""
        tensors = {key: params[key].detach().clone() for key in global_keys}
        return cls(client_id, round, tensors, num_samples, metrics)
