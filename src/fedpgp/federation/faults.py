"""Client faults: a sampled client that raises, replies too late or sends an unusable update is
left out of that round's aggregation and recorded; the round fails only when fewer than
``min_clients`` usable updates are left.

Both runtimes apply this one rule: each turns every sampled client's reply into an
:class:`Update` or a :class:`Fault`, then calls :func:`screen_replies`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import FedPGPError
from .client import Client
from .server import Server
from .update import Update

log = logging.getLogger(__name__)


class RoundFailedError(FedPGPError):
    """Fewer than ``min_clients`` sampled clients replied with a usable update."""


@dataclass(frozen=True)
class Fault:
    """Why client ``client`` gave no usable update in round ``round`` (1-based, as the rows of
    results.json count rounds)."""

    client: int
    round: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The entry of a results row's ``faults`` list."""
        return {"client": self.client, "round": self.round, "reason": self.reason}


def train_or_fault(
    client: Client, global_tensors: Mapping[str, Tensor], round: int, timeout: float | None
) -> Update | Fault:
    """``client.train`` for 0-based ``round``; an exception, or a reply later than ``timeout``
    seconds, becomes a Fault. In process a late client cannot be stopped, so the time is checked
    when it returns (its PERSONAL tensors keep what it trained, as a remote client's would)."""
    started = time.monotonic()
    try:
        update = client.train(global_tensors, round)
    # Whatever a client raises is that client's fault, not the run's.
    except Exception as exc:
        log.warning("round %d: client %d raised", round + 1, client.id, exc_info=True)
        return Fault(client.id, round + 1, f"raised {type(exc).__name__}: {exc}")
    elapsed = time.monotonic() - started
    if timeout is not None and elapsed > timeout:
        log.warning(
            "round %d: client %d took %.2f s, client_timeout is %s s",
            round + 1,
            client.id,
            elapsed,
            timeout,
        )
        # The reason names the limit, not the measured time, so results.json stays free of times.
        return Fault(client.id, round + 1, f"no reply within client_timeout ({timeout} s)")
    return update


def screen_replies(
    server: Server, round: int, replies: Sequence[Update | Fault], min_clients: int
) -> tuple[list[Update], list[Fault]]:
    """The usable updates of 0-based ``round`` and the faults (unusable updates included).
    Raises RoundFailedError when fewer than ``min_clients`` updates are usable."""
    accepted: list[Update] = []
    faults: list[Fault] = []
    for reply in replies:
        if isinstance(reply, Fault):
            faults.append(reply)
            continue
        reason = server.check(reply)
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
            f"round {round + 1}: {len(accepted)} of {len(replies)} sampled clients sent a usable "
            f"update, min_clients is {min_clients} ({details})"
        )
    return accepted, faults
