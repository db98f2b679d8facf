"""The Flower apps without Flower's network: the real ServerApp logic and ClientApp exchanging
real Messages through a Grid that delivers them in this process (as Flower's in-memory grid
does), plus the reply checks, the personal state files and the settings."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flowerkit import Reference, array_names, flower_config, reference_run
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedpgp.backbone import FrozenCLIP
from fedpgp.errors import CheckpointError, ConfigError, FedPGPError
from fedpgp.experiment import backbone_spec, build_experiment
from fedpgp.federation.faults import RoundFailedError
from fedpgp.federation.flower.client_app import make_client_app
from fedpgp.federation.flower.node import experiment_for, node_for
from fedpgp.federation.flower.records import (
    BadReplyError,
    client_record,
    read_update,
    tensors_to_record,
)
from fedpgp.federation.flower.server_app import initial_global, run_server
from fedpgp.federation.flower.settings import (
    GLOBAL_RECORD,
    ServerSettings,
    config_from_run_config,
    node_settings,
)
from fedpgp.federation.flower.state import (
    PersonalState,
    load_state_file,
    save_state_file,
    state_file,
)
from fedpgp.methods import create_method

Tamper = Callable[[int, Message, Message], Message]


class LoopbackGrid(Grid):
    """A Grid that hands each message to a ClientApp in this process, with one Context per
    node (what a SuperNode keeps between messages), and lets a test alter a node's replies."""

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        partitions: dict[int, int],
        tamper: Tamper | None = None,
    ) -> None:
        self.client_app = client_app
        self.tamper = tamper
        self.contexts = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={"partition-id": p, "num-partitions": 2},
                state=RecordDict(),
                run_config={},
            )
            for node, p in partitions.items()
        }

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            # Flower's grids give each message its id when pushing it (metadata has no setter).
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = message.metadata.dst_node_id
            reply = self.client_app(message, self.contexts[node])
            if self.tamper is not None:
                reply = self.tamper(node, message, reply)
            replies.append(reply)
        return replies


NODES = {101: 0, 202: 1}


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Messages stamp the run and sender from the process's task identity, which a Flower
    runtime sets (run_simulation sets the same three values); restored afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference_run(tiny_data, tmp_path_factory.getbasetemp() / "flower-reference")


def test_initial_global_is_the_experiments(reference: Reference, tiny_data: Path) -> None:
    cfg = reference.cfg
    backbone = FrozenCLIP.load(backbone_spec(cfg))
    method = create_method(cfg, backbone.logit_scale)
    expected = build_experiment(cfg, clients=[0]).initial_global()
    got = initial_global(cfg, method, backbone.text_width)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_apps_over_a_grid_equal_the_inprocess_run(reference: Reference, tmp_path: Path) -> None:
    grid = LoopbackGrid(make_client_app(reference.cfg, all_clients=True), NODES)
    results = run_server(grid, reference.cfg, ServerSettings(out_dir=tmp_path / "run"))
    assert results == reference.results
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


def bad_partition_one(node: int, message: Message, reply: Message) -> Message:
    """From round 2 on, partition 1 replies with NaN, a wrong shape, an extra tensor, an
    error, in turn."""
    round = int(message.metadata.group_id or 0)
    if NODES[node] != 1 or message.metadata.message_type != "train" or round < 2:
        return reply
    sigma = read_update(reply, 1, round - 1).tensors["sigma"]
    if round == 2:
        return _replace_global(message, reply, {"sigma": torch.full_like(sigma, float("nan"))})
    if round == 3:
        return _replace_global(message, reply, {"sigma": sigma[:-1]})
    if round == 4:
        return _replace_global(message, reply, {"sigma": sigma, "U": torch.zeros(4, 2)})
    return Message(Error(code=0, reason="boom"), reply_to=message)


def test_bad_replies_are_rejected_with_the_node_named_and_the_run_goes_on(
    tiny_data: Path, tmp_path: Path
) -> None:
    cfg = flower_config(tiny_data, rounds=5, eval_every=5)
    grid = LoopbackGrid(make_client_app(cfg, all_clients=True), NODES, bad_partition_one)
    results = run_server(grid, cfg, ServerSettings(out_dir=tmp_path / "run"))
    faults = results["rounds"][-1]["faults"]
    assert [(f["client"], f["round"]) for f in faults] == [(1, 2), (1, 3), (1, 4), (1, 5)]
    reasons = [f["reason"] for f in faults]
    assert "non-finite" in reasons[0]
    assert "shape" in reasons[1]
    assert "'U'" in reasons[2]
    assert "boom" in reasons[3]
    log = (tmp_path / "run" / "run.log").read_text().splitlines()
    named = [line for line in log if "WARNING" in line and "node 202 (partition 1)" in line]
    assert len(named) == 4
    assert [r["round"] for r in results["rounds"]] == [5]
    assert [c["id"] for c in results["clients"]] == [0, 1]


def test_too_few_usable_updates_fail_the_round(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, rounds=2, min_clients=2)
    grid = LoopbackGrid(make_client_app(cfg, all_clients=True), NODES, bad_partition_one)
    with pytest.raises(RoundFailedError, match="round 2: 1 of 2"):
        run_server(grid, cfg, ServerSettings(out_dir=tmp_path / "run"))


def test_a_missing_partition_is_named_after_node_wait(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data)
    grid = LoopbackGrid(make_client_app(cfg, all_clients=True), {101: 0})
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
    assert read_update(_reply(RecordDict(good)), 0, 0).num_samples == 3
    with pytest.raises(BadReplyError, match="partition 1"):
        read_update(_reply(RecordDict({**good, "client": client_record(1, 0)})), 0, 0)
    with pytest.raises(BadReplyError, match="round 1"):
        read_update(_reply(RecordDict({**good, "client": client_record(0, 1)})), 0, 0)
    with pytest.raises(BadReplyError, match="ArrayRecord"):
        read_update(_reply(RecordDict({**good, GLOBAL_RECORD: MetricRecord({"x": 1})})), 0, 0)
    with pytest.raises(BadReplyError, match="num-examples"):
        read_update(_reply(RecordDict({**good, "metrics": MetricRecord({"loss": 1.0})})), 0, 0)
    text = ArrayRecord({"sigma": Array(np.array(["a", "b"]))})
    with pytest.raises(BadReplyError, match="sigma"):
        read_update(_reply(RecordDict({**good, GLOBAL_RECORD: text})), 0, 0)


def test_personal_state_survives_a_new_node_id(tiny_data: Path, tmp_path: Path) -> None:
    """A restarted SuperNode (new node id, empty context.state) reloads its partition's file."""
    cfg = flower_config(tiny_data)
    app = make_client_app(cfg, all_clients=True)
    node_config = {"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path)}
    first = Context(7, 11, node_config, RecordDict(), {})
    experiment = experiment_for(cfg, 1, all_clients=True)
    content = RecordDict({GLOBAL_RECORD: tensors_to_record(experiment.initial_global())})
    from flwr.app import ConfigRecord

    content["config"] = ConfigRecord({"round": 0, "zeroshot": False})
    reply = app(Message(content, dst_node_id=11, message_type="train"), first)
    assert sorted(reply.content[GLOBAL_RECORD]) == ["sigma"]
    path = state_file(tmp_path, 7, 1)
    restarted = Context(7, 12, node_config, RecordDict(), {})
    state = node_for(restarted, cfg, all_clients=True).load_state(restarted.state)
    kept = node_for(first, cfg, all_clients=True).load_state(first.state)
    assert path.is_file() and state.round == kept.round == 0
    for key in ("U", "V"):
        assert torch.equal(state.tensors[key], kept.tensors[key])
        assert not torch.equal(state.tensors[key], experiment.initial_personal(1)[key])


def test_state_files_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "partition-1.safetensors"
    tensors = {"U": torch.ones(4, 2), "V": torch.ones(2, 8)}
    save_state_file(path, PersonalState(1, 3, tensors, {"sigma": torch.ones(4, 8)}), "abc")
    expected = {"U": (4, 2), "V": (2, 8)}
    state = load_state_file(path, 1, "abc", expected)
    assert (
        state.round == 3 and set(state.tensors) == {"U", "V"} and set(state.optimizer) == {"sigma"}
    )
    with pytest.raises(CheckpointError, match="partition 1, not 0"):
        load_state_file(path, 0, "abc", expected)
    with pytest.raises(CheckpointError, match="another config"):
        load_state_file(path, 1, "xyz", expected)
    with pytest.raises(CheckpointError, match="expected"):
        load_state_file(path, 1, "abc", {"U": (4, 3), "V": (3, 8)})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state_file(path, 1, "abc", expected)


def test_shared_optimizer_state_is_kept_on_the_node(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, optimizer_state="shared")
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)}
    context = Context(7, 11, node_config, RecordDict(), {})
    node = node_for(context, cfg, all_clients=True)
    global_tensors = node.experiment.initial_global()
    state = node.load_state(context.state)
    client = node.client(state, global_tensors)
    client.train(global_tensors, 0)
    from fedpgp.federation.flower.node import _momentum_buffers

    buffers = _momentum_buffers(client, global_tensors)
    assert set(buffers) == {"sigma", "U", "V"}
    node.keep_state(context.state, PersonalState(0, 0, client.personal, buffers))
    restored = node.load_state(RecordDict())
    again = node.client(restored, global_tensors)
    _, optimizer = again.optimizers.prepare(again.params(global_tensors))
    loaded = optimizer.state_dict()["state"]
    for index, name in enumerate(["sigma", "U", "V"]):
        assert torch.equal(loaded[index]["momentum_buffer"], buffers[name])


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
