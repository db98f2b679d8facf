"""Run directories: the one place that decides what a run directory holds and when a run may
start, continue or stop in it. Both runtimes (in process, and a Flower ServerApp) go through
it, so they write the same files:

- ``run.json``: the fedpgp version that started the run and the run's id (the key of the
  Flower nodes' personal state);
- ``config.yaml`` (fully resolved), ``partition.json``, ``checkpoint/``, ``run.log``;
- ``global.safetensors`` (the final GLOBAL tensors), ``results.csv``, ``curves.png`` and,
  last (it marks the run finished), ``results.json``.

A run holds an exclusive lock on its directory (``.lock``, an advisory file lock the OS
releases when the process dies, so a SIGKILL never leaves a stale one); a second process is
refused with the holder's PID. Temp files of a write that a kill interrupted are removed when
the directory is next opened.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_tensors
from torch import Tensor

from . import __version__
from .atomic import write_bytes_atomic, write_text_atomic
from .checkpoint import FOLDER, Checkpoint, RunState, complete_checkpoints, load_checkpoint
from .checkpoint import save_checkpoint as write_checkpoint
from .config import (
    RELOCATABLE,
    RunConfig,
    apply_overrides,
    config_changes,
    config_from_dict,
    describe_changes,
    load_config,
    read_yaml,
    run_changes,
    saved_config,
)
from .console import attached
from .data.partition import PartitionManifest
from .errors import CheckpointError, ConfigError
from .report import RESULTS, write_results

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not kept apart there.
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fedpgp")

INFO, CONFIG, PARTITION, LOCK, LOG = "run.json", "config.yaml", "partition.json", ".lock", "run.log"
GLOBAL = "global.safetensors"


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.method}-{cfg.dataset.name}-s{cfg.seed}"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _probe_writable(folder: Path, what: str) -> None:
    """ConfigError unless a file can be created in ``folder`` (permissions, a read-only mount,
    a full disk): found before any work rather than after the whole setup."""
    probe = folder / f".fedpgp-probe-{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write in {folder} ({exc.strerror or exc})") from exc


def check_output_folder(path: Path) -> None:
    """ConfigError unless the folder ``path`` can be created and written: not a file nor below
    one, and its nearest existing folder takes files (a read-only mount, missing permissions
    or a full disk are found before any work)."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {path}: {parent} is a file, expected a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    _probe_writable(existing, f"--out {path}")


@dataclass(frozen=True)
class RunInfo:
    """What run.json holds."""

    fedpgp_version: str
    run_id: str


class RunDir:
    """An opened run directory (see the module docstring)."""

    def __init__(self, path: Path, info: RunInfo) -> None:
        self.path = path
        self.info = info
        self._lock: int | None = None

    # -- opening ----------------------------------------------------------------------------

    @staticmethod
    def check_new(path: Path) -> None:
        """ConfigError unless a new run may start at ``path``: not a file nor below one, and
        holding no run (finished, or interrupted: continue that one with --resume). Checked
        before any work, and again by :meth:`create`."""
        path = Path(path)
        check_output_folder(path)
        if (path / RESULTS).exists():
            raise ConfigError(f"--out {path}: already holds a finished run; choose another folder")
        if (path / CONFIG).exists() or (path / FOLDER).exists():
            raise ConfigError(
                f"--out {path}: holds an interrupted run; continue it with "
                f"`fedpgp run --resume {path}` or choose another folder"
            )

    @classmethod
    def create(cls, path: Path) -> RunDir:
        """A new run directory at ``path`` (created, or an empty folder), locked, with its
        run.json: ConfigError where :meth:`check_new` refuses or the folder cannot be written."""
        path = Path(path)
        cls.check_new(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {path}: cannot create it ({exc.strerror or exc})") from exc
        _probe_writable(path, f"--out {path}")
        run_dir = cls(path, RunInfo(__version__, uuid.uuid4().hex))
        run_dir.lock()
        write_text_atomic(path / INFO, json.dumps(run_dir.info.__dict__, indent=1) + "\n")
        return run_dir

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """The existing run directory ``path``, locked, its interrupted writes cleaned up.
        CheckpointError for a folder that is not one, or that a newer fedpgp wrote."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise CheckpointError(
                f"--resume {path}: no {path / CONFIG}; not a fedpgp run directory"
            )
        info = cls.read_info(path)
        if _version_tuple(info.fedpgp_version) > _version_tuple(__version__):
            raise CheckpointError(
                f"--resume {path}: written by fedpgp {info.fedpgp_version}, newer than this "
                f"fedpgp {__version__}; resume it with that version"
            )
        run_dir = cls(path, info)
        run_dir.lock()
        _probe_writable(path, f"--resume {path}")
        run_dir.remove_temp_files()
        if not (path / INFO).is_file():
            write_text_atomic(path / INFO, json.dumps(info.__dict__, indent=1) + "\n")
        return run_dir

    @staticmethod
    def read_info(path: Path) -> RunInfo:
        file = path / INFO
        if not file.is_file():
            # Written before run.json existed: the first release, and a fresh id for its nodes.
            return RunInfo("0.1.0", uuid.uuid4().hex)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            return RunInfo(str(data["fedpgp_version"]), str(data["run_id"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"run file {file}: unreadable ({exc})") from exc

    def lock(self) -> None:
        """Hold the directory's lock for the life of this process (or until :meth:`close`)."""
        if fcntl is None or self._lock is not None:
            return
        handle = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(
                    f"run directory {self.path}: in use by another fedpgp process (PID "
                    f"{holder}); wait for it to end or stop it"
                ) from None
            raise
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        self._lock = handle

    def close(self) -> None:
        """Release the lock (the OS does it too when the process ends)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def remove_temp_files(self) -> None:
        """Remove the temp files of atomic writes (``.<name>.<random>.tmp``) a kill left."""
        for folder in (self.path, self.path / FOLDER):
            if folder.is_dir():
                for leftover in folder.glob(".*.tmp"):
                    leftover.unlink(missing_ok=True)

    # -- what the directory holds -------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return (self.path / RESULTS).is_file()

    def write_config(self, cfg: RunConfig) -> None:
        write_text_atomic(self.path / CONFIG, cfg.to_yaml())

    def saved_config(self) -> RunConfig:
        """The run's config.yaml as this version reads it (fedpgp.config.saved_config)."""
        return saved_config(read_yaml(self.path / CONFIG))

    def write_partition(self, manifest_json: str, digest: str) -> None:
        """Write partition.json, or check the one there: a resumed run must not finish beside
        another run's partition."""
        path = self.path / PARTITION
        if path.is_file():
            found = PartitionManifest.load(path).digest()
            if found != digest:
                raise CheckpointError(
                    f"{path}: holds partition {found[:16]}..., but this run's is "
                    f"{digest[:16]}... (a partition.json of another run?); refusing to mix them"
                )
            return
        write_text_atomic(path, manifest_json)

    def save_checkpoint(self, state: RunState, cfg: RunConfig, partition_digest: str) -> None:
        write_checkpoint(self.path, state, cfg, partition_digest)

    def load_checkpoint(self, cfg: RunConfig, trained: Sequence[str]) -> Checkpoint | None:
        """The newest complete checkpoint, or None when the run was killed before its first
        one was complete (it then starts again from round 0, with the same config and
        partition: the same results)."""
        if not complete_checkpoints(self.path):
            return None
        return load_checkpoint(self.path, cfg, trained)

    def write_results(
        self, results: dict[str, Any], rows: list[dict], global_tensors: Mapping[str, Tensor]
    ) -> None:
        """global.safetensors (the final GLOBAL tensors), then the results files, results.json
        last: a directory with results.json holds everything."""
        final = {k: v.detach().cpu().clone().contiguous() for k, v in global_tensors.items()}
        write_bytes_atomic(self.path / GLOBAL, save_tensors(final))
        write_results(self.path, results, rows)

    @contextlib.contextmanager
    def logging(self) -> Iterator[None]:
        """Send the run's log (wall-clock times, paths) to run.log, appending on resume."""
        handler = logging.FileHandler(self.path / LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # The terminal gets progress lines and the final table; the details go to run.log only.
        try:
            with attached(handler):
                yield
        finally:
            handler.close()


def resumed_config(
    run_dir: RunDir, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """The config of the run in ``run_dir``. ``--config``/``--set`` may only repeat it, except
    for the RELOCATABLE keys (where the data and caches are now); any other change is a
    ConfigError listing the changed keys."""
    cfg = run_dir.saved_config()
    if config_path is None and not overrides:
        return cfg
    if config_path is not None:
        requested = load_config(config_path, list(overrides))
    else:
        requested = config_from_dict(apply_overrides(copy.deepcopy(cfg.to_dict()), list(overrides)))
    given = "--config/--set" if config_path is not None else "--set"
    return reconciled_config(run_dir, requested, f"--resume {run_dir.path}: {given}", cfg)


def reconciled_config(
    run_dir: RunDir, requested: RunConfig, source: str, saved: RunConfig | None = None
) -> RunConfig:
    """``requested`` as the config of the run in ``run_dir`` (whose config.yaml reads as
    ``saved``, read here when not given): config.yaml is rewritten where they differ in
    RELOCATABLE keys only; any other change is a ConfigError that ``source`` begins (who asked:
    ``--resume DIR: --set``)."""
    cfg = run_dir.saved_config() if saved is None else saved
    changes = config_changes(cfg.to_dict(), requested.to_dict())
    refused = run_changes(cfg, requested)
    if refused:
        raise ConfigError(
            f"{source} would change the run's config ({describe_changes(refused)}); a resumed "
            f"run keeps {run_dir.path / CONFIG} unchanged, except for {', '.join(RELOCATABLE)}"
        )
    if changes:
        run_dir.write_config(requested)
        log.info("config.yaml updated on resume: %s", describe_changes(changes))
    return requested
