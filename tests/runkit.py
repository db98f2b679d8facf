"""Helpers shared by the tests: tiny configs, the in-process runtime's starting tensors and
clients, runs interrupted in process, and the files a run directory holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import tiny_overrides

from fedpgp.config import RunConfig, load_config
from fedpgp.experiment import Experiment
from fedpgp.federation.client import Client
from fedpgp.federation.inprocess import InProcess, inprocess_server, run_inprocess
from fedpgp.federation.update import Update
from fedpgp.methods.base import Tensors
from fedpgp.runner import execute


def error_line(err: str) -> str:
    """The error a failed command printed: one line, the last on stderr, after the progress
    lines (which go to stderr too)."""
    lines = err.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("fedpgp: error:")]
    assert errors == [len(lines) - 1], lines
    return lines[-1]


def tiny_config(data_root: Path, **extra: object) -> RunConfig:
    """The tiny run of tests/tiny.py with ``extra`` keys set."""
    return load_config(None, tiny_overrides(data_root, **extra))


def start_global(experiment: Experiment) -> Tensors:
    """The GLOBAL tensors an in-process run starts from, on the experiment's device."""
    return inprocess_server(experiment).global_tensors


def start_personal(experiment: Experiment, client_id: int) -> Tensors:
    """Client ``client_id``'s starting PERSONAL tensors, on the experiment's device."""
    return clients_of(experiment)[client_id].personal


def clients_of(experiment: Experiment) -> dict[int, Client]:
    """The in-process runtime's clients of ``experiment``, as a run starts them."""
    return InProcess(experiment).clients


def run_rows(experiment: Experiment) -> list[dict]:
    """The result rows of a whole in-process run of ``experiment``."""
    return run_inprocess(experiment)[0]


def fail_client(
    monkeypatch: pytest.MonkeyPatch, client_id: int | None, round_index: int, error: BaseException
) -> None:
    """Make Client.train raise ``error`` for ``client_id`` (any client when None) in 0-based
    round ``round_index``; every other call trains as usual."""
    original = Client.train

    def train(self: Client, received: dict, round: int, deadline: float | None = None) -> Update:
        if round == round_index and client_id in (None, self.id):
            raise error
        return original(self, received, round, deadline)

    monkeypatch.setattr(Client, "train", train)


def interrupted_run(
    monkeypatch: pytest.MonkeyPatch, cfg: RunConfig, out_dir: Path, round_index: int
) -> None:
    """Start a run and stop it like Ctrl-C at the start of 0-based round ``round_index``.
    Undoes every patch of ``monkeypatch`` afterwards."""
    fail_client(monkeypatch, None, round_index, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, out_dir)
    monkeypatch.undo()


def checkpoint_files(run_dir: Path) -> list[str]:
    """Names in run_dir/checkpoint, sorted."""
    return sorted(p.name for p in (run_dir / "checkpoint").iterdir())
