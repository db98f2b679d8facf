"""A real SuperLink and two SuperNodes on 127.0.0.1 (insecure and TLS) running this
repository's Flower App with ``flwr run``: the same numbers as in process, only GLOBAL tensors
on the wire, and a SuperNode killed mid-run that comes back with its own personal state."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flowerkit import (
    Federation,
    Reference,
    array_names,
    flower_config,
    make_certificates,
    reference_run,
)
from safetensors.torch import load_file

from fedpgp.experiment import build_experiment
from fedpgp.federation.client import Client, Optimizers
from fedpgp.federation.flower.state import load_state_file

pytestmark = pytest.mark.slow

RUN_SECONDS = 300


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference_run(tiny_data, tmp_path_factory.getbasetemp() / "flower-reference")


@pytest.fixture
def federations(tmp_path: Path) -> Iterator[list[Federation]]:
    """Federations a test starts; every process of each is killed afterwards."""
    started: list[Federation] = []
    yield started
    for federation in started:
        federation.close()


def finish(federation: Federation, run, out_dir: Path) -> dict:
    """Wait for ``flwr run`` and return the ServerApp's results.json (with logs on failure)."""
    run.wait(timeout=RUN_SECONDS)
    results = out_dir / "results.json"
    if not results.is_file():
        logs = "\n".join(
            f"--- {name}\n{federation.processes.log_text(name)[-4000:]}"
            for name in ("flwr-run", "superlink", "supernode-0", "supernode-1")
        )
        pytest.fail(f"the run wrote no results.json\n{logs}")
    return json.loads(results.read_text())


def received(messages_file: Path, kind: str, round: str) -> int:
    """How many replies of ``kind`` for ``round`` (1-based) the ServerApp has received."""
    if not messages_file.is_file():
        return 0
    # The ServerApp may be appending: only lines that end in a newline are complete.
    entries = [json.loads(line) for line in messages_file.read_text().split("\n")[:-1]]
    return sum(
        e["direction"] == "received"
        and e["type"] == kind
        and e["round"] == round
        and "error" not in e
        for e in entries
    )


def state_path(state_dir: Path, partition: int) -> Path | None:
    found = sorted(state_dir.glob(f"run-*/partition-{partition}.safetensors"))
    return found[0] if found else None


@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls"])
def test_superlink_and_two_supernodes_equal_the_inprocess_run(
    tls: bool, reference: Reference, tmp_path: Path, federations: list[Federation]
) -> None:
    certificates = make_certificates(tmp_path / "certs") if tls else None
    federation = Federation(tmp_path, certificates)
    federations.append(federation)
    federation.start_superlink()
    for partition in (0, 1):
        federation.start_supernode(partition, 2, tmp_path / f"state-{partition}")
    out_dir = tmp_path / "out"
    run = federation.flwr_run({"config-file": str(reference.config_file), "out-dir": str(out_dir)})
    results = finish(federation, run, out_dir)

    assert results == reference.results
    final = load_file(out_dir / "global.safetensors")
    torch.testing.assert_close(final["sigma"], reference.global_tensors["sigma"], atol=1e-6, rtol=0)
    names = array_names(out_dir / "messages.jsonl")
    assert "sigma" in names
    assert "U" not in names and "V" not in names
    for partition in (0, 1):
        path = state_path(tmp_path / f"state-{partition}", partition)
        assert path is not None
        assert set(load_file(path)) == {"U", "V"}


def test_a_killed_supernode_comes_back_with_its_personal_state(
    tiny_data: Path, tmp_path: Path, federations: list[Federation]
) -> None:
    cfg = flower_config(tiny_data, rounds=3, eval_every=3)
    config_file = tmp_path / "three-rounds.yaml"
    config_file.write_text(cfg.to_yaml())
    federation = Federation(tmp_path)
    federations.append(federation)
    federation.start_superlink()
    state_dirs = {p: tmp_path / f"state-{p}" for p in (0, 1)}
    for partition, state_dir in state_dirs.items():
        federation.start_supernode(partition, 2, state_dir)
    out_dir = tmp_path / "out"
    run = federation.flwr_run({"config-file": str(config_file), "out-dir": str(out_dir)})

    # Kill partition 1's SuperNode once round 1's replies are in (its state file is written
    # then): killing it while it uploads a reply makes the SuperLink wait minutes for the
    # upload instead of ~55 s for the missed heartbeats.
    deadline = time.monotonic() + RUN_SECONDS
    while received(out_dir / "messages.jsonl", "train", "1") < 2:
        assert time.monotonic() < deadline, "round 1 never completed"
        assert run.poll() is None, federation.processes.log_text("flwr-run")[-4000:]
        time.sleep(0.2)
    federation.kill_supernode(1)
    path = state_path(state_dirs[1], 1)
    expected = {key: tuple(value.shape) for key, value in load_file(path).items()}
    before = load_state_file(path, 1, cfg.digest(), expected)
    federation.start_supernode(1, 2, state_dirs[1])
    results = finish(federation, run, out_dir)

    assert [r["round"] for r in results["rounds"]] == [3]
    assert [c["id"] for c in results["clients"]] == [0, 1]
    faults = results["rounds"][-1].get("faults", [])
    assert all(f["client"] == 1 for f in faults)
    assert "restored personal state of round" in federation.processes.log_text("supernode-1")

    # Replay, in process, the rounds the restarted node trained, from the state it had on disk
    # when it was killed: its final state file must be exactly that continuation.
    failed = {f["round"] - 1 for f in faults}
    trained = [r for r in range(before.round + 1, cfg.rounds) if r not in failed]
    assert trained and trained[-1] == cfg.rounds - 1
    after = load_state_file(path, 1, cfg.digest(), expected)
    assert after.round == cfg.rounds - 1
    experiment = build_experiment(cfg, clients=[1])
    round_globals = load_file(out_dir / "round-globals.safetensors")
    client = Client(
        1,
        experiment.method,
        experiment.client_data[1],
        before.tensors,
        Optimizers(cfg.optimizer_state, cfg.lr, cfg.momentum, cfg.weight_decay),
        cfg.seed,
    )
    for round in trained:
        client.train({"sigma": round_globals[f"round-{round + 1}/sigma"]}, round)
    for key in ("U", "V"):
        torch.testing.assert_close(after.tensors[key], client.personal[key], atol=1e-6, rtol=0)
