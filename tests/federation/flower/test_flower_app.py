"""The Flower apps without Flower's network: the real ServerApp logic and ClientApp exchanging
real Messages through a Grid that delivers them in this process (as Flower's in-memory grid
does), plus the reply checks, the personal state files and the settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flowerkit import (
    LoopbackGrid,
    Reference,
    Tamper,
    array_names,
    flower_config,
    reference_run,
    task_identity,  # noqa: F401 (an autouse fixture)
)
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from runkit import interrupted_run

from fedpgp.config import run_digest
from fedpgp.errors import CheckpointError, ConfigError, FedPGPError
from fedpgp.federation.faults import RoundFailedError
from fedpgp.federation.flower.client_app import make_client_app
from fedpgp.federation.flower.node import experiment_for, node_for, read_order
from fedpgp.federation.flower.records import (
    BadReplyError,
    client_record,
    read_update,
    record_to_tensors,
    tensors_to_record,
)
from fedpgp.federation.flower.server_app import run_server
from fedpgp.federation.flower.settings import (
    GLOBAL_RECORD,
    ServerSettings,
    config_from_run_config,
    node_settings,
    server_settings,
)
from fedpgp.federation.flower.state import (
    StateError,
    load_state,
    save_state,
    saved_rounds,
    state_folder,
)
from fedpgp.runner import execute, resume

NODES = {101: 0, 202: 1}


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference_run(tiny_data, tmp_path_factory.getbasetemp() / "flower-reference")


def client_app(cfg, tmp_path: Path) -> Callable[[Message, Context], Message]:
    """The ClientApp of every partition, its nodes' state in tmp_path/nodes."""
    return make_client_app(cfg, all_clients=True, state_dir=tmp_path / "nodes")


def test_apps_over_a_grid_equal_the_inprocess_run(reference: Reference, tmp_path: Path) -> None:
    grid = LoopbackGrid(client_app(reference.cfg, tmp_path), NODES)
    results = run_server(grid, reference.cfg, ServerSettings(out_dir=tmp_path / "run"))
    assert results == reference.results
    # The same run directory as the in-process runtime writes, file for file.
    inprocess = tmp_path / "inprocess"
    execute(reference.cfg, inprocess)
    for name in ("results.json", "results.csv", "partition.json", "config.yaml"):
        assert (tmp_path / "run" / name).read_bytes() == (inprocess / name).read_bytes(), name
    from safetensors.torch import load_file

    final = load_file(tmp_path / "run" / "global.safetensors")
    torch.testing.assert_close(final["sigma"], reference.global_tensors["sigma"], atol=1e-6, rtol=0)
    names = array_names(tmp_path / "run" / "messages.jsonl")
    assert "sigma" in names and "U" not in names and "V" not in names
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == reference.results


def _replace_global(message: Message, reply: Message, tensors: dict[str, torch.Tensor]) -> Message:
    content = reply.content
    content[GLOBAL_RECORD] = tensors_to_record(tensors)
    return Message(content, reply_to=message)


def _replace_metric(message: Message, reply: Message, count: int) -> Message:
    from flwr.app import MetricRecord

    content = reply.content
    content["metrics"] = MetricRecord({"num-examples": count})
    return Message(content, reply_to=message)


# What partition 1 sends from round 2 on, one hostile reply per round; the reason each gets.
HOSTILE = {
    2: ("NaN", "non-finite"),
    3: ("a wrong shape", "is float32 (3, 64)"),
    4: ("a personal tensor besides sigma", "'U'"),
    5: ("float64", "is float64 (4, 64)"),
    6: ("a huge array", "(2048, 2048)"),
    7: ("an absurd n_i", "num_samples 1000000000, but client 1 holds"),
    8: ("a negative n_i", "positive int"),
    9: ("an error", "boom"),
}


def bad_partition_one(node: int, message: Message, reply: Message) -> Message:
    """From round 2 on, partition 1 replies as HOSTILE says."""
    round = int(message.metadata.group_id or 0)
    if NODES[node] != 1 or message.metadata.message_type != "train" or round < 2:
        return reply
    sigma = record_to_tensors(reply.content[GLOBAL_RECORD])["sigma"]
    if round == 2:
        return _replace_global(message, reply, {"sigma": torch.full_like(sigma, float("nan"))})
    if round == 3:
        return _replace_global(message, reply, {"sigma": sigma[:-1]})
    if round == 4:
        return _replace_global(message, reply, {"sigma": sigma, "U": torch.zeros(4, 2)})
    if round == 5:
        return _replace_global(message, reply, {"sigma": sigma.double()})
    if round == 6:
        return _replace_global(message, reply, {"sigma": torch.zeros(2048, 2048)})
    if round == 7:
        return _replace_metric(message, reply, 10**9)
    if round == 8:
        return _replace_metric(message, reply, -3)
    return Message(Error(code=0, reason="boom"), reply_to=message)


def test_bad_replies_are_rejected_with_the_node_named_and_the_run_goes_on(
    tiny_data: Path, tmp_path: Path
) -> None:
    cfg = flower_config(tiny_data, rounds=9, eval_every=9)
    grid = LoopbackGrid(client_app(cfg, tmp_path), NODES, bad_partition_one)
    results = run_server(grid, cfg, ServerSettings(out_dir=tmp_path / "run"))
    faults = results["rounds"][-1]["faults"]
    assert [(f["client"], f["round"]) for f in faults] == [(1, r) for r in HOSTILE]
    for fault in faults:
        assert HOSTILE[fault["round"]][1] in fault["reason"], fault
    log = (tmp_path / "run" / "run.log").read_text().splitlines()
    named = [line for line in log if "WARNING" in line and "node 202 (partition 1)" in line]
    assert len(named) == len(HOSTILE)
    assert [r["round"] for r in results["rounds"]] == [9]
    assert [c["id"] for c in results["clients"]] == [0, 1]


def test_too_few_usable_updates_fail_the_round(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, rounds=2, min_clients=2)
    grid = LoopbackGrid(client_app(cfg, tmp_path), NODES, bad_partition_one)
    with pytest.raises(RoundFailedError, match="round 2: 1 of 2"):
        run_server(grid, cfg, ServerSettings(out_dir=tmp_path / "run"))


def test_a_missing_partition_is_named_after_node_wait(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data)
    grid = LoopbackGrid(client_app(cfg, tmp_path), {101: 0})
    with pytest.raises(FedPGPError, match=r"partitions \[1\]"):
        run_server(grid, cfg, ServerSettings(out_dir=tmp_path / "run", node_wait=0.2))


def _reply(content: RecordDict) -> Message:
    instruction = Message(RecordDict(), dst_node_id=5, message_type="train", group_id="1")
    return Message(content, reply_to=instruction)


def test_replies_that_cannot_be_read_are_rejected() -> None:
    from flwr.app import MetricRecord

    sigma = {"sigma": torch.zeros(4, 8)}
    good = {
        GLOBAL_RECORD: tensors_to_record(sigma),
        "metrics": MetricRecord({"num-examples": 3}),
        "client": client_record(0, 0),
    }
    assert read_update(_reply(RecordDict(good)), 0, 0, sigma).num_samples == 3
    with pytest.raises(BadReplyError, match="partition 1"):
        read_update(_reply(RecordDict({**good, "client": client_record(1, 0)})), 0, 0, sigma)
    with pytest.raises(BadReplyError, match="round 1"):
        read_update(_reply(RecordDict({**good, "client": client_record(0, 1)})), 0, 0, sigma)
    with pytest.raises(BadReplyError, match="ArrayRecord"):
        bad = {**good, GLOBAL_RECORD: MetricRecord({"x": 1})}
        read_update(_reply(RecordDict(bad)), 0, 0, sigma)
    with pytest.raises(BadReplyError, match="num-examples"):
        bad = {**good, "metrics": MetricRecord({"loss": 1.0})}
        read_update(_reply(RecordDict(bad)), 0, 0, sigma)
    text = ArrayRecord({"sigma": Array(np.array(["a", "b"]))})
    with pytest.raises(BadReplyError, match="sigma"):
        read_update(_reply(RecordDict({**good, GLOBAL_RECORD: text})), 0, 0, sigma)
    # An array that declares the right shape but carries far more bytes is not decoded.
    padded = Array(np.zeros((4, 8), dtype=np.float32))
    padded.data = padded.data + bytes(1 << 20)
    with pytest.raises(BadReplyError, match="more than"):
        bad = {**good, GLOBAL_RECORD: ArrayRecord({"sigma": padded})}
        read_update(_reply(RecordDict(bad)), 0, 0, sigma)


def _order(round: int, state_round: int, kept: int, cfg, digest: str, run_id: str = "r1"):
    from flwr.app import ConfigRecord

    return ConfigRecord(
        {
            "round": round,
            "run-id": run_id,
            "run-digest": run_digest(cfg),
            "partition-digest": digest,
            "state-round": state_round,
            "kept-round": kept,
            "zeroshot": False,
        }
    )


def test_a_restarted_node_starts_from_the_state_the_server_names(
    tiny_data: Path, tmp_path: Path
) -> None:
    """A restarted SuperNode (new node id, empty context.state) reads the state of the round
    the server names from its file, keeps only the rounds the server may still ask for, and
    refuses a round it does not hold, naming both."""
    cfg = flower_config(tiny_data, optimizer_state="shared")
    app = client_app(cfg, tmp_path)
    node_config = {"partition-id": 1, "num-partitions": 2}
    experiment = experiment_for(cfg, 1, all_clients=True)
    digest = experiment.manifest.digest()
    sigma = experiment.method.initial_global(experiment.backbone.text_width)

    def train(context: Context, round: int, state_round: int, kept: int) -> Message:
        content = RecordDict({GLOBAL_RECORD: tensors_to_record(sigma)})
        content["config"] = _order(round, state_round, kept, cfg, digest)
        return app(Message(content, dst_node_id=context.node_id, message_type="train"), context)

    first = Context(7, 11, node_config, RecordDict(), {})
    for round in range(3):
        reply = train(first, round, round, 0)
        assert sorted(reply.content[GLOBAL_RECORD]) == ["sigma"]
        assert reply.content["client"]["state-round"] == round + 1
    folder = state_folder(tmp_path / "nodes", "r1", 1)
    # kept-round 0 (nothing checkpointed yet) and the state it started from: rounds 2 and 3.
    assert saved_rounds(folder) == [2, 3]
    restarted = Context(7, 12, node_config, RecordDict(), {})
    node = node_for(restarted, cfg, all_clients=True, state_dir=tmp_path / "nodes")
    message = Message(RecordDict({"config": _order(3, 3, 2, cfg, digest)}), 12, "train")
    from_file = node.start_state(restarted, read_order(message))
    from_context = node.start_state(first, read_order(message))
    for a, b in zip(from_file, from_context, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(from_file[1]) == {"sigma/momentum_buffer", "U/momentum_buffer", "V/momentum_buffer"}
    # The server resumed from its checkpoint of round 2: the node goes back to round 2.
    reply = train(restarted, 2, 2, 2)
    assert reply.content["client"]["state-round"] == 3 and saved_rounds(folder) == [2, 3]
    refused = train(restarted, 5, 1, 1)
    reason = refused.content["state-error"]["reason"]
    assert "round 1" in reason and "holds rounds [2, 3]" in reason


def test_state_files_are_checked(tmp_path: Path) -> None:
    tensors = {"U": torch.ones(4, 2), "V": torch.ones(2, 8)}
    buffers = {"U/momentum_buffer": torch.ones(4, 2)}
    save_state(tmp_path, 1, 3, "run-a", "abc", tensors, buffers)
    expected = {"U": torch.zeros(4, 2), "V": torch.zeros(2, 8)}
    personal, optimizer = load_state(tmp_path, 1, 3, "run-a", "abc", expected)
    assert set(personal) == {"U", "V"} and set(optimizer) == {"U/momentum_buffer"}
    path = tmp_path / "round-000003.safetensors"
    with pytest.raises(StateError, match="partition-id '1' \\(expected '0'\\)"):
        load_state(tmp_path, 0, 3, "run-a", "abc", expected)
    with pytest.raises(StateError, match="run-id 'run-a' \\(expected 'run-b'\\)"):
        load_state(tmp_path, 1, 3, "run-b", "abc", expected)
    with pytest.raises(StateError, match="run-digest 'abc'"):
        load_state(tmp_path, 1, 3, "run-a", "xyz", expected)
    with pytest.raises(StateError, match="the method expects"):
        load_state(tmp_path, 1, 3, "run-a", "abc", {"U": torch.zeros(4, 3)})
    with pytest.raises(StateError, match="round 2, but .* does not exist"):
        load_state(tmp_path, 1, 2, "run-a", "abc", expected)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StateError, match="cannot be read"):
        load_state(tmp_path, 1, 3, "run-a", "abc", expected)
    assert issubclass(StateError, CheckpointError)


class ServerKilled(BaseException):
    """Stands in for SIGKILL of the ServerApp: nothing after it runs."""


def kill_after(count: int, kind: str) -> Tamper:
    """Kill the server when the ``count``-th reply of ``kind`` comes back."""
    seen = [0]

    def tamper(node: int, message: Message, reply: Message) -> Message:
        if message.metadata.message_type == kind:
            seen[0] += 1
            if seen[0] == count:
                raise ServerKilled
        return reply

    return tamper


@pytest.mark.parametrize(
    ("extra", "kill"),
    [
        # Killed inside round 3 after one node trained (its state is then ahead of the
        # checkpoint of round 2); shared momentum lives on the nodes.
        ({"rounds": 4, "eval_every": 2, "optimizer_state": "shared"}, (6, "train")),
        # Killed while evaluating round 2, one client sampled per round, checkpoints every 2nd.
        ({"rounds": 4, "frac": 0.5, "eval_every": 1, "checkpoint_every": 2}, (3, "evaluate")),
    ],
)
def test_a_killed_server_resumes_to_the_uninterrupted_results(
    extra: dict, kill: tuple[int, str], tiny_data: Path, tmp_path: Path
) -> None:
    cfg = flower_config(tiny_data, lr=0.05, **extra)
    whole = LoopbackGrid(client_app(cfg, tmp_path / "whole"), NODES)
    expected = run_server(whole, cfg, ServerSettings(out_dir=tmp_path / "whole" / "run"))
    out = tmp_path / "run"
    grid = LoopbackGrid(client_app(cfg, tmp_path), NODES, kill_after(*kill))
    with pytest.raises(ServerKilled):
        run_server(grid, cfg, ServerSettings(out_dir=out))
    assert not (out / "results.json").exists()
    # Everything restarts: new node contexts, the state files on disk.
    again = LoopbackGrid(client_app(cfg, tmp_path), NODES)
    results = run_server(again, cfg, ServerSettings(out_dir=out, resume=True))
    assert results == expected
    for name in ("results.json", "results.csv", "global.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / "run" / name).read_bytes()


def test_a_resume_that_cannot_continue_names_the_mismatch(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, rounds=3, eval_every=3)
    out = tmp_path / "run"
    grid = LoopbackGrid(client_app(cfg, tmp_path), NODES, kill_after(4, "train"))
    with pytest.raises(ServerKilled):
        run_server(grid, cfg, ServerSettings(out_dir=out))
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.name != "run.log")
    other = flower_config(tiny_data, rounds=3, eval_every=3, lr=0.5)
    with pytest.raises(ConfigError, match=r"lr: 0\.01 -> 0\.5"):
        run_server(
            LoopbackGrid(client_app(other, tmp_path), NODES),
            other,
            ServerSettings(out, resume=True),
        )
    # A node that lost its state (another machine, a wiped disk): the run stops naming it.
    for path in (tmp_path / "nodes").rglob("partition-1/*.safetensors"):
        path.unlink()
    lost = r"node 202 \(partition 1\), round 2: .*state of round 1, but .* does not exist"
    with pytest.raises(StateError, match=lost):
        run_server(
            LoopbackGrid(client_app(cfg, tmp_path), NODES), cfg, ServerSettings(out, resume=True)
        )
    after = sorted(p.relative_to(out) for p in out.rglob("*") if p.name != "run.log")
    assert after == before and not (out / "results.json").exists()


def test_resume_is_a_run_config_key() -> None:
    settings = server_settings({"resume": True, "out-dir": "/r"}, Path("default"))
    assert settings.resume and settings.out_dir == Path("/r")
    assert not server_settings({}, Path("default")).resume
    with pytest.raises(ConfigError, match="needs 'out-dir'"):
        server_settings({"resume": True}, Path("default"))
    with pytest.raises(ConfigError, match="expected true or false"):
        server_settings({"resume": "maybe", "out-dir": "/r"}, Path("default"))


def test_settings_name_the_bad_key() -> None:
    with pytest.raises(ConfigError, match="partition-id"):
        node_settings({"num-partitions": 2})
    with pytest.raises(ConfigError, match="0 <= id < 2"):
        node_settings({"partition-id": 2, "num-partitions": 2})
    with pytest.raises(ConfigError, match="integer"):
        node_settings({"partition-id": "0", "num-partitions": 2})
    settings = node_settings({"partition-id": 1, "num-partitions": 2, "state-dir": "/s"})
    assert settings.state_dir == Path("/s") and settings.data_root is None
    cfg = config_from_run_config({"config-file": "", "set": "rounds=3 dataset.name=dtd"})
    assert cfg.rounds == 3 and cfg.dataset.name == "dtd"
    with pytest.raises(ConfigError, match="unknown config key 'round'"):
        config_from_run_config({"set": "round=3"})


def test_a_checkpoint_is_resumed_only_by_the_runtime_that_wrote_it(
    tiny_data: Path, tmp_path: Path
) -> None:
    cfg = flower_config(tiny_data, rounds=3, eval_every=3)
    flower_run = tmp_path / "flower"
    grid = LoopbackGrid(client_app(cfg, tmp_path), NODES, kill_after(4, "train"))
    with pytest.raises(ServerKilled):
        run_server(grid, cfg, ServerSettings(out_dir=flower_run))
    with pytest.raises(CheckpointError, match="written by a Flower run .* --runtime flower-sim"):
        resume(flower_run)
    inprocess_run = tmp_path / "inprocess"
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupted_run(monkeypatch, cfg, inprocess_run, 2)
    again = LoopbackGrid(client_app(cfg, tmp_path), NODES)
    with pytest.raises(CheckpointError, match="written by an in-process run"):
        run_server(again, cfg, ServerSettings(inprocess_run, resume=True))


def test_a_node_with_another_config_or_partition_answers_with_a_state_error(
    tiny_data: Path, tmp_path: Path
) -> None:
    cfg = flower_config(tiny_data)
    app = client_app(cfg, tmp_path)
    experiment = experiment_for(cfg, 0, all_clients=True)
    digest = experiment.manifest.digest()
    sigma = experiment.method.initial_global(experiment.backbone.text_width)
    context = Context(7, 11, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    other = flower_config(tiny_data, lr=0.5)
    for order, needle in (
        (_order(0, 0, 0, cfg, "f" * 64), "partition manifest"),
        (_order(0, 0, 0, other, digest), "run config differs"),
    ):
        content = RecordDict({GLOBAL_RECORD: tensors_to_record(sigma), "config": order})
        reply = app(Message(content, dst_node_id=11, message_type="train"), context)
        assert needle in reply.content["state-error"]["reason"]
        assert GLOBAL_RECORD not in reply.content
    assert not list((tmp_path / "nodes").rglob("*.safetensors"))
