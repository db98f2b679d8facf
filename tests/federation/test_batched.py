"""Client-batched local training (``batch_clients``): the clients of a round in lockstep give
the sequential path's tensors (1e-5 relative) and metrics (0.05 points), with clients of
different sizes, gradient clipping, momentum and weight decay, and on resume; a client whose
steps are done gets no update from the others' steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_overrides

from fedpgp.config import load_config
from fedpgp.errors import ConfigError
from fedpgp.experiment import build_experiment
from fedpgp.federation import inprocess
from fedpgp.federation.batched import train_batched
from fedpgp.federation.inprocess import InProcess, inprocess_server, run_inprocess
from fedpgp.federation.rounds import run_rounds
from fedpgp.methods.base import Method
from fedpgp.methods.registry import METHOD_NAMES, method_class
from fedpgp.runner import execute, resume

BATCHABLE = [m for m in METHOD_NAMES if method_class(m).can_batch]
# Three clients of different sizes (so of different numbers of steps), every image of theirs.
UNEVEN = {
    "num_clients": 3,
    "shots": "null",
    "batch_size": 4,
    "partition.kind": "dirichlet",
    "partition.beta": 1.0,
    "partition.min_samples": 1,
    "local_epochs": 2,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 0.01,
    "grad_clip": 0.5,
}


def _config(data: Path, method: str, mode: str, **extra: object):
    return load_config(
        None, tiny_overrides(data, method=method, batch_clients=mode, **{**UNEVEN, **extra})
    )


def _final(data: Path, method: str, mode: str, **extra: object) -> tuple[list[dict], dict, dict]:
    experiment = build_experiment(_config(data, method, mode, **extra))
    transport = InProcess(experiment)
    if mode == "on":
        # Lockstep must not fall back to one client at a time (which would equal sequential).
        def refuse(*args: object) -> None:
            raise AssertionError(f"{method}: a client trained alone with batch_clients: on")

        transport._train_one = refuse
    server = inprocess_server(experiment)
    rows, _ = run_rounds(experiment.cfg, server, transport, None, lambda state: None)
    personal = {cid: dict(c.personal) for cid, c in transport.clients.items()}
    return rows, dict(server.global_tensors), personal


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Relative error ||a - b|| / ||a|| under 1e-5, with ||a|| taken as at least 1e-4: FedTPG's
    key bias has an exact gradient of zero (softmax is shift-invariant), so it holds only
    rounding noise (norm about 5e-10), while every other tensor here has a norm above 7e-4."""
    assert float((a - b).norm() / a.norm().clamp(min=1e-4)) < 1e-5


def test_the_clients_have_different_numbers_of_steps(tiny_data: Path) -> None:
    experiment = build_experiment(_config(tiny_data, "promptfl", "on"))
    sizes = {data.num_train for data in experiment.client_data.values()}
    assert len(sizes) == 3


@pytest.mark.parametrize("method", BATCHABLE)
def test_batched_equals_sequential(method: str, tiny_data: Path) -> None:
    # A method that trains each client over its own classes by default (FedTPG) does so over
    # all of them here: clients of different prompt banks never share a lockstep group.
    section = getattr(load_config(), method, None)
    own = {f"{method}.label_space": "all"} if hasattr(section, "label_space") else {}
    assert InProcess(build_experiment(_config(tiny_data, method, "on", **own))).batches
    rows_b, global_b, personal_b = _final(tiny_data, method, "on", **own)
    rows_s, global_s, personal_s = _final(tiny_data, method, "off", **own)
    assert global_b.keys() == global_s.keys() and personal_b.keys() == personal_s.keys()
    for key in global_s:
        _close(global_s[key], global_b[key])
    for cid in personal_s:
        for key in personal_s[cid]:
            _close(personal_s[cid][key], personal_b[cid][key])
    for row_b, row_s in zip(rows_b, rows_s, strict=True):
        for key in ("local", "base", "novel"):
            assert abs(row_b[key] - row_s[key]) <= 0.05
    # Each path is deterministic on its own.
    again = _final(tiny_data, method, "on", **own)
    assert all(torch.equal(global_b[k], again[1][k]) for k in global_b)


def test_a_client_whose_steps_are_done_gets_no_update(tiny_data: Path) -> None:
    """The small client's steps end before the big one's: its result is its own training
    alone (were it stepped on, weight decay and momentum would still move it)."""
    experiment = build_experiment(_config(tiny_data, "fedpgp", "on", local_epochs=1))
    by_size = sorted(experiment.client_data, key=lambda c: experiment.client_data[c].num_train)
    small, big = by_size[0], by_size[-1]
    steps = {c: -(-experiment.client_data[c].num_train // 4) for c in (small, big)}
    assert steps[small] < steps[big]
    server = inprocess_server(experiment)
    sends = {cid: server.sends(cid, 0) for cid in (small, big)}
    alone, together = InProcess(experiment), InProcess(experiment)
    updates = train_batched(
        [together.clients[small], together.clients[big]], [sends[small], sends[big]], 0
    )
    expected = alone.clients[small].train(sends[small], 0)
    for key in expected.tensors:
        _close(expected.tensors[key], updates[0].tensors[key])
    for key in alone.clients[small].personal:
        _close(alone.clients[small].personal[key], together.clients[small].personal[key])
    assert updates[0].metrics["loss"] == pytest.approx(expected.metrics["loss"], rel=1e-5)


def test_a_batched_run_resumes_to_the_uninterrupted_results(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tiny_data, "fedpgp", "on", rounds=3)
    execute(cfg, tmp_path / "whole")

    def stop_in_round_three(clients: list, received: list, round: int) -> list:
        if round == 2:
            raise KeyboardInterrupt
        return train_batched(clients, received, round)

    monkeypatch.setattr(inprocess, "train_batched", stop_in_round_three)
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, tmp_path / "cut")
    monkeypatch.undo()
    resume(tmp_path / "cut")
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert json.loads((tmp_path / "cut" / "results.json").read_text()) == whole


def test_a_group_that_raises_trains_one_by_one(
    tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sequential = run_inprocess(build_experiment(_config(tiny_data, "promptfl", "off")))[0]

    def broken(self: Method, *args: object) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(method_class("promptfl"), "batched_losses", broken)
    rows = run_inprocess(build_experiment(_config(tiny_data, "promptfl", "on")))[0]
    assert [r["local"] for r in rows] == [r["local"] for r in sequential]


def test_batch_clients_on_is_refused_where_it_cannot_be() -> None:
    with pytest.raises(ConfigError, match="method pfedmoap cannot train its clients in one batch"):
        load_config(None, ["method=pfedmoap", "batch_clients=on"])
    with pytest.raises(ConfigError, match="optimizer_state: fresh"):
        load_config(None, ["batch_clients=on", "optimizer_state=shared"])
    with pytest.raises(ConfigError, match="client_timeout"):
        load_config(None, ["batch_clients=on", "client_timeout=5"])
    # YAML reads a bare off as a boolean; the key still means "off".
    assert load_config(None, ["batch_clients=off"]).batch_clients == "off"
    assert load_config(None, ["method=zeroshot", "batch_clients=on"]).batch_clients == "on"


def test_auto_keeps_the_sequential_path_on_the_cpu(tiny_data: Path) -> None:
    experiment = build_experiment(_config(tiny_data, "fedpgp", "auto", device="cpu"))
    assert not InProcess(experiment).batches
