"""Run checkpoints: everything a run needs to continue exactly where it stopped, and the one
format of a client's state (its PERSONAL tensors and optimizer buffers by name) that
checkpoints and a Flower node's state files share.

The checkpoint of a run that has completed ``round`` rounds is two files in
``<run dir>/checkpoint/``:

- ``round-NNNNNN.safetensors``: every tensor: ``global/<name>``; ``stored/<client>/<name>``
  (uploads the server keeps); in process ``client/<client>/personal/<name>`` and the shared
  optimizer's ``optimizer/<tensor>/<field>`` (a Flower server holds no PERSONAL tensor: they
  stay on the nodes); ``rng/torch``;
- ``round-NNNNNN.json``: everything else (format version, the config and partition digests,
  the result rows so far, CLIP zero-shot's numbers once measured, which round's personal state
  each Flower node holds, numpy's and Python's RNG states), the size and sha256 of the tensor
  file, and a sha256 of its own content.

Each file is written to a temp file, fsynced and renamed; the JSON goes last and is the commit
mark, so a tensor file without its JSON is an interrupted write and is never read. Older
checkpoints are deleted only after the new JSON is in place. Nothing here unpickles: safetensors
and JSON only.

A checkpoint is read back only for the config it was written for (every key but the RELOCATABLE
ones, which say where files lie) and for the same partition (whose digest covers the dataset's
fingerprint); anything else is a CheckpointError, never a fresh start. Version 1 files (written
before the shared client-state format) are read too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from .atomic import write_bytes_atomic, write_text_atomic
from .config import RunConfig, describe_changes, run_changes, run_digest
from .config import saved_config as config_from_saved
from .errors import CheckpointError, ConfigError
from .seeding import check_rng

log = logging.getLogger(__name__)

FORMAT = "fedpgp-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
FOLDER = "checkpoint"
_NAME = re.compile(r"round-\d{6}\.(json|safetensors)")

Tensors = dict[str, Tensor]

PERSONAL_PREFIX = "personal/"
OPTIMIZER_PREFIX = "optimizer/"


def flatten_client_state(
    personal: Mapping[str, Tensor], optimizer: Mapping[str, Tensor]
) -> Tensors:
    """A client's state as one flat mapping: ``personal/<name>`` and the optimizer buffers
    ``optimizer/<tensor>/<field>`` (see Optimizers.buffers)."""
    return {
        **{PERSONAL_PREFIX + k: v for k, v in personal.items()},
        **{OPTIMIZER_PREFIX + k: v for k, v in optimizer.items()},
    }


def split_client_state(flat: Mapping[str, Tensor]) -> tuple[Tensors, Tensors]:
    """(PERSONAL tensors, optimizer buffers) of a flat client state; ValueError for a name that
    is neither."""
    personal, optimizer = {}, {}
    for name, value in flat.items():
        if name.startswith(PERSONAL_PREFIX):
            personal[name[len(PERSONAL_PREFIX) :]] = value
        elif name.startswith(OPTIMIZER_PREFIX):
            optimizer[name[len(OPTIMIZER_PREFIX) :]] = value
        else:
            raise ValueError(f"unexpected tensor {name!r} in a client state")
    return personal, optimizer


@dataclass
class RunState:
    """A run after ``round`` completed rounds.

    ``global_tensors`` and ``stored`` (the uploads the server keeps, by client) are the
    server's; ``personal`` (client -> PERSONAL tensors) and ``optimizer`` (the shared
    optimizer's buffers by name, {} when none is kept) are every client's in process and empty
    in a Flower run, whose ``node_rounds`` (partition -> the round of the personal state the
    server knows it holds) stand in for them. ``rows`` are the result rows so far,
    ``pending_faults`` the faults of rounds after the last evaluated one, ``zeroshot`` CLIP
    zero-shot's numbers once measured (at the last round), ``rng`` the global torch, numpy and
    Python RNG states."""

    round: int
    global_tensors: Tensors
    stored: dict[int, Tensors] = field(default_factory=dict)
    personal: dict[int, Tensors] = field(default_factory=dict)
    optimizer: Tensors = field(default_factory=dict)
    node_rounds: dict[int, int] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    pending_faults: list[dict] = field(default_factory=list)
    zeroshot: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; Windows cannot open a folder)."""
    if os.name == "nt":
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _remove_all_but(folder: Path, keep: str) -> None:
    """Delete every other checkpoint and any temp file an interrupted write left behind.
    JSON before tensors, so no older JSON ever points at a deleted tensor file."""
    entries = sorted(folder.iterdir(), key=lambda p: (not p.name.endswith(".json"), p.name))
    for path in entries:
        match = _NAME.fullmatch(path.name)
        stale_temp = path.name.startswith(".round-") and path.name.endswith(".tmp")
        if (match and path.stem != keep) or stale_temp:
            path.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, state: RunState, cfg: RunConfig, partition_digest: str) -> Path:
    """Write ``state`` as the run's newest checkpoint; returns the JSON file's path."""
    started = time.perf_counter()
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"round-{state.round:06d}"
    tensors = {
        **{f"global/{k}": v for k, v in state.global_tensors.items()},
        **{f"stored/{cid}/{k}": v for cid, up in state.stored.items() for k, v in up.items()},
        **{
            f"client/{cid}/{k}": v
            for cid, personal in state.personal.items()
            for k, v in flatten_client_state(personal, {}).items()
        },
        **{OPTIMIZER_PREFIX + k: v for k, v in state.optimizer.items()},
        "rng/torch": state.rng["torch"],
    }
    # safetensors refuses views that share storage; cloned CPU copies never do.
    blob = save_tensors({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()})
    write_bytes_atomic(folder / f"{stem}.safetensors", blob)
    body = {
        "round": state.round,
        "config_digest": run_digest(cfg),
        "config": cfg.to_dict(),
        "partition_digest": partition_digest,
        "tensor_bytes": len(blob),
        "tensor_sha256": hashlib.sha256(blob).hexdigest(),
        "rng": {"numpy": state.rng["numpy"], "python": state.rng["python"]},
        "rows": state.rows,
        "pending_faults": state.pending_faults,
        "zeroshot": state.zeroshot,
        "node_rounds": {str(k): v for k, v in sorted(state.node_rounds.items())},
    }
    document = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(_canonical(body)).hexdigest(),
        "body": body,
    }
    path = folder / f"{stem}.json"
    write_text_atomic(path, json.dumps(document, indent=1) + "\n")
    _fsync_folder(folder)
    _remove_all_but(folder, keep=stem)
    log.info(
        "checkpoint after round %d: %d tensor bytes, %.1f ms",
        state.round,
        len(blob),
        1000 * (time.perf_counter() - started),
    )
    return path


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The JSON files of the complete checkpoints in ``run_dir``, oldest first (a JSON file is
    the commit mark of its checkpoint; a tensor file alone is an interrupted write)."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".json" and _NAME.fullmatch(p.name))


def checkpointed_round(run_dir: Path) -> int:
    """The rounds completed by the newest complete checkpoint in ``run_dir`` (0 without one: a
    resume starts from round 0), from its file name alone."""
    found = complete_checkpoints(run_dir)
    return int(found[-1].stem.removeprefix("round-")) if found else 0


@dataclass
class Checkpoint:
    """A checkpoint read from disk and checked against the run's config."""

    path: Path
    state: RunState
    partition_digest: str

    def check_fits(
        self,
        initial_global: Mapping[str, Tensor],
        initial_personal: Mapping[int, Mapping[str, Tensor]] | None,
        partition_digest: str,
    ) -> None:
        """CheckpointError unless this checkpoint belongs to the run: the same partition, and
        GLOBAL (and, in process, every client's PERSONAL) tensors of the names, shapes and
        dtypes the method starts from."""
        if partition_digest != self.partition_digest:
            raise CheckpointError(
                f"checkpoint file {self.path}: written for partition {self.partition_digest[:16]}"
                f"..., but this run's partition is {partition_digest[:16]}... (the dataset or "
                f"partition.file changed); refusing to mix states"
            )
        expected = {f"global/{k}": v for k, v in initial_global.items()}
        found = {f"global/{k}": v for k, v in self.state.global_tensors.items()}
        if initial_personal is not None and self.state.node_rounds:
            raise CheckpointError(
                f"checkpoint file {self.path}: written by a Flower run (its clients' personal "
                f"state is on the nodes); resume it with --runtime flower-sim, or with `flwr "
                f"run` and resume=true for a deployment"
            )
        if initial_personal is not None:
            for cid, personal in initial_personal.items():
                expected.update({f"personal/{cid}/{k}": v for k, v in personal.items()})
            for cid, personal in self.state.personal.items():
                found.update({f"personal/{cid}/{k}": v for k, v in personal.items()})
        elif self.state.personal:
            raise CheckpointError(
                f"checkpoint file {self.path}: holds clients' PERSONAL tensors, so it was "
                f"written by an in-process run; resume it with --runtime inprocess"
            )
        if set(found) != set(expected):
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            raise CheckpointError(
                f"checkpoint file {self.path}: tensors do not match the method "
                f"(missing {missing[:4]}, unexpected {extra[:4]})"
            )
        for name, value in found.items():
            if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
                raise CheckpointError(
                    f"checkpoint file {self.path}: {name} is {value.dtype} {tuple(value.shape)}, "
                    f"expected {expected[name].dtype} {tuple(expected[name].shape)}"
                )

    def check_optimizer(self, trained: Sequence[str]) -> None:
        """CheckpointError unless the shared optimizer's buffers are of tensors in ``trained``."""
        names = {key.rsplit("/", 1)[0] for key in self.state.optimizer}
        unknown = sorted(names - set(trained))
        if unknown:
            raise CheckpointError(
                f"checkpoint file {self.path}: optimizer buffers of {unknown}, but the method "
                f"trains {list(trained)}"
            )


def _read_document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path}: cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"checkpoint file {path}: truncated or not JSON (line {exc.lineno} column "
            f"{exc.colno}: {exc.msg})"
        ) from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {path}: not a fedpgp checkpoint (no '{FORMAT}')")
    if document.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint file {path}: format version {document.get('version')!r}, but this "
            f"fedpgp reads versions {', '.join(map(str, READABLE_VERSIONS))} (a newer fedpgp "
            f"wrote it?)"
        )
    body = document.get("body")
    if not isinstance(body, dict):
        raise CheckpointError(f"checkpoint file {path}: no 'body' mapping")
    if hashlib.sha256(_canonical(body)).hexdigest() != document.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {path}: content does not match its recorded sha256 (corrupted)"
        )
    body["version"] = document["version"]
    return body


def _read_tensors(path: Path, body: dict[str, Any]) -> dict[str, Tensor]:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint tensor file {path}: cannot be read ({exc})") from exc
    if len(blob) != body["tensor_bytes"]:
        raise CheckpointError(
            f"checkpoint tensor file {path}: {len(blob)} bytes, expected {body['tensor_bytes']}"
            f" (truncated or overwritten)"
        )
    actual = hashlib.sha256(blob).hexdigest()
    if actual != body["tensor_sha256"]:
        raise CheckpointError(
            f"checkpoint tensor file {path}: sha256 {actual[:16]}..., expected "
            f"{body['tensor_sha256'][:16]}... (corrupted)"
        )
    try:
        return load_tensors(blob)
    # safetensors raises its own and Rust-side errors on a malformed file.
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint tensor file {path}: not a safetensors file ({exc})"
        ) from exc


def _v1_optimizer(tensors: dict[str, Tensor], trained: Sequence[str]) -> Tensors:
    """Version 1 named the shared optimizer's buffers by parameter position,
    ``optimizer/<index>/<field>``, in the order {GLOBAL, PERSONAL} of the method's keys."""
    named = {}
    for key, value in tensors.items():
        _, index, entry = key.split("/", 2)
        named[f"{trained[int(index)]}/{entry}"] = value
    return named


def _state_from(
    body: dict[str, Any], tensors: dict[str, Tensor], trained: Sequence[str]
) -> RunState:
    global_tensors: Tensors = {}
    stored: dict[int, Tensors] = {}
    personal: dict[int, Tensors] = {}
    optimizer: Tensors = {}
    rng_torch = tensors.pop("rng/torch")
    for name, value in tensors.items():
        kind, rest = name.split("/", 1)
        if kind == "global":
            global_tensors[rest] = value
        elif kind == "stored":
            cid, key = rest.split("/", 1)
            stored.setdefault(int(cid), {})[key] = value
        elif kind == "client":
            cid, key = rest.split("/", 1)
            personal.setdefault(int(cid), {}).update(split_client_state({key: value})[0])
        elif kind == "personal" and body["version"] == 1:
            cid, key = rest.split("/", 1)
            personal.setdefault(int(cid), {})[key] = value
        elif kind == "optimizer":
            optimizer[name] = value
        else:
            raise ValueError(f"unexpected tensor {name!r}")
    if body["version"] == 1:
        optimizer = _v1_optimizer(optimizer, trained)
    else:
        optimizer = {k[len(OPTIMIZER_PREFIX) :]: v for k, v in optimizer.items()}
    rng = {"torch": rng_torch, "numpy": body["rng"]["numpy"], "python": body["rng"]["python"]}
    check_rng(rng)
    return RunState(
        round=int(body["round"]),
        global_tensors=global_tensors,
        stored=stored,
        personal=personal,
        optimizer=optimizer,
        node_rounds={int(k): int(v) for k, v in body.get("node_rounds", {}).items()},
        rows=list(body["rows"]),
        pending_faults=list(body["pending_faults"]),
        zeroshot=body.get("zeroshot"),
        rng=rng,
    )


def load_checkpoint(run_dir: Path, cfg: RunConfig, trained: Sequence[str] = ()) -> Checkpoint:
    """The newest complete checkpoint of ``run_dir``, checked: format version, its own hash,
    the tensor file's size and hash, and that it was written for ``cfg``. ``trained`` names the
    tensors the method trains, in training order (to read version 1's optimizer buffers).
    Every failure is a CheckpointError naming the file and the mismatch; nothing falls back to
    an older state. FileNotFoundError when there is no complete checkpoint at all."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint")
    path = found[-1]
    body = _read_document(path)
    try:
        stored_round = body["round"]
        if f"round-{stored_round:06d}.json" != path.name:
            raise CheckpointError(
                f"checkpoint file {path}: holds round {stored_round}, its name says otherwise"
            )
        # The stored config is read as this version reads a run directory's config, so a
        # checkpoint of an earlier version compares equal to the config it was written for.
        written_for = config_from_saved(body["config"])
        if run_digest(written_for) != run_digest(cfg):
            changes = run_changes(written_for, cfg)
            raise CheckpointError(
                f"checkpoint file {path}: written for another config ("
                f"{describe_changes(changes) or 'digest ' + body['config_digest'][:16]}); "
                f"refusing to mix states"
            )
        tensors = _read_tensors(path.with_suffix(".safetensors"), body)
        state = _state_from(body, tensors, trained)
        partition_digest = str(body["partition_digest"])
    except CheckpointError:
        raise
    except (LookupError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint file {path}: malformed ({exc!r})") from exc
    return Checkpoint(path, state, partition_digest)
