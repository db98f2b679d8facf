"""Run checkpoints: everything a run needs to continue exactly where it stopped.

The checkpoint of a run that has completed ``round`` rounds is two files in
``<run dir>/checkpoint/``:

- ``round-NNNNNN.safetensors``: every tensor (the GLOBAL tensors, each client's PERSONAL
  tensors, the shared optimizer's buffers, torch's RNG state);
- ``round-NNNNNN.json``: everything else (format version, config and partition digests, the
  result rows so far, the optimizer's hyper-parameters, numpy's and Python's RNG states), the
  size and sha256 of the tensor file, and a sha256 of its own content.

Each file is written to a temp file, fsynced and renamed; the JSON goes last and is the commit
mark, so a tensor file without its JSON is an interrupted write and is never read. Older
checkpoints are deleted only after the new JSON is in place. Nothing here unpickles: safetensors
and JSON only.

A checkpoint is read back only for the config it was written for (every key but the RELOCATABLE
ones, which say where files lie) and for the same partition (whose digest covers the dataset's
fingerprint); anything else is a CheckpointError, never a fresh start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from .atomic import write_bytes_atomic, write_text_atomic
from .config import RunConfig
from .errors import CheckpointError

if TYPE_CHECKING:
    from .experiment import Experiment

log = logging.getLogger(__name__)

FORMAT = "fedpgp-checkpoint"
VERSION = 1
FOLDER = "checkpoint"
_NAME = re.compile(r"round-\d{6}\.(json|safetensors)")


@dataclass
class RunState:
    """A run after ``round`` completed rounds. ``personal`` maps client id to its PERSONAL
    tensors; ``optimizer`` is the shared optimizer's ``state_dict()`` ({} when none is kept);
    ``rows`` are the result rows so far and ``pending_faults`` the faults of rounds after the
    last evaluated one; ``rng`` holds the global torch, numpy and Python RNG states."""

    round: int
    global_tensors: dict[str, Tensor]
    personal: dict[int, dict[str, Tensor]]
    optimizer: dict[str, Any] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    pending_faults: list[dict] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """The global torch (CPU), numpy and Python RNG states. Every stream the run draws from is
    derived from the seed (fedpgp.seeding), so these only matter to code outside fedpgp that
    draws from the global generators; they are carried so that such code resumes exactly too."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the global RNGs to states captured by :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


# Keys that say where files are, not what the run computes: a run moved to another machine may
# resume with other values. (Data identity is still checked, by the partition digest, which holds
# the dataset's fingerprint.)
RELOCATABLE = ("dataset.root", "cache_dir")


def config_changes(
    old: dict[str, Any], new: dict[str, Any], prefix: str = ""
) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key that differs between config dicts."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[f"{prefix}{key}"] = (a, b)
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``key: old -> new; ...`` for an error message."""
    return "; ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in changes.items())


def run_digest(cfg: RunConfig) -> str:
    """sha256 of the config without its RELOCATABLE keys: what a checkpoint must match."""
    data = cfg.to_dict()
    for key in RELOCATABLE:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node.pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _split_optimizer(optimizer: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer state_dict as (tensors, JSON); tensors are named optimizer/<index>/<field>."""
    if not optimizer:
        return {}, {}
    tensors, state = {}, {}
    for index, entries in optimizer["state"].items():
        plain = {}
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                plain[name] = value
        state[str(index)] = plain
    return tensors, {"param_groups": optimizer["param_groups"], "state": state}


def _join_optimizer(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    if not plain:
        return {}
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        _, index, entry = name.split("/", 2)
        state.setdefault(int(index), {})[entry] = value
    return {"state": state, "param_groups": plain["param_groups"]}


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
    optimizer_tensors, optimizer_plain = _split_optimizer(state.optimizer)
    tensors = {
        **{f"global/{k}": v for k, v in state.global_tensors.items()},
        **{
            f"personal/{cid}/{k}": v
            for cid, personal in state.personal.items()
            for k, v in personal.items()
        },
        **optimizer_tensors,
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
        "optimizer": optimizer_plain,
        "rng": {"numpy": state.rng["numpy"], "python": state.rng["python"]},
        "rows": state.rows,
        "pending_faults": state.pending_faults,
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


def latest_checkpoint(run_dir: Path) -> Path:
    """The JSON file of the newest complete checkpoint in ``run_dir``."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        raise CheckpointError(
            f"{run_dir}: no checkpoint folder {folder}; there is nothing to resume"
        )
    # A JSON file is the commit mark of its checkpoint; a tensor file alone is an interrupted write.
    complete = sorted(
        p for p in folder.iterdir() if p.suffix == ".json" and _NAME.fullmatch(p.name)
    )
    if not complete:
        raise CheckpointError(
            f"{folder}: no complete checkpoint (round-NNNNNN.json); there is nothing to resume"
        )
    return complete[-1]


@dataclass
class Checkpoint:
    """A checkpoint read from disk and checked against the run's config."""

    path: Path
    state: RunState
    partition_digest: str

    def check_fits(self, experiment: Experiment) -> None:
        """CheckpointError unless this checkpoint belongs to ``experiment``: the same partition,
        and tensors of the names and shapes the method starts from."""
        digest = experiment.manifest.digest()
        if digest != self.partition_digest:
            raise CheckpointError(
                f"checkpoint file {self.path}: written for partition {self.partition_digest[:16]}"
                f"..., but this run's partition is {digest[:16]}... (the dataset or "
                f"partition.file changed); refusing to mix states"
            )
        expected = {f"global/{k}": v for k, v in experiment.initial_global().items()}
        for cid in range(len(experiment.manifest.clients)):
            expected.update(
                {f"personal/{cid}/{k}": v for k, v in experiment.initial_personal(cid).items()}
            )
        found = {f"global/{k}": v for k, v in self.state.global_tensors.items()}
        for cid, personal in self.state.personal.items():
            found.update({f"personal/{cid}/{k}": v for k, v in personal.items()})
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
        if self.state.optimizer:
            counts = [len(g["params"]) for g in self.state.optimizer["param_groups"]]
            trained = len(experiment.method.global_keys) + len(experiment.method.personal_keys)
            if counts != [trained]:
                raise CheckpointError(
                    f"checkpoint file {self.path}: the optimizer state holds {counts} parameters,"
                    f" the method trains {trained}"
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
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint file {path}: format version {document.get('version')!r}, but this "
            f"fedpgp reads version {VERSION} only"
        )
    body = document.get("body")
    if not isinstance(body, dict):
        raise CheckpointError(f"checkpoint file {path}: no 'body' mapping")
    if hashlib.sha256(_canonical(body)).hexdigest() != document.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {path}: content does not match its recorded sha256 (corrupted)"
        )
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


def _check_rng(rng: dict[str, Any]) -> None:
    """Raise ValueError/TypeError unless ``rng`` can be restored; tries it on private
    generators, leaving the global ones alone."""
    torch.Generator().set_state(rng["torch"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.RandomState().set_state(
        (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    )
    version, internal, gauss_next = rng["python"]
    random.Random().setstate((version, tuple(internal), gauss_next))


def _state_from(body: dict[str, Any], tensors: dict[str, Tensor]) -> RunState:
    global_tensors: dict[str, Tensor] = {}
    personal: dict[int, dict[str, Tensor]] = {}
    optimizer: dict[str, Tensor] = {}
    rng_torch = tensors.pop("rng/torch")
    for name, value in tensors.items():
        kind, rest = name.split("/", 1)
        if kind == "global":
            global_tensors[rest] = value
        elif kind == "personal":
            cid, key = rest.split("/", 1)
            personal.setdefault(int(cid), {})[key] = value
        elif kind == "optimizer":
            optimizer[name] = value
        else:
            raise ValueError(f"unexpected tensor {name!r}")
    rng = {"torch": rng_torch, "numpy": body["rng"]["numpy"], "python": body["rng"]["python"]}
    _check_rng(rng)
    return RunState(
        round=int(body["round"]),
        global_tensors=global_tensors,
        personal=personal,
        optimizer=_join_optimizer(optimizer, body["optimizer"]),
        rows=list(body["rows"]),
        pending_faults=list(body["pending_faults"]),
        rng=rng,
    )


def load_checkpoint(run_dir: Path, cfg: RunConfig) -> Checkpoint:
    """The newest complete checkpoint of ``run_dir``, checked: format version, its own hash,
    the tensor file's size and hash, and that it was written for ``cfg``. Every failure is a
    CheckpointError naming the file and the mismatch; nothing falls back to an older state."""
    path = latest_checkpoint(run_dir)
    body = _read_document(path)
    try:
        stored_round, digest = body["round"], body["config_digest"]
        if f"round-{stored_round:06d}.json" != path.name:
            raise CheckpointError(
                f"checkpoint file {path}: holds round {stored_round}, its name says otherwise"
            )
        if digest != run_digest(cfg):
            changes = config_changes(body["config"], cfg.to_dict())
            for key in RELOCATABLE:
                changes.pop(key, None)
            raise CheckpointError(
                f"checkpoint file {path}: written for another config ("
                f"{describe_changes(changes) or 'digest ' + digest[:16]}); refusing to mix states"
            )
        tensors = _read_tensors(path.with_suffix(".safetensors"), body)
        state = _state_from(body, tensors)
        partition_digest = str(body["partition_digest"])
    except CheckpointError:
        raise
    except (LookupError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint file {path}: malformed ({exc!r})") from exc
    return Checkpoint(path, state, partition_digest)
