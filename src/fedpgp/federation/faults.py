"""Client faults: a sampled client that raises, replies too late or sends an unusable update is
left out of that round's aggregation and recorded as a :class:`Fault`; the round fails only when
fewer than ``min_clients`` usable updates are left (:meth:`fedpgp.federation.server.Server.screen`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FedPGPError


class RoundFailedError(FedPGPError):
    """Fewer than ``min_clients`` sampled clients replied with a usable update."""


class ClientTimeoutError(Exception):
    """A client passed its deadline (``client_timeout``) during local training."""


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


def timeout_reason(timeout: float | None) -> str:
    """The reason of a late client; it names the limit, not the measured time, so that
    results.json stays free of times."""
    return f"no reply within client_timeout ({timeout} s)"
