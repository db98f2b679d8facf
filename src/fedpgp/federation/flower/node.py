"""What a SuperNode does with a train or evaluate message: build its own partition's experiment
(once per process), restore its PERSONAL state, run the existing Client, keep the new state, and
reply with the GLOBAL tensors only."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import Tensor

from ...config import RunConfig
from ...errors import CheckpointError
from ...experiment import Experiment, build_experiment
from ..client import Client, Optimizers
from ..simulation import evaluate_clients
from .records import (
    NUM_EXAMPLES,
    client_record,
    metrics_record,
    record_to_tensors,
    tensors_to_record,
)
from .settings import (
    CLIENT_RECORD,
    CONFIG_RECORD,
    GLOBAL_RECORD,
    METRICS_RECORD,
    ZEROSHOT_RECORD,
    NodeSettings,
    config_from_run_config,
    node_run_config,
    node_settings,
)
from .state import (
    PersonalState,
    get_from_context,
    load_state_file,
    put_in_context,
    save_state_file,
    state_file,
)

log = logging.getLogger(__name__)

# One experiment per process: a SuperNode starts a process per message, while a simulation
# actor serves many messages (and, with all_clients, many partitions) from one.
_CACHE: dict[tuple[str, int | None], Experiment] = {}


def experiment_for(cfg: RunConfig, partition_id: int, all_clients: bool) -> Experiment:
    """The experiment with this partition's data (every partition's with ``all_clients``)."""
    key = (cfg.digest(), None if all_clients else partition_id)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_experiment(cfg, None if all_clients else [partition_id])
    return _CACHE[key]


def _momentum_buffers(client: Client, global_tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The kept optimizer's momentum buffers by parameter name ({} for ``fresh``)."""
    state = client.optimizers.state_dict().get("state", {})
    names = list(client.params(global_tensors))
    return {
        names[index]: entry["momentum_buffer"].detach().clone()
        for index, entry in state.items()
        if entry.get("momentum_buffer") is not None
    }


def _restore_momentum(
    client: Client, global_tensors: Mapping[str, Tensor], buffers: Mapping[str, Tensor]
) -> None:
    """Load saved momentum buffers into the client's (shared-mode) optimizer."""
    params = client.params(global_tensors)
    names = list(params)
    unknown = set(buffers) - set(names)
    if unknown:
        raise CheckpointError(f"optimizer buffers for unknown parameters {sorted(unknown)}")
    # The kept optimizer exists once prepared; Client.train then reuses it.
    _, optimizer = client.optimizers.prepare(params)
    state = {
        index: {"momentum_buffer": buffers[name].to(params[name].device)}
        for index, name in enumerate(names)
        if name in buffers
    }
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class Node:
    """Partition ``settings.partition_id`` on this SuperNode, during run ``run_id``."""

    cfg: RunConfig
    settings: NodeSettings
    experiment: Experiment
    run_id: int

    @property
    def partition_id(self) -> int:
        return self.settings.partition_id

    @property
    def device(self) -> torch.device:
        return self.experiment.backbone.device

    def _state_path(self) -> Path | None:
        if self.settings.state_dir is None:
            return None
        return state_file(self.settings.state_dir, self.run_id, self.partition_id)

    def load_state(self, context_state: RecordDict) -> PersonalState:
        """This partition's latest state: from ``context.state``, else from the state file
        (a restarted SuperNode), else the initial PERSONAL tensors of the run seed."""
        digest = self.cfg.digest()
        state = get_from_context(context_state, self.partition_id, digest)
        path = self._state_path()
        if state is None and path is not None and path.exists():
            initial = self.experiment.initial_personal(self.partition_id)
            expected = {k: tuple(v.shape) for k, v in initial.items()}
            state = load_state_file(path, self.partition_id, digest, expected)
            log.info(
                "partition %d: restored personal state of round %d from %s",
                self.partition_id,
                state.round + 1,
                path,
            )
        if state is None:
            state = PersonalState(
                self.partition_id, -1, self.experiment.initial_personal(self.partition_id)
            )
        state.tensors = {k: v.to(self.device) for k, v in state.tensors.items()}
        state.optimizer = {k: v.to(self.device) for k, v in state.optimizer.items()}
        return state

    def keep_state(self, context_state: RecordDict, state: PersonalState) -> None:
        """Put ``state`` in ``context.state`` and, with a state dir, atomically on disk."""
        digest = self.cfg.digest()
        put_in_context(context_state, state, digest)
        path = self._state_path()
        if path is not None:
            save_state_file(path, state, digest)

    def client(self, state: PersonalState, global_tensors: Mapping[str, Tensor]) -> Client:
        """The existing Client of this partition, holding ``state``."""
        cfg = self.cfg
        optimizers = Optimizers(cfg.optimizer_state, cfg.lr, cfg.momentum, cfg.weight_decay)
        client = Client(
            self.partition_id,
            self.experiment.method,
            self.experiment.client_data[self.partition_id],
            state.tensors,
            optimizers,
            cfg.seed,
        )
        if state.optimizer:
            _restore_momentum(client, global_tensors, state.optimizer)
        return client

    def received_global(self, message: Message) -> dict[str, Tensor]:
        """The GLOBAL tensors the server sent, in the method's order."""
        tensors = record_to_tensors(message.content.get(GLOBAL_RECORD), self.device)
        keys = self.experiment.method.global_keys
        if set(tensors) != set(keys):
            raise ValueError(f"the server sent tensors {sorted(tensors)}, expected {list(keys)}")
        return {key: tensors[key] for key in keys}

    def train(self, message: Message, context: Context) -> Message:
        """One local round from the received GLOBAL tensors; replies with the Update's GLOBAL
        tensors, n_i and the loss. The new PERSONAL state stays here."""
        round = _round(message)
        global_tensors = self.received_global(message)
        state = self.load_state(context.state)
        client = self.client(state, global_tensors)
        update = client.train(global_tensors, round)
        buffers = _momentum_buffers(client, global_tensors)
        self.keep_state(
            context.state, PersonalState(self.partition_id, round, client.personal, buffers)
        )
        metrics = {NUM_EXAMPLES: update.num_samples, **update.metrics}
        content = RecordDict(
            {
                GLOBAL_RECORD: tensors_to_record(update.tensors),
                METRICS_RECORD: MetricRecord(metrics),
                CLIENT_RECORD: client_record(self.partition_id, round),
            }
        )
        return Message(content, reply_to=message)

    def evaluate(self, message: Message, context: Context) -> Message:
        """Local / Base / Novel of this client's prediction context (received GLOBAL tensors and
        its own PERSONAL ones), and CLIP zero-shot's when the server asks for it."""
        round = _round(message)
        global_tensors = self.received_global(message)
        state = self.load_state(context.state)
        put_in_context(context.state, state, self.cfg.digest())
        pid = self.partition_id
        params = self.client(state, global_tensors).params(global_tensors)
        data = {pid: self.experiment.client_data[pid]}
        row = evaluate_clients(self.experiment, self.experiment.method, {pid: params}, data)[0]
        content = RecordDict(
            {
                CLIENT_RECORD: client_record(pid, round),
                METRICS_RECORD: metrics_record(row, row["n_train"]),
            }
        )
        config = message.content.get(CONFIG_RECORD)
        if isinstance(config, ConfigRecord) and config.get("zeroshot"):
            # Zero-shot reads pooled features, whatever this run's method reads.
            zeroshot = self.experiment.with_method("zeroshot")
            zdata = {pid: zeroshot.client_data[pid]}
            zrow = evaluate_clients(zeroshot, zeroshot.method, {pid: {}}, zdata)[0]
            content[ZEROSHOT_RECORD] = metrics_record(zrow, zrow["n_train"])
        return Message(content, reply_to=message)


def _round(message: Message) -> int:
    config = message.content.get(CONFIG_RECORD)
    value: Any = config.get("round") if isinstance(config, ConfigRecord) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"the server's message has no valid round: {value!r}")
    return value


def node_for(context: Context, cfg: RunConfig | None, all_clients: bool) -> Node:
    """This SuperNode's Node for the message's run: the config from the run config (or
    ``cfg``), the partition from the node config."""
    settings = node_settings(context.node_config)
    run_cfg = node_run_config(cfg or config_from_run_config(context.run_config), settings)
    experiment = experiment_for(run_cfg, settings.partition_id, all_clients)
    return Node(run_cfg, settings, experiment, context.run_id)
