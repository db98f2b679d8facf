"""The server's policy: which clients train each round, what each is sent, which replies are
sound, and how the sound uploads become the new GLOBAL tensors. It knows no transport: both
runtimes hand it Updates and Faults and take what it decides."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..checkpoint import RunState
from ..methods.base import Method, Tensors
from ..seeding import numpy_rng
from .faults import Fault, RoundFailedError
from .update import Update

log = logging.getLogger(__name__)


def sample_clients(round: int, num_clients: int, frac: float, seed: int) -> list[int]:
    """Round 0 trains every client; later rounds draw max(int(frac*K), 1) clients uniformly
    without replacement from the run seed (docs/method.md section 3)."""
    if round == 0:
        return list(range(num_clients))
    count = max(int(frac * num_clients), 1)
    chosen = numpy_rng(seed, "sample", round).choice(num_clients, size=count, replace=False)
    return sorted(int(c) for c in chosen)


class Server:
    """Holds the GLOBAL tensors (and, for methods that keep them, every client's latest
    upload); samples clients, screens their replies and combines the sound uploads.

    ``sample_counts`` (client id -> number of training samples, from the partition manifest)
    makes a reply that claims another n_i unusable: a client cannot weigh itself up."""

    def __init__(
        self,
        method: Method,
        global_tensors: Tensors,
        num_clients: int,
        seed: int,
        sample_counts: Mapping[int, int] | None = None,
    ) -> None:
        self.method = method
        self.global_tensors = global_tensors
        self.num_clients = num_clients
        self.seed = seed
        self.sample_counts = dict(sample_counts) if sample_counts is not None else None
        self.stored: dict[int, Tensors] = {}

    def sample(self, round: int) -> list[int]:
        return sample_clients(round, self.num_clients, self.method.cfg.frac, self.seed)

    def sends(self, client_id: int, round: int) -> Tensors:
        """What client ``client_id`` receives for ``round``: the GLOBAL tensors and whatever
        the method adds from the uploads the server keeps."""
        extra = self.method.server_sends(client_id, round, self.stored)
        clash = set(extra) & set(self.global_tensors)
        if clash:
            raise RuntimeError(f"method {self.method.name} sends {sorted(clash)} twice")
        return {**self.global_tensors, **extra}

    def check(self, update: Update) -> str | None:
        """Why ``update`` must not be combined, or None if it is sound: exactly the tensors the
        method uploads, each of the shape and dtype of the GLOBAL tensor of its name and
        finite, from a known client with its true sample count."""
        if not 0 <= update.client_id < self.num_clients:
            return f"from unknown client {update.client_id}"
        expected = set(self.method.upload_keys)
        if set(update.tensors) != expected:
            return f"tensors {sorted(update.tensors)} but expected {sorted(expected)}"
        count = update.num_samples
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            return f"num_samples must be a positive int, got {count!r}"
        if self.sample_counts is not None and count != self.sample_counts[update.client_id]:
            return (
                f"num_samples {count}, but client {update.client_id} holds "
                f"{self.sample_counts[update.client_id]} training samples"
            )
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

    def screen(
        self, round: int, replies: Sequence[Update | Fault], min_clients: int
    ) -> tuple[list[Update], list[Fault]]:
        """The usable updates of 0-based ``round`` and the faults (unusable updates included).
        Raises RoundFailedError when fewer than ``min_clients`` updates are usable."""
        accepted: list[Update] = []
        faults: list[Fault] = []
        for reply in replies:
            if isinstance(reply, Fault):
                faults.append(reply)
                continue
            reason = self.check(reply)
            if reason is None:
                accepted.append(reply)
            else:
                log.warning(
                    "round %d: dropped update of client %d: %s", round + 1, reply.client_id, reason
                )
                faults.append(Fault(reply.client_id, round + 1, f"unusable update: {reason}"))
        if len(accepted) < min_clients:
            details = "; ".join(f"client {f.client} {f.reason}" for f in faults)
            raise RoundFailedError(
                f"round {round + 1}: {len(accepted)} of {len(replies)} sampled clients sent a "
                f"usable update, min_clients is {min_clients} ({details})"
            )
        return accepted, faults

    def aggregate(self, accepted: Sequence[Update]) -> None:
        """Combine the screened ``accepted`` updates into the GLOBAL tensors, and keep each
        client's upload when the method asks for it."""
        if self.method.keeps_uploads:
            for update in accepted:
                self.stored[update.client_id] = dict(update.tensors)
        if accepted and self.method.global_keys:
            self.global_tensors = self.method.combine(self.global_tensors, accepted)

    def restore(self, state: RunState) -> None:
        """Take the GLOBAL tensors and kept uploads of ``state`` (checked beforehand by
        Checkpoint.check_fits), on the device of the current ones and in the method's order:
        a shared optimizer indexes its buffers by position."""
        self.global_tensors = {
            key: state.global_tensors[key].to(value.device)
            for key, value in self.global_tensors.items()
        }
        # Kept uploads are of GLOBAL tensors (Server.check), so each has a GLOBAL namesake.
        self.stored = {
            cid: {k: v.to(self.global_tensors[k].device) for k, v in upload.items()}
            for cid, upload in state.stored.items()
        }
