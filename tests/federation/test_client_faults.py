"""Client faults: a sampled client that raises, replies too late or sends an unusable update is
left out of the round and recorded; fewer than min_clients usable updates stop the run with a
clear error and a checkpoint to resume from."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from runkit import checkpoint_files, error_line, fail_client, run_rows, tiny_config
from tiny import tiny_overrides

from fedpgp.cli import main
from fedpgp.config import load_config
from fedpgp.experiment import build_experiment
from fedpgp.federation import client as client_module
from fedpgp.federation import inprocess
from fedpgp.federation.client import Client
from fedpgp.federation.faults import Fault, RoundFailedError
from fedpgp.federation.server import Server
from fedpgp.federation.update import Update
from fedpgp.methods.base import create_method
from fedpgp.runner import execute


def test_client_raising_in_round_2_is_left_out_and_recorded(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    sent: dict[tuple[int, int], Update] = {}
    received: dict[tuple[int, int], torch.Tensor] = {}
    original = Client.train

    def train(self: Client, got: dict, round: int, deadline: float | None = None) -> Update:
        received[self.id, round] = got["sigma"].clone()
        if (self.id, round) == (1, 1):
            raise RuntimeError("disk on fire")
        sent[self.id, round] = original(self, got, round, deadline)
        return sent[self.id, round]

    monkeypatch.setattr(Client, "train", train)
    args = ["run", "--out", str(tmp_path / "run")]
    for item in tiny_overrides(tiny_data, lr=0.05):
        args += ["--set", item]
    assert main(args) == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert rows[1]["faults"] == [
        {"client": 1, "round": 2, "reason": "raised RuntimeError: disk on fire"}
    ]
    assert "faults" not in rows[0] and "faults" not in rows[2]
    assert rows[1]["sampled"] == [0, 1]
    # round 3 starts from client 0's round-2 sigma alone: client 1 was not averaged in
    assert torch.equal(received[0, 2], sent[0, 1].tensors["sigma"])
    assert torch.equal(received[1, 2], sent[0, 1].tensors["sigma"])
    assert "round 2: client 1 raised RuntimeError: disk on fire" in capsys.readouterr().out


def test_fault_of_a_round_without_a_row_goes_into_the_next_row(
    tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = build_experiment(tiny_config(tiny_data, rounds=2, eval_every=2))
    fail_client(monkeypatch, 0, 0, ValueError("bad batch"))
    rows = run_rows(experiment)
    assert [row["round"] for row in rows] == [2]
    assert rows[0]["faults"] == [
        {"client": 0, "round": 1, "reason": "raised ValueError: bad batch"}
    ]


def test_client_slower_than_client_timeout_is_stopped_and_left_out(
    tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock that jumps 100 s when client 1 starts round 3: a late client without a slow test.
    now = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0])
    monkeypatch.setattr(inprocess, "time", clock)
    monkeypatch.setattr(client_module, "time", clock)
    original = Client.train
    personal: dict[str, dict] = {}

    def train(self: Client, got: dict, round: int, deadline: float | None = None) -> Update:
        if self.id == 1 and round == 2:
            personal["before"] = {k: v.clone() for k, v in self.personal.items()}
            now[0] += 100.0
            try:
                return original(self, got, round, deadline)
            finally:
                personal["after"] = self.personal
        return original(self, got, round, deadline)

    monkeypatch.setattr(Client, "train", train)
    experiment = build_experiment(tiny_config(tiny_data, client_timeout=30))
    rows = run_rows(experiment)
    assert rows[2]["faults"] == [
        {"client": 1, "round": 3, "reason": "no reply within client_timeout (30.0 s)"}
    ]
    assert "faults" not in rows[0] and "faults" not in rows[1]
    # Stopped before its first step past the deadline, it keeps the state it had.
    assert all(torch.equal(personal["before"][k], personal["after"][k]) for k in ("U", "V"))


def test_too_few_replies_stop_the_run_with_a_resumable_checkpoint(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    overrides = tiny_overrides(tiny_data, lr=0.05, min_clients=2)
    execute(load_config(None, overrides), tmp_path / "whole")
    run_dir = tmp_path / "run"
    fail_client(monkeypatch, 1, 1, ConnectionError("node unreachable"))
    args = ["run", "--out", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    message = error_line(capsys.readouterr().err)
    assert message.startswith(
        "fedpgp: error: round 2: 1 of 2 sampled clients sent a usable update, min_clients is 2 "
        "(client 1 raised ConnectionError: node unreachable). The last checkpoint is in "
    )
    assert message.endswith(f"continue with `fedpgp run --resume {run_dir}`")
    assert checkpoint_files(run_dir) == ["round-000001.json", "round-000001.safetensors"]
    assert not (run_dir / "results.json").exists()
    monkeypatch.undo()
    assert main(["run", "--resume", str(run_dir)]) == 0
    for name in ("results.json", "results.csv"):
        assert (run_dir / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_screen_counts_only_usable_updates() -> None:
    method = create_method(load_config(), 100.0)
    server = Server(method, {"sigma": torch.zeros(2, 3)}, num_clients=4, seed=0)
    good = Update(0, 4, {"sigma": torch.ones(2, 3)}, 5)
    nan = Update(2, 4, {"sigma": torch.full((2, 3), float("nan"))}, 5)
    wrong_shape = Update(3, 4, {"sigma": torch.ones(3, 2)}, 5)
    raised = Fault(1, 5, "raised OSError: gone")
    accepted, found = server.screen(4, [good, raised, nan, wrong_shape], min_clients=1)
    assert accepted == [good]
    assert [f.to_dict() for f in found] == [
        {"client": 1, "round": 5, "reason": "raised OSError: gone"},
        {"client": 2, "round": 5, "reason": "unusable update: sigma has non-finite values"},
        {
            "client": 3,
            "round": 5,
            "reason": "unusable update: sigma has shape (3, 2), expected (2, 3)",
        },
    ]
    with pytest.raises(RoundFailedError, match=r"round 5: 1 of 4 sampled clients .* is 2 "):
        server.screen(4, [good, raised, nan, wrong_shape], min_clients=2)
