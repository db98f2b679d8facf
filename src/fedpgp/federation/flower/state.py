"""A node's PERSONAL state: where it lives between messages, and on disk across restarts.

The state of partition i is its PERSONAL tensors (U, V for FedPGP) and, with
``optimizer_state: shared``, the momentum buffers of the node's optimizer. It is kept in
``context.state`` (which Flower keeps on the SuperNode, never in a Message) and, when the node
config names a ``state-dir``, in ``<state-dir>/run-<run id>/partition-<i>.safetensors``,
written atomically after every local round. The file is keyed by partition id, not node id: a
SuperNode restarted after a crash gets a new node id but keeps its partition and reloads the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors
from torch import Tensor

from ...atomic import write_bytes_atomic
from ...errors import CheckpointError
from .records import record_to_tensors, tensors_to_record

log = logging.getLogger(__name__)

FORMAT = "fedpgp-personal-state"
VERSION = "1"
TENSORS_RECORD = "fedpgp.personal"
META_RECORD = "fedpgp.personal-meta"
# Optimizer buffers share the tensor namespace with the PERSONAL tensors under this prefix.
OPTIMIZER_PREFIX = "optimizer."


@dataclass
class PersonalState:
    """Partition ``partition_id`` after local round ``round`` (0-based; -1 before any):
    its PERSONAL tensors and its optimizer's momentum buffers by parameter name."""

    partition_id: int
    round: int
    tensors: dict[str, Tensor]
    optimizer: dict[str, Tensor] = field(default_factory=dict)

    def flat(self) -> dict[str, Tensor]:
        """PERSONAL tensors and prefixed optimizer buffers in one mapping."""
        buffers = {OPTIMIZER_PREFIX + name: t for name, t in self.optimizer.items()}
        return {**self.tensors, **buffers}


def _split(flat: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    tensors = {k: v for k, v in flat.items() if not k.startswith(OPTIMIZER_PREFIX)}
    buffers = {
        k[len(OPTIMIZER_PREFIX) :]: v for k, v in flat.items() if k.startswith(OPTIMIZER_PREFIX)
    }
    return tensors, buffers


def state_file(state_dir: Path, run_id: int, partition_id: int) -> Path:
    """Where partition ``partition_id`` keeps its state for run ``run_id``."""
    return state_dir / f"run-{run_id}" / f"partition-{partition_id}.safetensors"


def save_state_file(path: Path, state: PersonalState, digest: str) -> None:
    """Write ``state`` atomically (temp file, fsync, rename) with its partition, round and the
    config digest as metadata."""
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "partition-id": str(state.partition_id),
        "round": str(state.round),
        "config-digest": digest,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.flat().items()}
    write_bytes_atomic(path, save_tensors(tensors, metadata=metadata))


def load_state_file(
    path: Path, partition_id: int, digest: str, expected: dict[str, tuple[int, ...]]
) -> PersonalState:
    """The state in ``path``; CheckpointError naming the file if it is unreadable, belongs to
    another partition or config, or its PERSONAL tensors are not ``expected`` (name -> shape)."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            flat = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"personal state file {path} cannot be read: {exc}") from exc
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise CheckpointError(
            f"personal state file {path}: expected format {FORMAT} version {VERSION}, got "
            f"{metadata.get('format')!r} version {metadata.get('version')!r}"
        )
    if metadata.get("partition-id") != str(partition_id):
        raise CheckpointError(
            f"personal state file {path} belongs to partition {metadata.get('partition-id')}, "
            f"not {partition_id}"
        )
    if metadata.get("config-digest") != digest:
        raise CheckpointError(
            f"personal state file {path} was written by a run with another config"
        )
    tensors, buffers = _split(flat)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if shapes != expected:
        raise CheckpointError(f"personal state file {path} holds {shapes}, expected {expected}")
    return PersonalState(partition_id, int(metadata["round"]), tensors, buffers)


def put_in_context(context_state: RecordDict, state: PersonalState, digest: str) -> None:
    """Keep ``state`` in the node's ``context.state`` for the next message of this run."""
    context_state[TENSORS_RECORD] = tensors_to_record(state.flat())
    context_state[META_RECORD] = ConfigRecord(
        {"partition-id": state.partition_id, "round": state.round, "config-digest": digest}
    )


def get_from_context(
    context_state: RecordDict, partition_id: int, digest: str
) -> PersonalState | None:
    """The state this node kept in ``context.state`` for ``partition_id``, or None."""
    meta = context_state.get(META_RECORD)
    record = context_state.get(TENSORS_RECORD)
    if not isinstance(meta, ConfigRecord) or record is None:
        return None
    if meta.get("partition-id") != partition_id or meta.get("config-digest") != digest:
        return None
    tensors, buffers = _split(record_to_tensors(record))
    return PersonalState(partition_id, int(meta["round"]), tensors, buffers)
