"""What a SuperNode does with a train or evaluate message: build its own partition's experiment
(once per process), start from the PERSONAL state the server names, run the Client, keep the
new state, and reply with what the method uploads.

A message whose run digest, partition or expected state the node cannot meet gets a
``state-error`` reply (never a silent fallback): the server stops the run naming the node.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import Tensor

from ...checkpoint import flatten_client_state, split_client_state
from ...config import RunConfig, run_digest
from ...evaluation import evaluate_clients, zero_shot_rows
from ...experiment import Experiment, build_experiment, load_data
from ...methods.base import Tensors
from ..client import Client, Optimizers
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
    KEPT_ROUND,
    MANIFEST,
    MANIFEST_DIGEST,
    METRICS_RECORD,
    PARTITION_DIGEST,
    RUN_DIGEST,
    RUN_ID,
    STATE_ERROR_RECORD,
    STATE_ROUND,
    ZEROSHOT_RECORD,
    NodeSettings,
    config_from_run_config,
    node_run_config,
    node_settings,
)
from .state import StateError, load_state, prune, save_state, state_folder

log = logging.getLogger(__name__)

# One experiment per process: a SuperNode starts a process per message, while a simulation
# actor serves many messages (and, with all_clients, many partitions) from one.
_CACHE: dict[tuple[str, int | None], Experiment] = {}
# The node's latest state in context.state, for a node without a state dir.
CONTEXT_RECORD = "fedpgp.state"
CONTEXT_META = "fedpgp.state-meta"


def experiment_for(cfg: RunConfig, partition_id: int, all_clients: bool) -> Experiment:
    """The experiment with this partition's data (every partition's with ``all_clients``)."""
    key = (cfg.digest(), None if all_clients else partition_id)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_experiment(cfg, None if all_clients else [partition_id])
    return _CACHE[key]


@dataclass(frozen=True)
class Order:
    """What the server asks of a node for one message (its config record)."""

    round: int
    run_id: str
    run_digest: str
    partition_digest: str
    state_round: int
    kept_round: int
    zeroshot: bool


def read_order(message: Message) -> Order:
    """The server's config record; ValueError naming the bad key."""
    config = message.content.get(CONFIG_RECORD)
    if not isinstance(config, ConfigRecord):
        raise ValueError(f"the server's message has no '{CONFIG_RECORD}' record")

    def count(key: str) -> int:
        value: Any = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the server's message: '{key}' must be a count, got {value!r}")
        return value

    def text(key: str) -> str:
        value = config.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"the server's message: '{key}' must be a string, got {value!r}")
        return value

    return Order(
        count("round"),
        text(RUN_ID),
        text(RUN_DIGEST),
        text(PARTITION_DIGEST),
        count(STATE_ROUND),
        count(KEPT_ROUND),
        bool(config.get("zeroshot", False)),
    )


def state_error(message: Message, partition_id: int, round: int, reason: str) -> Message:
    """The reply that stops the run: this node cannot serve the state the server expects."""
    content = RecordDict(
        {
            CLIENT_RECORD: client_record(partition_id, round),
            STATE_ERROR_RECORD: ConfigRecord({"reason": reason}),
        }
    )
    return Message(content, reply_to=message)


@dataclass
class Node:
    """Partition ``settings.partition_id`` on this SuperNode."""

    cfg: RunConfig
    settings: NodeSettings
    experiment: Experiment

    @property
    def partition_id(self) -> int:
        return self.settings.partition_id

    @property
    def device(self) -> torch.device:
        return self.experiment.backbone.device

    def _folder(self, run_id: str) -> Path | None:
        if self.settings.state_dir is None:
            return None
        return state_folder(self.settings.state_dir, run_id, self.partition_id)

    def _check(self, order: Order) -> None:
        """StateError unless this node runs the server's config on the server's partition."""
        if order.run_digest != run_digest(self.cfg):
            raise StateError(
                f"partition {self.partition_id}: this node's run config differs from the "
                f"server's (run digest {run_digest(self.cfg)[:16]}..., server "
                f"{order.run_digest[:16]}...)"
            )
        digest = self.experiment.manifest.digest()
        if order.partition_digest != digest:
            raise StateError(
                f"partition {self.partition_id}: this node's partition manifest "
                f"{digest[:16]}... differs from the server's {order.partition_digest[:16]}... "
                f"(another dataset or partition.file on this machine?)"
            )

    def start_state(self, context: Context, order: Order) -> tuple[Tensors, Tensors]:
        """The PERSONAL tensors and optimizer buffers after ``order.state_round`` rounds: the
        run seed's initial ones for round 0, else the node's kept state of that round."""
        method, width = self.experiment.method, self.experiment.backbone.text_width
        initial = method.initial_personal(width, self.partition_id)
        if order.state_round == 0:
            personal, optimizer = initial, {}
        else:
            meta = context.state.get(CONTEXT_META)
            record = context.state.get(CONTEXT_RECORD)
            folder = self._folder(order.run_id)
            if (
                isinstance(meta, ConfigRecord)
                and record is not None
                and meta.get(RUN_ID) == order.run_id
                and meta.get("partition-id") == self.partition_id
                and meta.get(STATE_ROUND) == order.state_round
            ):
                personal, optimizer = split_client_state(record_to_tensors(record))
            elif folder is None:
                held = meta.get(STATE_ROUND) if isinstance(meta, ConfigRecord) else None
                raise StateError(
                    f"partition {self.partition_id}: the server expects the personal state of "
                    f"round {order.state_round}, this node holds round {held} and keeps no "
                    f"state-dir to read it from"
                )
            else:
                personal, optimizer = load_state(
                    folder,
                    self.partition_id,
                    order.state_round,
                    order.run_id,
                    run_digest(self.cfg),
                    initial,
                )
                log.info(
                    "partition %d: personal state of round %d read from %s",
                    self.partition_id,
                    order.state_round,
                    folder,
                )
        return (
            {k: v.to(self.device) for k, v in personal.items()},
            {k: v.to(self.device) for k, v in optimizer.items()},
        )

    def keep_state(
        self, context: Context, order: Order, round: int, personal: Tensors, optimizer: Tensors
    ) -> None:
        """Keep the state after ``round`` rounds in ``context.state`` and, with a state dir,
        on disk, dropping every state but this one and those the server may still ask for."""
        flat = flatten_client_state(personal, optimizer)
        context.state[CONTEXT_RECORD] = tensors_to_record(flat)
        context.state[CONTEXT_META] = ConfigRecord(
            {RUN_ID: order.run_id, "partition-id": self.partition_id, STATE_ROUND: round}
        )
        folder = self._folder(order.run_id)
        if folder is not None:
            digest = run_digest(self.cfg)
            save_state(folder, self.partition_id, round, order.run_id, digest, personal, optimizer)
            prune(folder, {order.kept_round, order.state_round, round})

    def client(
        self, personal: Tensors, optimizer: Tensors, received: Mapping[str, Tensor]
    ) -> Client:
        """The Client of this partition holding ``personal`` and its kept optimizer."""
        cfg = self.cfg
        optimizers = Optimizers.from_config(cfg)
        client = Client(
            self.partition_id,
            self.experiment.method,
            self.experiment.client_data[self.partition_id],
            personal,
            optimizers,
            cfg.seed,
        )
        optimizers.load_buffers(client.params(received), optimizer)
        return client

    def received(self, message: Message) -> dict[str, Tensor]:
        """What the server sent (GLOBAL tensors first, in the method's order)."""
        tensors = record_to_tensors(message.content.get(GLOBAL_RECORD), self.device)
        keys = self.experiment.method.global_keys
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise ValueError(f"the server sent tensors {sorted(tensors)}, missing {missing}")
        return {**{key: tensors[key] for key in keys}, **tensors}

    def _prepare(
        self, message: Message, context: Context
    ) -> tuple[Order, Client, Tensors] | Message:
        """The server's order, this partition's Client at the state the order names, and what
        was received; or the state-error reply when the node cannot meet the order."""
        order = read_order(message)
        try:
            self._check(order)
            personal, optimizer = self.start_state(context, order)
        except StateError as exc:
            return state_error(message, self.partition_id, order.round, str(exc))
        received = self.received(message)
        return order, self.client(personal, optimizer, received), received

    def train(self, message: Message, context: Context) -> Message:
        """One local round from what was received; replies with the method's upload, n_i and
        the loss. The new PERSONAL state stays here."""
        prepared = self._prepare(message, context)
        if isinstance(prepared, Message):
            return prepared
        order, client, received = prepared
        update = client.train(received, order.round)
        new_round = order.round + 1
        self.keep_state(context, order, new_round, client.personal, client.optimizers.buffers())
        metrics = {NUM_EXAMPLES: update.num_samples, **update.metrics}
        record = client_record(self.partition_id, order.round)
        record[STATE_ROUND] = new_round
        content = RecordDict(
            {
                GLOBAL_RECORD: tensors_to_record(update.tensors),
                METRICS_RECORD: MetricRecord(metrics),
                CLIENT_RECORD: record,
            }
        )
        return Message(content, reply_to=message)

    def evaluate(self, message: Message, context: Context) -> Message:
        """Local / Base / Novel of this client's prediction context (received GLOBAL tensors and
        its own PERSONAL ones), and CLIP zero-shot's when the server asks for it."""
        prepared = self._prepare(message, context)
        if isinstance(prepared, Message):
            return prepared
        order, client, received = prepared
        pid = self.partition_id
        params = client.params(received)
        row = evaluate_clients(self.experiment, {pid: params})[0]
        content = RecordDict(
            {
                CLIENT_RECORD: client_record(pid, order.round),
                METRICS_RECORD: metrics_record(row, row["n_train"]),
            }
        )
        if order.zeroshot:
            zrow = zero_shot_rows(self.experiment, [pid])[0]
            content[ZEROSHOT_RECORD] = metrics_record(zrow, zrow["n_train"])
        return Message(content, reply_to=message)


def node_for(
    context: Context, cfg: RunConfig | None, all_clients: bool, state_dir: Path | None = None
) -> Node:
    """This SuperNode's Node: the config from the run config (or ``cfg``), the partition from
    the node config; ``state_dir`` stands in for a node config without one (flower-sim)."""
    settings = node_settings(context.node_config)
    if settings.state_dir is None and state_dir is not None:
        settings = NodeSettings(
            settings.partition_id, settings.num_partitions, state_dir, settings.data_root
        )
    run_cfg = node_run_config(cfg or config_from_run_config(context.run_config), settings)
    experiment = experiment_for(run_cfg, settings.partition_id, all_clients)
    return Node(run_cfg, settings, experiment)


def manifest_reply(message: Message, context: Context, cfg: RunConfig | None) -> Message:
    """The partition manifest this node computes (the dataset listing and the run seed's
    partition, no image read and no model loaded), for the server's partition.json."""
    settings = node_settings(context.node_config)
    run_cfg = node_run_config(cfg or config_from_run_config(context.run_config), settings)
    _, manifest = load_data(run_cfg)
    record = ConfigRecord({MANIFEST: manifest.to_json(), MANIFEST_DIGEST: manifest.digest()})
    return Message(RecordDict({CLIENT_RECORD: record}), reply_to=message)
