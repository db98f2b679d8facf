"""A real SuperLink and two SuperNodes on 127.0.0.1 (insecure, and TLS with node
authentication) running this repository's Flower App with ``flwr run``: a run whose ServerApp,
one SuperNode and then the SuperLink are killed mid-run is resumed to the in-process run's
numbers, with only GLOBAL tensors on the wire and the restarted node's personal state read from
its disk; with TLS and node authentication only registered SuperNodes take part, and the
numbers are the in-process run's."""

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
from fedpgp.federation.flower.state import saved_rounds
from fedpgp.federation.inprocess import run_inprocess
from fedpgp.report import build_results

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


def state_files(state_dir: Path, partition: int) -> list[Path]:
    """The personal state files of ``partition`` under a node's state dir, oldest first."""
    return sorted(state_dir.glob(f"*/partition-{partition}/round-*.safetensors"))


def wait_for(condition, what: str, federation: Federation, run) -> None:
    """Poll ``condition`` until it holds while ``flwr run`` is alive; fail with the logs."""
    deadline = time.monotonic() + RUN_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        assert run.poll() is None, federation.processes.log_text("flwr-run")[-4000:]
        time.sleep(0.2)


def resumable_federation(
    tmp_path: Path, federations: list[Federation], cfg
) -> tuple[Federation, Path, dict[str, str]]:
    """A SuperLink that keeps its state in a database, two SuperNodes with state dirs, and the
    run config of a 4-round run of ``cfg``."""
    config_file = tmp_path / "four-rounds.yaml"
    config_file.write_text(cfg.to_yaml())
    federation = Federation(tmp_path)
    federations.append(federation)
    federation.start_superlink(database=tmp_path / "superlink.db")
    for partition in (0, 1):
        federation.start_supernode(partition, 2, tmp_path / f"state-{partition}")
    out_dir = tmp_path / "out"
    return federation, out_dir, {"config-file": str(config_file), "out-dir": str(out_dir)}


def test_a_run_whose_serverapp_supernode_and_superlink_are_killed_resumes_to_the_inprocess_results(
    tiny_data: Path, tmp_path: Path, federations: list[Federation]
) -> None:
    cfg = flower_config(tiny_data, rounds=4, eval_every=2, lr=0.05)
    rows, zeroshot, server = run_inprocess(build_experiment(cfg))
    expected = build_results(cfg.to_dict(), rows, zeroshot)
    federation, out_dir, run_config = resumable_federation(tmp_path, federations, cfg)
    database = tmp_path / "superlink.db"
    checkpoints = out_dir / "checkpoint"

    # SIGKILL of the ServerApp while it trains round 2; partition 1's SuperNode is killed too
    # and comes back with a new node id, its personal state on its disk.
    run = federation.flwr_run(run_config)
    wait_for((checkpoints / "round-000001.json").is_file, "checkpoint 1", federation, run)
    assert federation.kill_serverapp(), "no ServerApp process found"
    federation.processes.kill(run)
    assert not (out_dir / "results.json").exists()
    federation.kill_supernode(1)
    federation.start_supernode(1, 2, tmp_path / "state-1")

    # Resumed; then SIGKILL of the whole SuperLink (its SuperExec and ServerApp too) in round 4.
    run = federation.flwr_run({**run_config, "resume": True})
    wait_for((checkpoints / "round-000003.json").is_file, "checkpoint 3", federation, run)
    federation.kill_superlink()
    federation.processes.kill(run)
    assert not (out_dir / "results.json").exists()

    # The SuperLink comes back on its database, the SuperNodes reconnect by themselves.
    federation.start_superlink(database=database)
    results = finish(federation, federation.flwr_run({**run_config, "resume": True}), out_dir)
    # The numbers of the in-process run, and its final global prompt.
    assert results == expected
    final = load_file(out_dir / "global.safetensors")
    torch.testing.assert_close(final["sigma"], server.global_tensors["sigma"], atol=1e-6, rtol=0)
    log = (out_dir / "run.log").read_text()
    assert "after round 1" in log and "after round 3" in log
    # The restarted node read the state the checkpoint names from its file.
    node_log = federation.processes.log_text("supernode-1")
    assert "partition 1: personal state of round 1 read from" in node_log
    # Personal state stayed on the nodes; only the rounds the server may ask for are kept.
    names = array_names(out_dir / "messages.jsonl")
    assert "sigma" in names and "U" not in names and "V" not in names
    for partition in (0, 1):
        files = state_files(tmp_path / f"state-{partition}", partition)
        assert saved_rounds(files[-1].parent)[-1] == 4
        assert set(load_file(files[-1])) == {"personal/U", "personal/V"}


def test_tls_and_node_authentication_admit_registered_nodes_only(
    reference: Reference, tmp_path: Path, federations: list[Federation]
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = {}
    for name in ("node0", "node1", "stranger"):
        key = ec.generate_private_key(ec.SECP384R1())
        private = tmp_path / name
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        (tmp_path / f"{name}.pub").write_bytes(public)
        keys[name] = private
    federation = Federation(tmp_path, make_certificates(tmp_path / "certs"))
    federations.append(federation)
    federation.start_superlink(node_auth=True)
    for name in ("node0", "node1"):
        register = federation.processes.start(
            f"register-{name}",
            ["flwr", "supernode", "register", str(tmp_path / f"{name}.pub"), "testlink"],
        )
        assert register.wait(timeout=60) == 0, federation.processes.log_text(f"register-{name}")
    stranger = federation.start_supernode(1, 2, tmp_path / "state-x", keys["stranger"])
    assert stranger.wait(timeout=120) != 0
    refused = federation.processes.log_text("supernode-1")
    assert "Failed to activate SuperNode" in refused or "PERMISSION_DENIED" in refused, refused
    for partition, name in enumerate(("node0", "node1")):
        federation.start_supernode(partition, 2, tmp_path / f"state-{partition}", keys[name])
    out_dir = tmp_path / "out"
    run = federation.flwr_run({"config-file": str(reference.config_file), "out-dir": str(out_dir)})
    assert finish(federation, run, out_dir) == reference.results
