"""Helpers shared by the robustness tests: tiny configs, runs interrupted in process, and the
files a run directory holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import tiny_overrides

from fedpgp.config import RunConfig, load_config
from fedpgp.federation.client import Client
from fedpgp.federation.update import Update
from fedpgp.runner import execute


def tiny_config(data_root: Path, **extra: object) -> RunConfig:
    """The tiny run of tests/tiny.py with ``extra`` keys set."""
    return load_config(None, tiny_overrides(data_root, **extra))


def fail_client(
    monkeypatch: pytest.MonkeyPatch, client_id: int | None, round_index: int, error: BaseException
) -> None:
    """Make Client.train raise ``error`` for ``client_id`` (any client when None) in 0-based
    round ``round_index``; every other call trains as usual."""
    original = Client.train

    def train(self: Client, global_tensors: dict, round: int) -> Update:
        if round == round_index and client_id in (None, self.id):
            raise error
        return original(self, global_tensors, round)

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
