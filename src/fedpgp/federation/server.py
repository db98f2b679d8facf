"""The server: GLOBAL tensors, client sampling and n_i-weighted aggregation."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..methods import Method, Tensors
from ..seeding import numpy_rng
from .update import Update

log = logging.getLogger(__name__)


def sample_clients(round: int, num_clients: int, frac: float, seed: int) -> list[int]:
    """Round 0 trains every client; later rounds draw max(int(frac*K), 1) clients uniformly
    without replacement from the run seed (METHOD.md section 2)."""
    if round == 0:
        return list(range(num_clients))
    count = max(int(frac * num_clients), 1)
    chosen = numpy_rng(seed, "sample", round).choice(num_clients, size=count, replace=False)
    return sorted(int(c) for c in chosen)


def weighted_mean(updates: list[Update], keys: tuple[str, ...]) -> Tensors:
    """sum_i (n_i / sum_j n_j) * tensor_i for each key."""
    total = sum(u.num_samples for u in updates)
    return {
        key: sum(u.tensors[key].double() * (u.num_samples / total) for u in updates).float()
        for key in keys
    }


class Server:
    """Holds the GLOBAL tensors; samples clients and aggregates their Updates."""

    def __init__(
        self, method: Method, global_tensors: Tensors, num_clients: int, seed: int
    ) -> None:
        self.method = method
        self.global_tensors = global_tensors
        self.num_clients = num_clients
        self.seed = seed

    def sample(self, round: int) -> list[int]:
        return sample_clients(round, self.num_clients, self.method.cfg.frac, self.seed)

    def check(self, update: Update) -> str | None:
        """Why ``update`` must not be averaged in, or None if it is sound."""
        expected = set(self.method.global_keys)
        if set(update.tensors) != expected:
            return f"tensors {sorted(update.tensors)} but expected {sorted(expected)}"
        if not isinstance(update.num_samples, int) or update.num_samples <= 0:
            return f"num_samples must be a positive int, got {update.num_samples!r}"
        for key, value in update.tensors.items():
            reference: Tensor = self.global_tensors[key]
            if not isinstance(value, Tensor) or value.shape != reference.shape:
                shape = getattr(value, "shape", None)
                return f"{key} has shape {tuple(shape or ())}, expected {tuple(reference.shape)}"
            if value.dtype != reference.dtype:
                return f"{key} has dtype {value.dtype}, expected {reference.dtype}"
            if not torch.isfinite(value).all():
                return f"{key} has non-finite values"
        return None

    def aggregate(self, updates: list[Update]) -> list[tuple[int, str]]:
        """Average the sound updates into the GLOBAL tensors; returns the rejected ones
        as (client id, reason)."""
        accepted, rejected = [], []
        for update in updates:
            reason = self.check(update)
            if reason is None:
                accepted.append(update)
            else:
                log.warning(
                    "round %d: dropped update of client %d: %s",
                    update.round,
                    update.client_id,
                    reason,
                )
                rejected.append((update.client_id, reason))
        if accepted and self.method.global_keys:
            self.global_tensors = weighted_mean(accepted, self.method.global_keys)
        return rejected
