"""A node's PERSONAL state on disk, by round, so that a run can resume after any process dies.

Partition p keeps ``<state-dir>/<run id>/partition-<p>/round-<r>.safetensors``: its PERSONAL
tensors and kept optimizer buffers after r completed rounds of the run (r = the last round it
trained in), in the client-state format of checkpoints (fedpgp.checkpoint.flatten_client_state)
with the run id, partition, round and run digest as metadata. The run id is fedpgp's (run.json),
not Flower's: a resumed run is a new ``flwr run`` but the same fedpgp run.

Every message names the state the server expects the node to start from (``state-round``) and
the one the server's last checkpoint refers to (``kept-round``). The node keeps exactly those
two and the one it just wrote, so a server that resumes from its checkpoint finds the state
that checkpoint belongs to, and a state newer than the server's is dropped, never used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors
from torch import Tensor

from ...atomic import write_bytes_atomic
from ...checkpoint import flatten_client_state, split_client_state
from ...errors import CheckpointError
from ...methods.base import Tensors

log = logging.getLogger(__name__)

FORMAT = "fedpgp-node-state"
VERSION = "2"
_NAME = re.compile(r"round-(\d{6})\.safetensors")


class StateError(CheckpointError):
    """A node cannot start from the state the server expects: the run must stop."""


def state_folder(state_dir: Path, run_id: str, partition_id: int) -> Path:
    """Where partition ``partition_id`` keeps its states for run ``run_id``."""
    return Path(state_dir) / run_id / f"partition-{partition_id}"


def state_path(folder: Path, round: int) -> Path:
    return folder / f"round-{round:06d}.safetensors"


def saved_rounds(folder: Path) -> list[int]:
    """The rounds of the state files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = (_NAME.fullmatch(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _metadata(partition_id: int, round: int, run_id: str, digest: str) -> dict[str, str]:
    """What a state file records about itself (safetensors metadata holds strings only)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "run-id": run_id,
        "partition-id": str(partition_id),
        "round": str(round),
        "run-digest": digest,
    }


def save_state(
    folder: Path,
    partition_id: int,
    round: int,
    run_id: str,
    digest: str,
    personal: Mapping[str, Tensor],
    optimizer: Mapping[str, Tensor],
) -> Path:
    """Write the state after ``round`` rounds atomically (temp file, fsync, rename)."""
    metadata = _metadata(partition_id, round, run_id, digest)
    flat = flatten_client_state(personal, optimizer)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in flat.items()}
    path = state_path(folder, round)
    write_bytes_atomic(path, save_tensors(tensors, metadata=metadata))
    return path


def load_state(
    folder: Path,
    partition_id: int,
    round: int,
    run_id: str,
    digest: str,
    expected: Mapping[str, Tensor],
) -> tuple[Tensors, Tensors]:
    """(PERSONAL tensors, optimizer buffers) after ``round`` rounds. StateError naming the file
    when it is missing, unreadable, of another run, partition, round or config, or when its
    PERSONAL tensors are not those of ``expected`` (names, shapes, dtypes)."""
    path = state_path(folder, round)
    if not path.is_file():
        have = saved_rounds(folder)
        raise StateError(
            f"partition {partition_id}: the server expects the personal state of round {round}, "
            f"but {path} does not exist (this node holds rounds {have or 'none'})"
        )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            flat = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        raise StateError(f"personal state file {path} cannot be read: {exc}") from exc
    wanted = _metadata(partition_id, round, run_id, digest)
    wrong = {key: metadata.get(key) for key, value in wanted.items() if metadata.get(key) != value}
    if wrong:
        details = ", ".join(f"{k} {v!r} (expected {wanted[k]!r})" for k, v in wrong.items())
        raise StateError(f"personal state file {path}: {details}")
    try:
        personal, optimizer = split_client_state(flat)
    except ValueError as exc:
        raise StateError(f"personal state file {path}: {exc}") from exc
    shapes = {k: (v.dtype, tuple(v.shape)) for k, v in personal.items()}
    wanted_shapes = {k: (v.dtype, tuple(v.shape)) for k, v in expected.items()}
    if shapes != wanted_shapes:
        raise StateError(
            f"personal state file {path} holds {shapes}, the method expects {wanted_shapes}"
        )
    return personal, optimizer


def prune(folder: Path, keep: Iterable[int]) -> None:
    """Delete every state in ``folder`` but those of the rounds in ``keep``."""
    kept = set(keep)
    for round in saved_rounds(folder):
        if round not in kept:
            state_path(folder, round).unlink(missing_ok=True)
